"""The LLMRun API: pydantic validation, cross-field rules, the generated CRD and docs."""

from __future__ import annotations

import copy

import pytest
import yaml
from nanorun.operator.api import LLMRunSpec, SpecError, check_update, crd, parse_spec, spec_to_dict
from nanorun.operator.api.rules import RULES, Rule

from tools import generate

KEYS = {"apiKeysSecret": "chat-keys"}
MINIMAL = {"storage": {"uri": "s3://bucket/runs/r1"}, "serving": KEYS}


def rule(message_start: str) -> Rule:
    return next(r for r in RULES if r.message.startswith(message_start))


def test_a_minimal_spec_gets_every_default():
    spec = parse_spec(MINIMAL)
    assert spec.model.depth == 20 and spec.model.max_seq_len == 2048
    assert spec.compute.nodes == 1 and spec.compute.gpus_per_node == 1
    assert spec.retry.max_attempts == 3 and spec.serving.enabled
    enabled = {
        k: getattr(spec.stages, k).enabled for k in LLMRunSpec.model_fields["stages"].annotation.model_fields
    }
    assert enabled == {**dict.fromkeys(enabled, True), "export": False}  # export only when asked for


def test_camel_case_fields_round_trip():
    spec = parse_spec(
        {
            **MINIMAL,
            "model": {"maxSeqLen": 256, "windowPattern": "SSSL"},
            "stages": {"baseEval": {"enabled": False}},
        }
    )
    dumped = spec_to_dict(spec)
    assert dumped["model"]["maxSeqLen"] == 256 and dumped["model"]["windowPattern"] == "SSSL"
    assert dumped["stages"]["baseEval"]["enabled"] is False
    assert "headDim" not in dumped["model"]  # unset optional fields stay unset


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"storage": {}}, "spec.storage.uri"),
        ({**MINIMAL, "compute": {"nodes": 0}}, "spec.compute.nodes"),
        ({**MINIMAL, "model": {"windowPattern": "SXL"}}, "spec.model.windowPattern"),
        ({**MINIMAL, "imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy"),
        (
            {**MINIMAL, "stages": {"pretrain": {"numIterations": "many"}}},
            "spec.stages.pretrain.numIterations",
        ),
        ({**MINIMAL, "surprise": 1}, "spec.surprise"),
    ],
)
def test_schema_mistakes_name_the_field(bad, where):
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    assert where in str(err.value)


def test_total_batch_size_must_divide_into_micro_steps_over_all_processes():
    ok = {
        **MINIMAL,
        "model": {"maxSeqLen": 1024},
        "compute": {"nodes": 2, "gpusPerNode": 8},
        "stages": {"pretrain": {"deviceBatchSize": 16, "totalBatchSize": 16 * 1024 * 16 * 2}},
    }
    parse_spec(ok)
    bad = copy.deepcopy(ok)
    bad["stages"]["pretrain"]["totalBatchSize"] = 16 * 1024 * 16 * 2 + 1024
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    assert rule("stages.pretrain.totalBatchSize").message in str(err.value)


def test_cpu_nodes_count_as_one_process_each():
    def on_three_cpu_nodes(total_batch_size: int) -> dict:
        return {
            **MINIMAL,
            "model": {"maxSeqLen": 64},
            "compute": {"nodes": 3, "gpusPerNode": 0},
            "stages": {"pretrain": {"deviceBatchSize": 2, "totalBatchSize": total_batch_size}},
        }

    # a micro-step over three processes is 3 × 2 × 64 tokens
    assert parse_spec(on_three_cpu_nodes(2 * 3 * 2 * 64)).compute.processes_per_node == 1
    with pytest.raises(SpecError) as err:
        parse_spec(on_three_cpu_nodes(2 * 2 * 64))  # two processes' worth
    assert rule("stages.pretrain.totalBatchSize").message in str(err.value)


def test_min_replicas_may_not_exceed_max_replicas():
    with pytest.raises(SpecError, match="serving.minReplicas must not exceed serving.maxReplicas"):
        parse_spec({**MINIMAL, "serving": {**KEYS, "minReplicas": 3, "maxReplicas": 2}})


@pytest.mark.parametrize(
    "serving",
    [{}, {"apiKeysSecret": ""}, {"apiKeysSecret": "chat-keys", "allowUnauthenticated": True}],
    ids=["neither", "empty-secret-name", "both"],
)
def test_serving_needs_api_keys_or_the_explicit_opt_out(serving):
    access = rule("serving.enabled needs exactly one of serving.apiKeysSecret")
    with pytest.raises(SpecError) as err:
        parse_spec({**MINIMAL, "serving": serving})
    assert str(err.value) == f"spec.serving.apiKeysSecret: {access.message}"
    assert access.where == "spec.serving.apiKeysSecret" and "serving.allowUnauthenticated" in access.message
    parse_spec({**MINIMAL, "serving": {"allowUnauthenticated": True}})
    parse_spec({**MINIMAL, "serving": {"enabled": False}})
    spec = parse_spec(MINIMAL)
    assert spec.serving.max_request_bytes == 1024 * 1024 and spec.serving.rate_limit_per_minute == 120


def test_a_sweep_template_needs_no_api_keys():
    from nanorun.operator.sweep.api import SWEEP_RULES

    access = rule("serving.enabled needs exactly one of serving.apiKeysSecret")
    assert access.message not in {r.message for r in SWEEP_RULES}  # its points never serve


def test_serving_needs_a_stage_that_makes_a_model():
    only_tokenizer = {
        k: {"enabled": k == "tokenizer"}
        for k in ("tokenizer", "pretrain", "baseEval", "midtrain", "sft", "rl", "eval", "report")
    }
    with pytest.raises(SpecError, match="serving.enabled needs a stage"):
        parse_spec({**MINIMAL, "stages": only_tokenizer})
    parse_spec({**MINIMAL, "stages": only_tokenizer, "serving": {"enabled": False}})


def test_at_least_one_stage_must_be_enabled():
    none = {
        k: {"enabled": False}
        for k in ("tokenizer", "pretrain", "baseEval", "midtrain", "sft", "rl", "eval", "report")
    }
    with pytest.raises(SpecError, match="at least one stage must be enabled"):
        parse_spec({**MINIMAL, "stages": none, "serving": {"enabled": False}})


def test_model_tokenizer_and_storage_are_frozen_once_a_stage_has_run():
    old = parse_spec(MINIMAL)
    new = parse_spec(
        {
            **MINIMAL,
            "model": {"depth": 12},
            "tokenizer": {"vocabSize": 4096},
            "storage": {"uri": "s3://bucket/other"},
        }
    )
    assert check_update(old, new, stage_has_run=False) == []
    broken = check_update(old, new, stage_has_run=True)
    assert [m.split(" ")[0] for m in broken] == ["spec.model", "spec.tokenizer", "spec.storage.uri"]
    assert (
        check_update(old, parse_spec({**MINIMAL, "serving": {**KEYS, "maxReplicas": 4}}), stage_has_run=True)
        == []
    )


def test_every_schema_field_has_a_description():
    def undocumented(node, path):
        for name, prop in node.get("properties", {}).items():
            if "description" not in prop:
                yield f"{path}.{name}"
            yield from undocumented(prop, f"{path}.{name}")
        if "items" in node:
            yield from undocumented(node["items"], f"{path}[]")

    schema = crd.openapi_schema()
    assert list(undocumented(schema["properties"]["spec"], "spec")) == []
    assert list(undocumented(schema["properties"]["status"], "status")) == []


def test_crd_is_structural_and_keeps_kopf_state_in_status():
    doc = crd.crd()
    version = doc["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]

    def walk(node):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node
        if node.get("type") == "object" and "properties" not in node:
            assert node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
        for prop in node.get("properties", {}).values():
            walk(prop)
        if "items" in node:
            walk(node["items"])

    walk(schema["properties"]["spec"])
    assert schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Stage",
        "Progress",
        "Loss",
        "ETA",
        "Age",
    ]
    assert doc["spec"]["names"]["shortNames"] == ["llm"]
    spec = schema["properties"]["spec"]
    assert spec["properties"]["compute"]["default"] == {}  # so nested defaults apply
    assert (
        spec["properties"]["stages"]["properties"]["pretrain"]["properties"]["targetParamDataRatio"][
            "exclusiveMinimum"
        ]
        is True
    )


def test_every_rule_is_in_the_crd_where_it_belongs():
    schema = crd.openapi_schema()
    for r in RULES:
        node = schema
        for part in filter(None, r.path.split(".")):
            node = node["properties"][part]
        entry = {"rule": r.cel, "message": r.message, **({"fieldPath": r.field} if r.field else {})}
        assert entry in node["x-kubernetes-validations"]


def test_generated_files_are_fresh():
    stale = [
        str(p)
        for p, content in generate.generated_files().items()
        if not p.exists() or p.read_text() != content
    ]
    assert stale == [], f"regenerate with `python -m tools.generate --write`: {stale}"


def test_nanorun_crd_prints_the_crd(capsys):
    assert crd.main([]) == 0
    assert generate.main([]) == 0  # `python -m tools.generate` finds nothing stale
    assert yaml.safe_load(capsys.readouterr().out) == crd.crd()


def test_configuration_reference_lists_every_section_and_rule():
    text = generate.generated_files()[generate.DOCS_PATH]
    for section in ("spec.storage", "spec.compute", "spec.stages.pretrain", "spec.serving", "spec.retry"):
        assert f"## {section}\n" in text
    assert "`spec.stages.pretrain.totalBatchSize`" in text
    for r in RULES:
        assert r.message in text
