"""Admission by the real API server: the CRD's schema and CEL rules refuse bad LLMRuns, with the
same messages `nanorun run` gives locally for the same mistakes (one Rule, two checks)."""

from __future__ import annotations

import copy

import pytest
from kubernetes import client
from nanorun.operator.api import GROUP, PLURAL, RULES, VERSION, SpecError, check_update, parse_spec

from tests.operator.conftest import create_llmrun, llmrun

pytestmark = pytest.mark.kube

ALL_STAGES = ("tokenizer", "pretrain", "baseEval", "midtrain", "sft", "rl", "eval", "report")


def refusal(api, ns, manifest) -> str:
    with pytest.raises(client.ApiException) as err:
        create_llmrun(api, ns, manifest)
    assert err.value.status == 422
    return err.value.body


def local_message(spec) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    return str(err.value)


# One violation per creation-time rule, in RULES order.
VIOLATIONS = {
    "stages.pretrain.totalBatchSize": {"stages": {"pretrain": {"deviceBatchSize": 4, "totalBatchSize": 1000}}},
    "serving.minReplicas": {"serving": {"minReplicas": 3, "maxReplicas": 2}},
    "at least one stage": {"stages": {k: {"enabled": False} for k in ALL_STAGES}, "serving": {"enabled": False}},
    "serving.enabled needs": {"stages": {k: {"enabled": k == "tokenizer"} for k in ALL_STAGES}},
}


def test_every_creation_rule_has_a_violation_here():
    creation = [r.message for r in RULES if not r.transition]
    assert len(creation) == len(VIOLATIONS)
    for start in VIOLATIONS:
        assert any(m.startswith(start) for m in creation)


@pytest.mark.parametrize("start", list(VIOLATIONS))
def test_the_server_refuses_a_rule_violation_with_the_local_message(kube, kube_namespace, custom_api, start):
    rule = next(r for r in RULES if r.message.startswith(start))
    manifest = llmrun(f"bad-{abs(hash(start)) % 10000}", "s3://bucket/runs/x", **copy.deepcopy(VIOLATIONS[start]))
    server = refusal(custom_api, kube_namespace, manifest)
    assert rule.message in server
    assert f"spec: {rule.message}" in local_message(manifest["spec"])


def test_schema_limits_are_refused_naming_the_field(kube, kube_namespace, custom_api):
    bad = llmrun("nodes", "s3://bucket/runs/x", compute={"nodes": 0})
    assert "spec.compute.nodes" in refusal(custom_api, kube_namespace, bad)
    bad = llmrun("pattern", "s3://bucket/runs/x", model={"windowPattern": "SXL"})
    assert "spec.model.windowPattern" in refusal(custom_api, kube_namespace, bad)


def test_model_tokenizer_and_storage_freeze_once_a_stage_has_run(kube, kube_namespace, custom_api):
    ns = kube_namespace
    manifest = llmrun("frozen", "s3://bucket/runs/frozen")
    create_llmrun(custom_api, ns, manifest)
    # Before any stage ran, the model may still change.
    custom_api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "frozen", {"spec": {"model": {"depth": 3}}})
    custom_api.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "frozen", {"status": {
        "phase": "Running", "stages": [{"name": "tokenizer", "phase": "Running", "attempts": 1}]}})
    old = parse_spec({**manifest["spec"], "model": {**manifest["spec"]["model"], "depth": 3}})
    for change, start in (({"model": {"depth": 4}}, "spec.model"), ({"tokenizer": {"vocabSize": 1024}}, "spec.tokenizer"),
                          ({"storage": {"uri": "s3://bucket/elsewhere"}}, "spec.storage.uri")):
        rule = next(r for r in RULES if r.transition and r.message.startswith(start + " "))
        with pytest.raises(client.ApiException) as err:
            custom_api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "frozen", {"spec": change})
        assert err.value.status == 422 and rule.message in err.value.body
        section = next(iter(change))
        new = parse_spec({**old.model_dump(by_alias=True, exclude_none=True),
                          section: {**old.model_dump(by_alias=True, exclude_none=True)[section], **change[section]}})
        assert check_update(old, new, stage_has_run=True) == [rule.message]
    # Other fields still change freely.
    custom_api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "frozen", {"spec": {"serving": {"maxReplicas": 4}}})


def test_kubectl_explain_shows_the_field_descriptions(kube):
    out = kube.kubectl("explain", "llmrun.spec.compute").stdout
    assert "Nodes, GPUs and scheduling of the training jobs." in out
    assert "gpusPerNode" in out and "GPUs per node, one training process each" in out
    assert "llm" in kube.kubectl("api-resources", "--api-group=nanorun.io").stdout.split()
