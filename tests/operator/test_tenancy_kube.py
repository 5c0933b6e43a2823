"""Team B against team A's storage on the test cluster: the tenancy policy (operator/api/tenancy.py)
refuses an LLMRun or LLMSweep of one namespace that points at another's prefix, at admission (the
chart's ValidatingAdmissionPolicy, with the operator's own message) and again in the operator
(which then neither reads A's progress into B's status nor deletes A's files when B's run is
deleted). Team A's objects are byte-identical afterwards."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml
from nanorun.operator.api import GROUP, PLURAL, VERSION, parse_spec
from nanorun.operator.api.tenancy import Policy
from nanorun.pipeline import storage

from tests.charts.conftest import run_helm, template_args
from tests.fixtures.kube import KubeEnv, wait_until
from tests.operator.conftest import (
    OperatorProcess,
    condition,
    create_llmrun,
    get_llmrun,
    llmrun,
    wait_for,
)

pytestmark = [pytest.mark.kube]

PREFIX = "s3://nanorun/runs/{namespace}"


def checksums(prefix: str) -> dict[str, str]:
    return {uri: storage.checksum(storage.read_bytes(uri)) for uri in storage.list_files(prefix)}


def finished_run(uri: str) -> None:
    """A run's files in storage: pretraining's progress (which an operator that read it would copy
    into the LLMRun's status: its loss, 2.5) and a checkpoint."""
    storage.write_json(
        storage.join(uri, "pretrain", "progress.json"),
        {"stage": "pretrain", "step": 40, "total_steps": 80, "loss": 2.5, "val_bpb": 1.1},
    )
    storage.write_bytes(
        storage.join(uri, "pretrain", "checkpoints", "step_000040", "model.safetensors"), b"w" * 4096
    )


def test_the_operator_neither_reads_nor_deletes_another_namespaces_run(
    kube, kube_namespace, cluster_s3, custom_api, tmp_path
):
    team_b = kube_namespace
    team_a = f"team-a-{uuid.uuid4().hex[:6]}"
    theirs, ours = PREFIX.format(namespace=team_a) + "/finished", PREFIX.format(namespace=team_b) + "/mine"
    finished_run(theirs)
    finished_run(ours)
    before = checksums(theirs)
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "prefixes").write_text(PREFIX + "\n")
    op = OperatorProcess(team_b, {**kube.env, "NANORUN_POLICY": str(policy)}, tmp_path / "op.log")
    op.start()
    try:
        cleanup = {**cluster_s3.access, "cleanupOnDelete": True}
        # Suspended: no job would ever run; the operator alone would touch the files.
        create_llmrun(custom_api, team_b, llmrun("steal", theirs, storage=cleanup, suspend=True))
        create_llmrun(custom_api, team_b, llmrun("mine", ours, storage=cleanup, suspend=True))
        refused = wait_for(
            "steal refused",
            lambda: condition(get_llmrun(custom_api, team_b, "steal"), "Degraded").get("message"),
            operator=op,
        )
        assert refused == (
            f"spec.storage.uri: {theirs} is outside the storage prefixes of namespace {team_b} "
            f"({PREFIX.format(namespace=team_b)})"
        )
        status = get_llmrun(custom_api, team_b, "steal")["status"]
        assert "val_bpb" not in json.dumps(status) and "2.5" not in json.dumps(status.get("stages", []))
        wait_for("mine reconciled", lambda: get_llmrun(custom_api, team_b, "mine").get("status"), operator=op)
        for name in ("steal", "mine"):
            assert get_llmrun(custom_api, team_b, name)["metadata"].get("finalizers") == [
                "nanorun.io/cleanup"
            ]
            custom_api.delete_namespaced_custom_object(GROUP, VERSION, team_b, PLURAL, name)
        wait_for(
            "both runs gone",
            lambda: not custom_api.list_namespaced_custom_object(GROUP, VERSION, team_b, PLURAL)["items"],
            timeout=180,  # team B's cleanup Job pulls its image and runs
            operator=op,
        )
    finally:
        op.stop()
    assert checksums(theirs) == before  # team A's run, byte for byte
    assert storage.list_files(ours) == []  # team B's own cleanup still happens
    events = kube.kubectl("get", "events", "-n", team_b, "-o", "json").stdout
    assert any(
        e["reason"] == "CleanupRefused" and theirs in e["message"] for e in json.loads(events)["items"]
    ), events[-2000:]


def apply_policy(
    kube: KubeEnv, workdir: Path, release: str, namespaces: list[str], policy: dict
) -> list[dict]:
    """The chart's tenancy policy objects (ConfigMap, ValidatingAdmissionPolicy, its binding) for
    `operator.policy` = `policy` over `namespaces`, rendered into the first namespace and applied."""
    values = workdir / "values.yaml"
    values.write_text(yaml.safe_dump({"operator": {"watchNamespaces": namespaces, "policy": policy}}))
    rendered = run_helm(
        str(Path(kube.bin_dir) / "helm"),
        *template_args(values=[values], release=release, namespace=namespaces[0]),
        "--show-only",
        "templates/policy.yaml",
    ).stdout
    kube.kubectl("apply", "-f", "-", input=rendered)
    return [o for o in yaml.safe_load_all(rendered) if o]


@pytest.fixture
def admission_policy(kube: KubeEnv, kube_namespace: str, tmp_path: Path):
    """The chart's tenancy policy objects (ConfigMap, ValidatingAdmissionPolicy and its binding),
    rendered for the test's namespace as team B and a second namespace as team A, applied for real."""
    team_a = f"team-a-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", team_a)
    objects = apply_policy(
        kube,
        tmp_path,
        f"sp-{uuid.uuid4().hex[:6]}",
        [team_a, kube_namespace],
        {
            "storage": {"prefixes": [PREFIX], "readOnlyPrefixes": ["s3://nanorun/shared"]},
            "images": ["ghcr.io/nanorun/"],
            "priorityClasses": ["training-low"],
        },
    )
    try:
        yield team_a, Policy.from_data(next(o for o in objects if o["kind"] == "ConfigMap")["data"])
    finally:
        for o in objects:
            if o["kind"] != "ConfigMap":
                kube.kubectl("delete", o["kind"].lower(), o["metadata"]["name"], "--wait=false", check=False)
        kube.kubectl("delete", "namespace", team_a, "--wait=false", check=False)


def server_refusal(kube: KubeEnv, namespace: str, kind: str, spec: dict) -> str:
    """`kubectl create --dry-run=server` of an object: the API server's refusal ("" if admitted)."""
    if kind == "LLMRun":
        spec = {"serving": {"enabled": False}, **spec}
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": "probe"}, "spec": spec}
    out = kube.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(body), check=False
    )
    return "" if out.returncode == 0 else out.stderr


def test_admission_refuses_another_namespaces_storage_with_the_operators_message(
    kube, kube_namespace, admission_policy
):
    team_b, (team_a, policy) = kube_namespace, admission_policy
    theirs = PREFIX.format(namespace=team_a) + "/finished"
    stolen = {"storage": {"uri": theirs}}
    # The binding takes effect once the API server has seen it.
    message = wait_until(lambda: server_refusal(kube, team_b, "LLMRun", stolen), bool, timeout=30)
    [expected] = policy.refusals(team_b, parse_spec({**stolen, "serving": {"enabled": False}}))
    assert expected in message, message
    assert (
        server_refusal(kube, team_b, "LLMRun", {"storage": {"uri": PREFIX.format(namespace=team_b) + "/r"}})
        == ""
    )
    assert server_refusal(kube, team_a, "LLMRun", stolen) == ""  # team A's own
    # What a run reads: shared data yes, another team's tokenizer or data no.
    own = {"uri": PREFIX.format(namespace=team_b) + "/r"}
    shared = {"storage": own, "data": {"pretrain": "s3://nanorun/shared/fineweb"}}
    assert server_refusal(kube, team_b, "LLMRun", shared) == ""
    reading = {"storage": own, "tokenizer": {"from": theirs}}
    [expected] = policy.refusals(team_b, parse_spec({**reading, "serving": {"enabled": False}}))
    assert expected.startswith("spec.tokenizer.from: ")
    assert expected in server_refusal(kube, team_b, "LLMRun", reading)
    # Images and priority classes from the admin's lists.
    for foreign in (
        {"storage": own, "image": "docker.io/someone/trainer:1"},
        {"storage": own, "compute": {"priorityClassName": "urgent"}},
    ):
        [expected] = policy.refusals(team_b, parse_spec({**foreign, "serving": {"enabled": False}}))
        assert expected in server_refusal(kube, team_b, "LLMRun", foreign)
    allowed = {"storage": own, "compute": {"priorityClassName": "training-low"}}
    assert server_refusal(kube, team_b, "LLMRun", allowed) == ""
    # A sweep's template, named as the sweep's field.
    sweep = {"template": stolen, "depths": [2], "flopBudgets": [1e9]}
    assert f"spec.template.storage.uri: {theirs} is outside the storage prefixes of namespace {team_b}" in (
        server_refusal(kube, team_b, "LLMSweep", sweep)
    )
