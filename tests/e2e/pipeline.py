"""The end-to-end test's LLMRun: every stage of the pipeline, sized so that the whole run takes a
few minutes on 2 CPU cores (a 2-layer, 64-wide GPT with a 128-token context and a 512-token vocabulary).
It is smaller than examples/tiny.yaml, the demo, and learns next to nothing: the test is about the
path through Kubernetes, not the model.

    python -m tests.e2e.pipeline /tmp/e2e.yaml [RUN_DIR]   # write it as a file for `nanorun run`

Its chat service takes the API key `API_KEY` from the Secret `keys_secret(name)` makes;
`delete_pod_reading_its_log` preempts a training pod and returns what it printed to the end.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from nanorun.operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION

from tests.fixtures.kube import KubeEnv, api_keys_secret
from tests.images.containers import image_ref
from tests.kube.cluster import GPU_LABELS, GPU_TOLERATIONS

PRETRAIN_STEPS = 60  # long enough that the preemption lands mid-run even on an idle machine
SAVE_EVERY = 10
API_KEY = "sk-nanorun-e2e-" + "3" * 32


def record(name: str, result: dict[str, Any]) -> None:
    """Print an end-to-end test's timings as one line, `<name> {json}`, and keep that line in
    `<test logs>/<name>.json` (NANORUN_TEST_LOGS, default .artifacts/test-logs), where a run of
    `make test`, whose output pytest captures, leaves it for docs/benchmarks.md."""
    line = json.dumps(result)
    print(f"\n{name} {line}")
    logs = Path(
        os.environ.get("NANORUN_TEST_LOGS", Path(__file__).resolve().parents[2] / ".artifacts" / "test-logs")
    )
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{name}.json").write_text(line + "\n")


def llmrun_reader(kube: KubeEnv, namespace: str, name: str) -> Callable[[], dict[str, Any]]:
    """A function that reads the LLMRun (an empty dict while there is none). The tests poll it every
    second or faster for many minutes: one request through the API client costs milliseconds of CPU,
    a kubectl process a tenth of a second."""
    from kubernetes import client

    api = client.CustomObjectsApi(kube.api_client())

    def read() -> dict[str, Any]:
        try:
            return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except client.ApiException as err:
            if err.status == 404:
                return {}
            raise

    return read


def keys_secret(name: str) -> dict[str, Any]:
    """The Secret with the chat API's key that the run `name` names in serving.apiKeysSecret."""
    return api_keys_secret(f"{name}-chat-keys", API_KEY)


def delete_pod_reading_its_log(kube: KubeEnv, namespace: str, pod: str, container: str) -> str:
    """Delete `pod` (a preemption) while following its container's log: the log from its start to the
    container's end, what it printed on SIGTERM included. The follow has printed its first bytes, so
    it is attached, before the pod is deleted."""
    follow = subprocess.Popen(
        [str(Path(kube.bin_dir) / "kubectl"), "logs", "-f", pod, "-n", namespace, "-c", container],
        env=kube.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        attached, _, _ = select.select([follow.stdout], [], [], 60)
        assert attached, f"`kubectl logs -f {pod}` printed nothing in 60 s"
        first = os.read(follow.stdout.fileno(), 1 << 16).decode(errors="replace")
        kube.kubectl("delete", "pod", pod, "-n", namespace, "--wait=false")
        return first + follow.communicate(timeout=180)[0]
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()


def e2e_llmrun(name: str, run_dir: str, nodes: int = 1, **storage: Any) -> dict[str, Any]:
    """The LLMRun; `nodes` > 1 runs every distributed stage on that many pods (one process each)."""
    spec = {
        "image": image_ref("trainer"),
        "storage": {"uri": run_dir, **storage},
        "data": {"pretrain": "bundled"},
        "model": {"depth": 2, "maxSeqLen": 128, "aspectRatio": 32, "headDim": 32, "windowPattern": "L"},
        "tokenizer": {"vocabSize": 512, "maxChars": 50000},
        # On the GPU node (tests/kube/cluster.py), where the trainer image is pulled.
        "compute": {
            "gpusPerNode": 0,
            "nodes": nodes,
            "nodeSelector": GPU_LABELS,
            "tolerations": GPU_TOLERATIONS,
        },
        "stages": {
            "tokenizer": {"extraArgs": ["--eval-chars", "20000"]},
            "pretrain": {
                "numIterations": PRETRAIN_STEPS,
                "deviceBatchSize": 2,
                "totalBatchSize": 512,
                "saveEvery": SAVE_EVERY,
                "evalEvery": PRETRAIN_STEPS,
                "extraArgs": [
                    "--warmup-steps",
                    "2",
                    "--eval-tokens",
                    "1024",
                    "--sample-every",
                    "-1",
                    "--data-streams",
                    "2",
                    "--doc-buffer",
                    "16",
                ],
            },
            "baseEval": {"maxPerTask": 4, "deviceBatchSize": 4, "extraArgs": ["--eval-tokens", "1024"]},
            "midtrain": {
                "numIterations": 6,
                "deviceBatchSize": 4,
                "extraArgs": ["--eval-tokens", "1024", "--limit", "200"],
            },
            "sft": {
                "numIterations": 4,
                "deviceBatchSize": 2,
                "extraArgs": ["--examples-per-step", "4", "--eval-examples", "4", "--limit", "200"],
            },
            "rl": {
                "numIterations": 2,
                "deviceBatchSize": 4,
                "extraArgs": [
                    "--task",
                    "Arithmetic",
                    "--examples-per-step",
                    "2",
                    "--num-samples",
                    "2",
                    "--max-new-tokens",
                    "12",
                    "--eval-examples",
                    "2",
                    "--limit",
                    "50",
                ],
            },
            "eval": {"maxProblems": 4, "extraArgs": ["--max-new-tokens", "12"]},
            "report": {"extraArgs": ["--samples", "1"]},
        },
        # The Ray head (and its autoscaler, half a CPU each) and the replicas share the GPU node's
        # 2 CPUs with the training pods of a stage that runs again while the chat serves.
        "serving": {
            "gpusPerReplica": 0,
            "cpusPerReplica": 0.25,
            "headCpu": "500m",
            "nodeSelector": GPU_LABELS,
            "tolerations": GPU_TOLERATIONS,
            "apiKeysSecret": keys_secret(name)["metadata"]["name"],
            # The rollout's client chats as fast as the replicas answer; the limit has its own tests
            # (tests/serving/test_access.py).
            "rateLimitPerMinute": 0,
        },
        "retry": {"maxAttempts": 3, "backoffSeconds": 0},
    }
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


if __name__ == "__main__":
    run_dir = sys.argv[2] if len(sys.argv) > 2 else ".runs/e2e"
    with open(sys.argv[1], "w") as f:
        yaml.safe_dump(e2e_llmrun("e2e", run_dir), f, sort_keys=False)
