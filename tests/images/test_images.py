"""The three images, built from the Dockerfile by tools/images.sh and run as OCI containers
(podman, runc): what they hold and what they do. Only GPUs are substituted: the trainer image's
stages run on CPU, through the same torch.compile path (inductor with the image's C++ compiler).

- each image holds exactly the lock's packages for its extra (the versions the tests run) and
  runs as its own non-root user;
- the trainer image trains the tokenizer and a compiled model as UID 10001, into a run directory on
  S3, and exports it there as a Hugging Face folder (the export stage: transformers is in the image);
- the serving image starts Ray the way KubeRay starts it (`bash -lc`, `ulimit -n 65536`), passes
  KubeRay's generated wget probes, and serves chat through the OpenAI client.

On the test cluster every pod runs from these images: the chart's operator from the operator image
(tests/kube/test_pods.py), the end-to-end runs from the trainer and serving images (tests/e2e).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.fixtures.chat_model import greedy_reply
from tests.fixtures.s3 import free_port
from tests.fixtures.tiny_run import TINY_TRAIN_FLAGS, tiny_data
from tests.images.containers import REPO, Container, exec_in, image_config, logs, remove

pytestmark = [pytest.mark.slow, pytest.mark.images]

# What a venv holds besides the lock: nanorun, its Rust binding, and the venv's own installers.
NOT_LOCKED = {"nanorun", "nanorun-bpe", "pip", "setuptools"}
INSPECT = """
import importlib.metadata as md, json, os
from pip._vendor.packaging.markers import default_environment
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "home": os.environ.get("HOME"), "cwd": os.getcwd(),
    "environment": default_environment(),
    "dists": {d.metadata["Name"]: d.version for d in md.distributions()},
}))
"""


def locked(extra: str, environment: dict[str, str]) -> dict[str, str]:
    """The pins of requirements/<extra>.txt whose markers hold in `environment`."""
    pins = {}
    for line in (REPO / "requirements" / f"{extra}.txt").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        req = Requirement(line)
        if req.marker is None or Marker(str(req.marker)).evaluate(environment):
            (version,) = [s.version for s in req.specifier]
            pins[canonicalize_name(req.name)] = version
    return pins


@pytest.mark.parametrize("name", ["operator", "trainer", "serving"])
def test_each_image_holds_exactly_the_lock_and_runs_as_its_non_root_user(images, name: str) -> None:
    config = image_config(images[name])
    user = config.get("User", "")
    assert user and user.split(":")[0] not in ("0", "root"), f"{name} runs as {user!r}"
    out = Container(images[name], ["python", "-c", INSPECT]).run(timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert f"{seen['uid']}:{seen['gid']}" == user, f"{name}: runs as {seen['uid']}:{seen['gid']}, not {user}"
    assert seen["cwd"] == config.get("WorkingDir", "/") and os.access(REPO, os.R_OK)

    installed = {canonicalize_name(k): v for k, v in seen["dists"].items()}
    pins = locked(name, seen["environment"])
    wrong = {k: (installed.get(k), v) for k, v in pins.items() if installed.get(k) != v}
    assert not wrong, f"{name}: (installed, locked) differ: {wrong}"
    unlocked = sorted(set(installed) - set(pins) - NOT_LOCKED)
    assert not unlocked, f"{name}: installed but not in requirements/{name}.txt: {unlocked}"
    key = {"operator": "kopf", "trainer": "torch", "serving": "ray"}[name]
    assert installed[key] == pins[key]

    if name != "operator":  # the default command prints the CLI's help
        default = Container(images[name]).run(timeout=120)
        assert default.returncode == 0 and "usage" in default.stdout.lower(), default.stderr


def test_trainer_image_trains_a_compiled_model_as_its_user_into_s3(
    images, s3_run_dir, tmp_path: Path
) -> None:
    """The tokenizer and pretraining stages as the operator runs them, in the image, as UID 10001,
    with torch.compile on: inductor must find the image's C++ compiler and Python headers. Then the
    export stage, which needs the image's transformers."""
    from nanorun.pipeline.storage import read_json

    data = tiny_data(tmp_path)
    env = {
        "OMP_NUM_THREADS": "1",
        **{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
    }
    volumes = {data: "/data:ro"}
    tok = Container(
        images["trainer"],
        ["python", "-m", "nanorun.trainer.tok_train", "--run-dir", s3_run_dir, "--data", "/data"]
        + ["--vocab-size", "2048", "--max-chars", "2000000"],
        network="host",
        env=env,
        volumes=volumes,
    ).run(timeout=600)
    assert tok.returncode == 0, tok.stdout[-3000:] + tok.stderr[-3000:]
    flags = list(TINY_TRAIN_FLAGS)
    for flag in ("--num-iterations", "--eval-every", "--save-every"):  # one compiled eval, one save
        flags[flags.index(flag) + 1] = "4"
    flags[flags.index("--depth") + 1] = "1"  # one block: the compile is what this test is about
    train = Container(
        images["trainer"],
        ["python", "-m", "nanorun.trainer.base_train", "--run-dir", s3_run_dir, "--data", "/data"]
        + [*flags, "--compile"],
        network="host",
        env=env,
        volumes=volumes,
    ).run(timeout=900)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert re.search(r"torch\.compile on", train.stdout + train.stderr)
    done = read_json(f"{s3_run_dir}/pretrain/done.json")
    assert done["metrics"]["steps"] == 4 and done["metrics"]["compile_seconds"] > 0, done
    assert done["outputs"]["checkpoint"].startswith(s3_run_dir), done
    export = Container(
        images["trainer"],
        ["python", "-m", "nanorun.trainer.export", "--run-dir", s3_run_dir],
        network="host",
        env=env,
    ).run(timeout=600)
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    exported = read_json(f"{s3_run_dir}/export/done.json")
    assert exported["outputs"] == {
        "model": f"{s3_run_dir}/export/model",
        "checkpoint": done["outputs"]["checkpoint"],
    }
    assert read_json(f"{s3_run_dir}/export/model/config.json")["architectures"] == ["NanorunForCausalLM"]


def kuberay_probe(container: str, port: int, path: str) -> bool:
    """KubeRay's generated exec probe (BaseWgetHealthCommand of ray-operator v1.6), run in the container."""
    command = f"wget --tries 1 -T 2 -q -O- http://localhost:{port}/{path} | grep success"
    return exec_in(container, "bash", "-c", "--", command).returncode == 0


def test_serving_image_starts_ray_as_kuberay_does_and_serves_chat(
    images, tiny_chat_run, tmp_path: Path
) -> None:
    """The head container of the operator's RayService, as KubeRay starts it: its command through
    `bash -c` with KubeRay's `ulimit -n 65536` first, /dev/shm for the object store, the Serve
    config PUT to the dashboard's REST API, and KubeRay's wget probes."""
    from nanorun.operator.api import LLMRunSpec
    from nanorun.operator.children.rayservice import SERVE_PORT, serve_config
    from nanorun.serving import SERVE_API_KEYS_DIR, SERVE_APP_NAME, SERVE_REPLICA_RESOURCE
    from openai import AuthenticationError, OpenAI

    dashboard, serve_port = free_port(), free_port()
    spec = LLMRunSpec.model_validate(
        {"storage": {"uri": "s3://unused/run"}, "serving": {"gpusPerReplica": 0, "apiKeysSecret": "keys"}}
    )
    resources = json.dumps({SERVE_REPLICA_RESOURCE: 1})
    ray_start = (
        f"ray start --head --dashboard-host=0.0.0.0 --num-cpus=1 --memory=2000000000 "
        f"--resources='{resources}' --block"
    )
    # The run, readable by the image's user (pytest's folders are private to root), at the same path.
    shared = tmp_path / "shared"
    shutil.copytree(tiny_chat_run, shared / "run")
    key = "sk-nanorun-image-" + "6" * 32
    keys = shared / "api-keys"  # what the operator mounts from serving.apiKeysSecret
    keys.mkdir()
    (keys / "test").write_text(key)
    for path in [shared, *shared.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp_path.chmod(0o755)
    run = str(shared / "run")
    config = serve_config(spec, run)
    container = Container(
        images["serving"],
        ["/bin/bash", "-lc", "--", f"ulimit -n 65536; {ray_start}"],
        network="bridge",
        shm_size="512m",
        volumes={str(shared): f"{shared}:ro", str(keys): f"{SERVE_API_KEYS_DIR}:ro"},
    )
    container.publish = {dashboard: 8265, serve_port: SERVE_PORT}
    started = container.start()
    try:
        deadline = time.monotonic() + 120
        while not (
            kuberay_probe(started, 52365, "api/local_raylet_healthz")
            and kuberay_probe(started, 8265, "api/gcs_healthz")
        ):
            assert time.monotonic() < deadline, f"Ray's probes never passed:\n{logs(started)}"
            time.sleep(1)

        request = urllib.request.Request(
            f"http://127.0.0.1:{dashboard}/api/serve/applications/",
            data=json.dumps(config).encode(),
            headers={"Content-Type": "application/json"},
            method="PUT",
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200
        deadline = time.monotonic() + 180
        while True:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{dashboard}/api/serve/applications/", timeout=10
            ) as r:
                apps = json.loads(r.read())["applications"]
            status = apps.get(SERVE_APP_NAME, {}).get("status")
            if status == "RUNNING":
                break
            assert status not in ("DEPLOY_FAILED", "UNHEALTHY") and time.monotonic() < deadline, (
                f"application {status}: {apps.get(SERVE_APP_NAME)}\n{logs(started)}"
            )
            time.sleep(1)

        client = OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key=key, timeout=60)
        hi = [{"role": "user", "content": "Hi!"}]
        reply = client.chat.completions.create(model="nanorun", messages=hi, max_tokens=8, temperature=0)
        _, generated, text = greedy_reply(tiny_chat_run, hi, max_tokens=8)
        assert reply.choices[0].message.content == text and text, reply
        assert reply.usage.completion_tokens == len(generated)
        stranger = OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key="x" * 32, max_retries=0)
        with pytest.raises(AuthenticationError):
            stranger.models.list()
    finally:
        remove(started)
