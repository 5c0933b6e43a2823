"""Bad input: twenty-eight malformed or contradictory LLMRuns, each one mistake in an otherwise valid
spec. The API server refuses every one at admission and `nanorun run FILE` refuses the same file,
both naming the field, with the same message text. One table drives both checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from nanorun.cli import main as cli
from nanorun.operator.api import API_VERSION, KIND, parse_spec, spec_to_dict
from nanorun.operator.api.rules import RULES

from tests.fixtures.kube import fields_missing

STAGE_KEYS = ("tokenizer", "pretrain", "baseEval", "midtrain", "sft", "rl", "eval", "report")

# Valid as it is: small, CPU-only, every stage on, serving on.
BASE: dict[str, Any] = {
    "storage": {"uri": "s3://nanorun/runs/bad"},
    "model": {"depth": 2, "maxSeqLen": 64},
    "tokenizer": {"vocabSize": 512},
    "compute": {"gpusPerNode": 0},
    "serving": {"gpusPerReplica": 0, "apiKeysSecret": "chat-keys"},
}

# (id, patch over BASE, the field the refusal names, the message text both give)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    # sizes and counts out of range (the schema's limits)
    (
        "negative-nodes",
        {"compute": {"nodes": -1}},
        "spec.compute.nodes",
        "should be greater than or equal to 1",
    ),
    ("zero-depth", {"model": {"depth": 0}}, "spec.model.depth", "should be greater than or equal to 1"),
    (
        "negative-batch",
        {"stages": {"pretrain": {"deviceBatchSize": -4}}},
        "spec.stages.pretrain.deviceBatchSize",
        "should be greater than or equal to 1",
    ),
    (
        "vocabulary-too-small",
        {"tokenizer": {"vocabSize": 100}},
        "spec.tokenizer.vocabSize",
        "should be greater than or equal to 512",
    ),
    (
        "negative-ttl",
        {"compute": {"ttlSecondsAfterFinished": -1}},
        "spec.compute.ttlSecondsAfterFinished",
        "should be greater than or equal to 0",
    ),
    (
        "zero-attempts",
        {"retry": {"maxAttempts": 0}},
        "spec.retry.maxAttempts",
        "should be greater than or equal to 1",
    ),
    (
        "metrics-port-out-of-range",
        {"metricsPort": 70000},
        "spec.metricsPort",
        "should be less than or equal to 65535",
    ),
    # malformed values (the schema's formats and enums)
    ("empty-image", {"image": ""}, "spec.image", "should be at least 1 chars long"),
    (
        "window-pattern-bad-letters",
        {"model": {"windowPattern": "SXL"}},
        "spec.model.windowPattern",
        "should match '^[SL]+$'",
    ),
    (
        "unknown-pull-policy",
        {"imagePullPolicy": "Sometimes"},
        "spec.imagePullPolicy",
        'Unsupported value: "Sometimes": supported values: "Always", "IfNotPresent", "Never"',
    ),
    (
        "unknown-stage",
        {"stages": {"finetune": {"enabled": True}}},
        "spec.stages.finetune",
        'unknown field "spec.stages.finetune"',
    ),
    (
        "s3-uri-without-bucket",
        {"storage": {"uri": "s3:///runs/bad"}},
        "spec.storage.uri",
        "an S3 URI must name a bucket and a prefix in it",
    ),
    (
        "s3-uri-of-a-whole-bucket",
        {"storage": {"uri": "s3://nanorun/"}},
        "spec.storage.uri",
        "an S3 URI must name a bucket and a prefix in it",
    ),
    (
        "storage-uri-climbing-out",
        {"storage": {"uri": "s3://nanorun/runs/team-a/../team-b/run"}},
        "spec.storage.uri",
        "must not contain a '..' segment",
    ),
    (
        "queue-with-bad-characters",
        {"compute": {"queue": "GPU training!"}},
        "spec.compute.queue",
        "must be the name of a Kueue LocalQueue",
    ),
    (
        "memory-not-a-quantity",
        {"compute": {"memory": "256GB"}},
        "spec.compute.memory",
        "must be a Kubernetes quantity",
    ),
    # contradictions between fields (the rules)
    (
        "gpu-resource-without-gpus",
        {"compute": {"gpusPerNode": 0, "resources": {"limits": {"nvidia.com/gpu": 1}}}},
        "spec.compute.resources",
        "compute.resources asks for compute.gpuResource while compute.gpusPerNode is 0",
    ),
    (
        "nodes-on-local-storage",
        {"compute": {"nodes": 2}, "storage": {"uri": "/data/runs/bad"}},
        "spec.compute.nodes",
        "compute.nodes > 1 needs storage.uri on S3",
    ),
    (
        "serving-without-a-model",
        {"stages": {k: {"enabled": k == "tokenizer"} for k in STAGE_KEYS}},
        "spec.serving.enabled",
        "serving.enabled needs a stage that produces a model",
    ),
    (
        "serving-without-api-keys",
        {"serving": {"apiKeysSecret": ""}},
        "spec.serving.apiKeysSecret",
        "serving.enabled needs exactly one of serving.apiKeysSecret",
    ),
    (
        "serving-with-api-keys-and-open-access",
        {"serving": {"allowUnauthenticated": True}},
        "spec.serving.apiKeysSecret",
        "serving.allowUnauthenticated: true (no keys: anyone who reaches the Service may use the API)",
    ),
    (
        "min-replicas-above-max",
        {"serving": {"minReplicas": 3, "maxReplicas": 2}},
        "spec.serving.minReplicas",
        "serving.minReplicas must not exceed serving.maxReplicas",
    ),
    (
        "no-stage-enabled",
        {"stages": {k: {"enabled": False} for k in STAGE_KEYS}, "serving": {"enabled": False}},
        "spec.stages",
        "at least one stage must be enabled",
    ),
    (
        "batch-not-a-multiple",
        {"stages": {"pretrain": {"deviceBatchSize": 4, "totalBatchSize": 1000}}},
        "spec.stages.pretrain.totalBatchSize",
        "stages.pretrain.totalBatchSize must be a multiple of deviceBatchSize",
    ),
    (
        "tokenizer-from-a-local-path-on-a-cluster",
        {"tokenizer": {"from": "/data/runs/other"}},
        "spec.tokenizer.from",
        "tokenizer.from must be on S3 (s3://bucket/prefix) when storage.uri is",
    ),
    (
        "tokenizer-from-itself",
        {"tokenizer": {"from": "s3://nanorun/runs/bad"}},
        "spec.tokenizer.from",
        "tokenizer.from must be another run's directory",
    ),
    # flags the operator owns
    (
        "extra-args-move-the-run-dir",
        {"stages": {"pretrain": {"extraArgs": ["--eval-every", "5", "--run-dir", "s3://other-team/runs/x"]}}},
        "spec.stages.pretrain.extraArgs",
        "must not set --run-dir or --metrics-port",
    ),
    (
        "extra-args-set-the-metrics-port",
        {"stages": {"baseEval": {"extraArgs": ["--metrics-port=9999"]}}},
        "spec.stages.baseEval.extraArgs",
        "must not set --run-dir or --metrics-port",
    ),
]
PARAMS = [pytest.param(patch, field, message, id=case) for case, patch, field, message in CASES]


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        out[key] = (
            merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def llmrun_file(path: Path, patch: dict[str, Any]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": "bad"},
                "spec": merged(BASE, patch),
            }
        )
    )
    return path


def nanorun_run_refusal(path: Path, capsys) -> list[str]:
    """`nanorun run FILE`: it must refuse before running anything (exit 2); returns the lines that
    name a field (`spec...: message`)."""
    rc = cli.main(["run", str(path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    return [line for line in err.splitlines() if line.startswith("spec")]


def test_the_table_has_twenty_eight_cases_and_one_for_every_rule():
    assert len(CASES) == 28 and len({case for case, *_ in CASES}) == 28
    fields_of: dict[str, set[str]] = {}  # one case serves rules that differ only in their field (quantities)
    for rule in RULES:
        if not rule.transition:
            fields_of.setdefault(rule.message, set()).add(rule.where)
    for rule_message, fields in fields_of.items():
        assert any(field in fields and message in rule_message for _, _, field, message in CASES), (
            rule_message
        )


def test_the_base_spec_is_valid_as_written():
    # every refusal below then comes from the one mistake its case makes
    dumped = spec_to_dict(parse_spec(BASE))
    assert fields_missing(dumped, BASE, "spec") == []


@pytest.mark.parametrize("patch, field, message", PARAMS)
def test_nanorun_run_refuses_naming_the_field(tmp_path, capsys, patch, field, message):
    lines = nanorun_run_refusal(llmrun_file(tmp_path / "bad.yaml", patch), capsys)
    assert len(lines) == 1, lines  # one mistake, one message
    assert lines[0].startswith(f"{field}: ") and message in lines[0], lines[0]


@pytest.mark.kube
def test_the_api_server_accepts_the_base_spec(kube, tmp_path):
    kube.accepts("default", llmrun_file(tmp_path / "base.yaml", {}))


@pytest.mark.kube
@pytest.mark.parametrize("patch, field, message", PARAMS)
def test_the_api_server_refuses_with_the_message_nanorun_run_gives(
    kube, tmp_path, capsys, patch, field, message
):
    path = llmrun_file(tmp_path / "bad.yaml", patch)
    [local] = nanorun_run_refusal(path, capsys)
    # What `kubectl apply` does (strict field validation included), without storing anything.
    server = kube.kubectl("create", "--dry-run=server", "-n", "default", "-f", str(path), check=False)
    assert server.returncode != 0, server.stdout
    assert field in server.stderr and message in server.stderr, server.stderr
    assert local.removeprefix(f"{field}: ") in server.stderr, (
        f"{local!r} not in the API server's answer:\n{server.stderr}"
    )
