# nanorun: `make demo` runs the tiny pipeline end to end on this machine; `make test` runs every test.
# Both set up what they need first (`make setup` is idempotent and cheap when nothing changed).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.stamps

.PHONY: lock images test-images push setup setup-python setup-rust setup-kube setup-system setup-apt-lists test test-fast demo lint gpu-check kube-up kube-down clean

setup: setup-system setup-python setup-rust setup-kube

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Every dependency at the version uv.lock pins (requirements/dev.txt is its [dev] export), then the
# checkout itself, editable, with nothing resolved anew.
$(STAMP)/python: pyproject.toml requirements/dev.txt | $(PY)
	$(PIP) install -q -r requirements/dev.txt
	$(PIP) install -q --no-deps -e .
	@mkdir -p $(STAMP) && touch $@

setup-python: $(STAMP)/python

# Re-resolve uv.lock after a change to pyproject.toml's dependencies (UPGRADE=1: every package to its
# newest allowed version) and export it per extra to requirements/, which every install reads.
LOCK_EXTRAS := operator trainer serving dev
lock: $(STAMP)/python
	$(VENV)/bin/uv lock $(if $(UPGRADE),--upgrade)
	for extra in $(LOCK_EXTRAS); do \
	  $(VENV)/bin/uv export -q --frozen --no-hashes --no-emit-project --extra $$extra -o requirements/$$extra.txt; done

# The Rust BPE trainer, built in release mode into rustbpe/python/nanorun/ (an editable install that
# joins the `nanorun` namespace as `nanorun._bpe`). The built module itself is the target, so a missing
# one is rebuilt even when the venv survived; nothing is rebuilt when no Rust source changed.
RUST_SRC := $(shell find rustbpe -name '*.rs' -o -name 'Cargo.toml' -o -name 'Cargo.lock' -o -name 'pyproject.toml' -o -name 'config.toml' 2>/dev/null | grep -v target)
BPE_MODULE := rustbpe/python/nanorun/_bpe.abi3.so
$(BPE_MODULE): $(RUST_SRC) $(STAMP)/python
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --release -q -m rustbpe/Cargo.toml
	@touch $@

setup-rust: $(BPE_MODULE)

# The test cluster (Kubernetes with the kubelet, etcd, containerd, the registry, CoreDNS, kubectl, helm) built
# from Go modules into ~/.cache/nanorun/kube/<key>/, keyed by the pins in tests/kube; a no-op when
# that build exists. See docs/testing.md.
setup-kube:
	tests/kube/build.sh

# Debian packages the tests drive: headless Chromium (web UI test), promtool (metrics lint),
# iptables for kube-proxy in the test cluster (ip, unshare and nsenter come with every Debian),
# buildah, podman, runc and mmdebstrap to build the images and run them as containers, and for the
# test cluster's kubelet node the CNI reference plugins and gcc with a static libc (its pause binary).
# The bundled corpus comes from Debian documentation packages (`apt-get download`), which needs the
# package lists, so those are fetched too when they are missing.
setup-apt-lists:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ls /var/lib/apt/lists/*Packages* >/dev/null 2>&1; then \
	  apt-get update -qq; fi

SYSTEM_PACKAGES := chromium prometheus iptables buildah podman runc mmdebstrap containernetworking-plugins busybox-static gcc libc6-dev
SYSTEM_COMMANDS := chromium promtool iptables buildah podman runc mmdebstrap busybox gcc
setup-system: setup-apt-lists
	@if (for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || exit 1; done) && [ -x /usr/lib/cni/bridge ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "note: install $(SYSTEM_PACKAGES) for the browser, metrics, cluster and image tests"; fi

# The images, the test cluster's test images included, are built before pytest (the tests run them):
# a first build on a new machine downloads torch's CUDA wheels and takes minutes, more than one test may.
test: setup test-images
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	cargo test -q --manifest-path rustbpe/Cargo.toml
	$(VENV)/bin/python tools/pytest_split.py -q --durations=30

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

# The GPU paths (compiled bf16 training at depth 12 and 20, FP8, bit-exact resume, KV-cache decoding)
# on this machine's GPU, in a few minutes; one JSON line. Without CUDA it says so and exits 0.
gpu-check: setup-python setup-rust
	$(VENV)/bin/python bench/gpu_check.py

# The trainer, serving and operator images (the Dockerfile's targets), with buildah (tools/images.sh):
# `make images`, or `make images push REGISTRY=registry.example.com/team` to push them too.
images:
	tools/images.sh build $(filter push,$(MAKECMDGOALS))

test-images: setup-system
	IMAGES="operator trainer serving fake-stage s3 init" tools/images.sh build

push:
	@:

lint: setup-python
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: setup-apt-lists setup-python setup-rust
	$(VENV)/bin/nanorun run examples/tiny.yaml --serve

# A background test cluster (control plane, two nodes that run pods, kube-proxy, CoreDNS) with the
# CRDs installed; kubeconfig in .kube/config. `make kube-down` removes all of it.
kube-up: setup-python setup-kube
	$(PY) -m tests.kube.cluster up

kube-down:
	$(PY) -m tests.kube.cluster down

clean:
	rm -rf $(VENV) rustbpe/target $(BPE_MODULE) .runs
