# syntax=docker/dockerfile:1
# nanorun's three images, one target each; build from the repository root:
#
#   docker build --target trainer  -t ghcr.io/nanorun/nanorun-trainer:0.1.0 .   # every training stage
#   docker build --target serving  -t ghcr.io/nanorun/nanorun-serving:0.1.0 .   # the Ray Serve chat app
#   docker build --target operator -t ghcr.io/nanorun/nanorun-operator:0.1.0 .  # `nanorun operator`
#
# (`make images` builds all three with buildah.) Python and every dependency are the versions the
# tests run: Debian 12's python3 and each image's export of uv.lock (requirements/<extra>.txt); nanorun
# itself goes in with --no-deps. PyPI's torch wheel carries its CUDA libraries and the node's driver
# does the rest, so BASE_IMAGE is any Debian 12 image, not a CUDA one. The trainer and serving images
# share their dependency layers (the `torch` stage).

ARG BASE_IMAGE=debian:12.15-slim

# Debian's Python in a virtualenv first on PATH, also for login shells (`bash -l` reads /etc/profile,
# which resets PATH; KubeRay can run Ray's commands that way).
FROM ${BASE_IMAGE} AS python
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && echo 'PATH=/opt/venv/bin:$PATH' > /etc/profile.d/venv.sh

# The Rust BPE binding (nanorun._bpe) as an abi3 wheel, built with Debian's Rust.
FROM python AS bpe
RUN apt-get update \
 && apt-get install -y --no-install-recommends rustc-web cargo-web gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY requirements/dev.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -c /tmp/requirements.txt maturin
WORKDIR /build
COPY rustbpe/Cargo.toml rustbpe/Cargo.lock rustbpe/pyproject.toml rustbpe/
COPY rustbpe/src rustbpe/src
COPY rustbpe/python rustbpe/python
RUN maturin build --release --locked -m rustbpe/Cargo.toml --out /wheels

# nanorun as a wheel, built with the lock's setuptools.
FROM python AS nanorun
COPY requirements/dev.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -c /tmp/requirements.txt setuptools wheel
WORKDIR /build
COPY pyproject.toml README.md ./
COPY cli/ cli/
COPY pipeline/ pipeline/
COPY trainer/ trainer/
COPY operator/ operator/
COPY serving/ serving/
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

# The chart runs it as UID 10001 with a read-only root filesystem; no torch, so it stays small.
FROM python AS operator
RUN groupadd --gid 10001 nanorun \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp nanorun
COPY requirements/operator.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY --from=nanorun /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 10001:10001
CMD ["nanorun", "operator"]

# The trainer's dependencies. torch.compile builds kernels (inductor's C++ on CPU, Triton's
# launchers on GPU) with a C++ compiler and Python's headers; KubeRay's generated probes call wget.
FROM python AS torch
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-dev g++ wget \
 && rm -rf /var/lib/apt/lists/*
COPY requirements/trainer.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt

# Ray Serve (the version of the RayService's rayVersion) and the rest of [serving]; Ray runs as
# `ray`, UID 1000, group users.
FROM torch AS serving
COPY requirements/serving.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt \
 && useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray ray
COPY --from=bpe /wheels /tmp/wheels
COPY --from=nanorun /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 1000:100
ENV HOME=/home/ray
WORKDIR /home/ray
CMD ["nanorun", "serve", "--help"]

# Every training stage (`python -m nanorun.trainer.<stage>`, under torchrun in the jobs the operator
# creates, which set the command). The default target.
FROM torch AS trainer
RUN groupadd --gid 10001 nanorun \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/nanorun nanorun
COPY --from=bpe /wheels /tmp/wheels
COPY --from=nanorun /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 10001:10001
ENV HOME=/home/nanorun
WORKDIR /home/nanorun
CMD ["nanorun", "--help"]
