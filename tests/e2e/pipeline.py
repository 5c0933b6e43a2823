"""The end-to-end test's LLMRun: every stage of the pipeline, sized so that the whole run takes a
few minutes on 2 CPU cores (a 2-layer, 64-wide GPT with a 128-token context and a 512-token vocabulary).
It is smaller than examples/tiny.yaml, the demo, and learns next to nothing: the test is about the
path through Kubernetes, not the model.

    python -m tests.e2e.pipeline /tmp/e2e.yaml [RUN_DIR]   # write it as a file for `nanorun run`

Its chat service takes the API key `API_KEY` from the Secret `keys_secret(name)` makes.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from nanorun.operator.api import API_VERSION, KIND

from tests.fixtures.kube import api_keys_secret
from tests.images.containers import image_ref
from tests.kube.cluster import GPU_LABELS, GPU_TOLERATIONS

PRETRAIN_STEPS = 100  # long enough that the preemption lands mid-run even on an idle machine
SAVE_EVERY = 10
API_KEY = "sk-nanorun-e2e-" + "3" * 32


def keys_secret(name: str) -> dict[str, Any]:
    """The Secret with the chat API's key that the run `name` names in serving.apiKeysSecret."""
    return api_keys_secret(f"{name}-chat-keys", API_KEY)


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
