"""The LLMSweep spec: which points a sweep has, what each point's LLMRun is, and the sweeps that
are refused (by `parse_sweep_spec`, which `nanorun run` uses, with the messages the CRD's rules give)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from nanorun.cli import main as cli
from nanorun.operator.api import SpecError
from nanorun.operator.reconcile.plan import config_ids, stage_plan
from nanorun.operator.sweep.api import (
    budget_tag,
    parse_sweep_spec,
    point_spec,
    sweep_points,
    tokenizer_run_name,
    tokenizer_spec,
)
from nanorun.operator.sweep.crd import crd

TEMPLATE: dict[str, Any] = {
    "storage": {"uri": "s3://nanorun/sweeps/scaling"},
    "model": {"maxSeqLen": 256},
    "tokenizer": {"vocabSize": 4096},
    "compute": {"gpusPerNode": 8, "queue": "gpus"},
    "stages": {"pretrain": {"deviceBatchSize": 16}, "baseEval": {"maxPerTask": 100}},
}
ISOFLOP: dict[str, Any] = {"template": TEMPLATE, "depths": [10, 12, 14], "flopBudgets": [1e18, 2.15e18]}
LADDER: dict[str, Any] = {"template": TEMPLATE, "depths": [10, 20], "tokensPerParam": 8}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


@pytest.mark.parametrize(
    "flops, tag",
    [(1e18, "1e18"), (2.15e18, "2p15e18"), (4.64e18, "4p64e18"), (3e12, "3e12"), (1.5e9, "1p5e9")],
)
def test_a_budget_is_named_without_dots(flops, tag):
    assert budget_tag(flops) == tag


def test_isoflop_points_are_every_depth_at_every_budget_named_by_both():
    points = sweep_points("scaling", parse_sweep_spec(ISOFLOP))
    assert [p.name for p in points] == [
        "scaling-d10-f1e18",
        "scaling-d12-f1e18",
        "scaling-d14-f1e18",
        "scaling-d10-f2p15e18",
        "scaling-d12-f2p15e18",
        "scaling-d14-f2p15e18",
    ]
    assert points[4].depth == 12 and points[4].flop_budget == 2.15e18 and points[4].folder == "d12-f2p15e18"


def test_ladder_points_are_one_per_depth():
    points = sweep_points("mini", parse_sweep_spec(LADDER))
    assert [(p.name, p.depth, p.tokens_per_param) for p in points] == [
        ("mini-d10", 10, 8),
        ("mini-d20", 20, 8),
    ]


def test_a_long_sweep_name_still_gives_distinct_names_that_fit_a_label():
    name = "a-very-long-sweep-name-that-somebody-chose-for-their-scaling-experiment"
    points = sweep_points(name, parse_sweep_spec(ISOFLOP))
    assert len({p.name for p in points}) == len(points)
    assert all(len(p.name) <= 63 for p in points)


def test_a_point_pretrains_and_evaluates_at_its_depth_and_budget_with_the_sweeps_tokenizer():
    spec = parse_sweep_spec(ISOFLOP)
    point = sweep_points("scaling", spec)[4]
    child = point_spec(spec, point)
    assert [s.key for s in stage_plan(child)] == ["tokenizer", "pretrain", "baseEval"]
    assert child.model.depth == 12 and child.model.max_seq_len == 256
    assert (
        child.stages.pretrain.target_flops == 2.15e18
        and child.stages.pretrain.target_param_data_ratio is None
    )
    assert child.stages.base_eval.max_per_task == 100 and child.stages.pretrain.device_batch_size == 16
    assert child.storage.uri == "s3://nanorun/sweeps/scaling/d12-f2p15e18"
    assert child.tokenizer.from_run == "s3://nanorun/sweeps/scaling/tokenizer"
    assert not child.serving.enabled
    assert child.compute.queue == "gpus"  # Kueue admits the points as its quota allows
    plan = {s.key: s.args for s in stage_plan(child)}
    assert plan["tokenizer"] == ["--from", "s3://nanorun/sweeps/scaling/tokenizer"]
    assert "--target-flops" in plan["pretrain"] and "--depth" in plan["pretrain"]


def test_a_ladder_point_trains_to_the_tokens_per_param():
    spec = parse_sweep_spec(LADDER)
    child = point_spec(spec, sweep_points("mini", spec)[1])
    assert child.model.depth == 20
    assert child.stages.pretrain.target_param_data_ratio == 8 and child.stages.pretrain.target_flops is None


def test_the_tokenizer_run_trains_only_the_tokenizer_where_the_points_read_it():
    spec = parse_sweep_spec(ISOFLOP)
    tok = tokenizer_spec(spec)
    assert tokenizer_run_name("scaling") == "scaling-tokenizer"
    assert [s.key for s in stage_plan(tok)] == ["tokenizer"]
    assert tok.storage.uri == "s3://nanorun/sweeps/scaling/tokenizer" and tok.tokenizer.vocab_size == 4096
    assert not tok.serving.enabled


def test_a_tokenizer_from_another_run_is_used_by_every_point():
    template = copy.deepcopy(TEMPLATE)
    template["tokenizer"] = {"from": "s3://nanorun/runs/speedrun"}
    spec = parse_sweep_spec(with_(ISOFLOP, template=template))
    for p in sweep_points("scaling", spec):
        assert point_spec(spec, p).tokenizer.from_run == "s3://nanorun/runs/speedrun"


def test_points_of_the_same_depth_differ_only_from_pretraining_on():
    spec = parse_sweep_spec(ISOFLOP)
    a, b = (config_ids(stage_plan(point_spec(spec, p))) for p in sweep_points("scaling", spec)[:4:3])
    assert a["tokenizer"] == b["tokenizer"] and a["pretrain"] != b["pretrain"]


REFUSED = [
    (
        "no-axis",
        {"template": TEMPLATE, "depths": [10]},
        "spec.tokensPerParam",
        "set exactly one of tokensPerParam",
    ),
    (
        "both-axes",
        with_(ISOFLOP, tokensPerParam=20),
        "spec.tokensPerParam",
        "set exactly one of tokensPerParam",
    ),
    ("repeated-depth", with_(ISOFLOP, depths=[10, 12, 10]), "spec.depths", "depths must not repeat a depth"),
    ("no-depths", with_(ISOFLOP, depths=[]), "spec.depths", "should have at least 1 items"),
    ("zero-budget", with_(ISOFLOP, flopBudgets=[1e18, 0]), "spec.flopBudgets[1]", "should be greater than 0"),
    ("repeated-budget", with_(ISOFLOP, flopBudgets=[1e18, 1e18]), "spec.flopBudgets", "must not repeat"),
    (
        "template-sets-the-horizon",
        with_(LADDER, template={**TEMPLATE, "stages": {"pretrain": {"numIterations": 100}}}),
        "spec.template.stages.pretrain",
        "may not set numIterations, targetParamDataRatio or targetFlops",
    ),
    (
        "template-breaks-an-llmrun-rule",
        with_(LADDER, template={**TEMPLATE, "compute": {"nodes": 2}, "storage": {"uri": "/tmp/sweep"}}),
        "spec.template.compute.nodes",
        "compute.nodes > 1 needs storage.uri on S3",
    ),
    (
        "template-field-out-of-range",
        with_(LADDER, template={**TEMPLATE, "model": {"maxSeqLen": 4}}),
        "spec.template.model.maxSeqLen",
        "should be greater than or equal to 16",
    ),
]


@pytest.mark.parametrize("data, field, message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_bad_sweep_is_refused_naming_the_field(data, field, message):
    with pytest.raises(SpecError) as refused:
        parse_sweep_spec(data)
    [line] = str(refused.value).splitlines()
    assert line.startswith(f"{field}: ") and message in line, line


def test_the_crd_carries_every_rule_of_the_template_under_spec_template():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    template = schema["properties"]["spec"]["properties"]["template"]
    rules = [r["rule"] for r in template["x-kubernetes-validations"]]
    assert "self.compute.nodes == 1 || self.storage.uri.startsWith('s3://')" in rules
    assert template["properties"]["tokenizer"]["properties"]["from"]["type"] == "string"


def test_nanorun_crd_sweep_prints_the_committed_llmsweep_crd(capsys):
    assert cli.main(["crd", "--sweep"]) == 0
    committed = Path(__file__).resolve().parents[2] / "manifests" / "crd" / "nanorun.io_llmsweeps.yaml"
    assert capsys.readouterr().out == committed.read_text().split("\n---\n", 1)[1]  # after the header
