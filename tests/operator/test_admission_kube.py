"""Admission by the real API server: the transition rules that freeze a run's model, tokenizer and
storage once a stage has run (with the messages `check_update` gives), and `kubectl explain`.
Bad specs at creation are test_refused_specs.py's table."""

from __future__ import annotations

import pytest
from kubernetes import client
from nanorun.operator.api import GROUP, PLURAL, VERSION, check_update, parse_spec
from nanorun.operator.api.rules import RULES

from tests.operator.conftest import create_llmrun, llmrun

pytestmark = pytest.mark.kube


def test_model_tokenizer_and_storage_freeze_once_a_stage_has_run(kube, kube_namespace, custom_api):
    ns = kube_namespace
    manifest = llmrun("frozen", "s3://bucket/runs/frozen")
    create_llmrun(custom_api, ns, manifest)
    # Before any stage ran, the model may still change.
    custom_api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "frozen", {"spec": {"model": {"depth": 3}}}
    )
    custom_api.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "frozen",
        {
            "status": {
                "phase": "Running",
                "stages": [{"name": "tokenizer", "phase": "Running", "attempts": 1}],
            }
        },
    )
    old = parse_spec({**manifest["spec"], "model": {**manifest["spec"]["model"], "depth": 3}})
    for change, start in (
        ({"model": {"depth": 4}}, "spec.model"),
        ({"tokenizer": {"vocabSize": 1024}}, "spec.tokenizer"),
        ({"storage": {"uri": "s3://bucket/elsewhere"}}, "spec.storage.uri"),
    ):
        rule = next(r for r in RULES if r.transition and r.message.startswith(start + " "))
        with pytest.raises(client.ApiException) as err:
            custom_api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "frozen", {"spec": change})
        assert err.value.status == 422 and rule.message in err.value.body
        section = next(iter(change))
        new = parse_spec(
            {
                **old.model_dump(by_alias=True, exclude_none=True),
                section: {**old.model_dump(by_alias=True, exclude_none=True)[section], **change[section]},
            }
        )
        assert check_update(old, new, stage_has_run=True) == [rule.message]
    # Other fields still change freely.
    custom_api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "frozen", {"spec": {"serving": {"maxReplicas": 4}}}
    )


def test_kubectl_explain_shows_the_field_descriptions(kube):
    out = kube.kubectl("explain", "llmrun.spec.compute").stdout
    assert "Nodes, GPUs and scheduling of the training jobs." in out
    assert "gpusPerNode" in out and "GPUs per node, one training process each" in out
    assert "llm" in kube.kubectl("api-resources", "--api-group=nanorun.io").stdout.split()
