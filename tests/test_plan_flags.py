"""The stage plan and the stage modules agree: every flag the plan passes to a stage (from every
example LLMRun, and from a spec with every optional field set) is accepted by that stage's own
argparse parser, with the value the spec asked for. Catches drift between operator/reconcile/plan.py and the
trainer's command lines before a job fails on a cluster."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
import yaml
from nanorun.cli.run import stage_command
from nanorun.operator.api import parse_spec
from nanorun.operator.children.pytorchjob import command_for_stage
from nanorun.operator.reconcile.plan import stage_plan
from nanorun.operator.sweep.api import parse_sweep_spec, point_spec, sweep_points
from nanorun.pipeline.stages import KEYS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted([*ROOT.glob("examples/*.yaml"), *ROOT.glob("manifests/examples/*.yaml")])

# Every optional spec field that turns into a flag, set to a value that is not the stage's default.
EVERY_FLAG_SPEC = {
    "storage": {"uri": "s3://bucket/runs/every-flag"},
    "data": {"pretrain": "s3://bucket/shards", "shards": 7},
    "model": {
        "depth": 6,
        "maxSeqLen": 512,
        "headDim": 64,
        "aspectRatio": 32,
        "nKvHead": 1,
        "windowPattern": "SL",
        "compile": False,
    },
    "tokenizer": {"vocabSize": 8192, "maxChars": 123456, "docCap": 999},
    "compute": {"gpusPerNode": 2},
    "stages": {
        "pretrain": {
            "targetParamDataRatio": 8.5,
            "numIterations": 11,
            "deviceBatchSize": 4,
            "totalBatchSize": 8192,
            "embeddingLr": 0.2,
            "unembeddingLr": 0.004,
            "matrixLr": 0.01,
            "scalarLr": 0.4,
            "weightDecay": 0.1,
            "evalEvery": 5,
            "saveEvery": 3,
        },
        "baseEval": {"maxPerTask": 9, "deviceBatchSize": 3},
        "midtrain": {"numIterations": 12, "deviceBatchSize": 5},
        "sft": {"numIterations": 13, "deviceBatchSize": 6},
        "rl": {"numIterations": 14, "deviceBatchSize": 7},
        "eval": {"maxProblems": 15},
        "export": {"enabled": True, "dtype": "float16"},
    },
    "serving": {"apiKeysSecret": "chat-keys"},
}


def parse_stage_args(stage: str, argv: list[str]) -> argparse.Namespace:
    """Parse `argv` with the stage module's own parser; fail the test with argparse's message."""
    module = importlib.import_module(f"nanorun.trainer.{stage}")
    parse = module.build_parser().parse_args if hasattr(module, "build_parser") else module.parse_args
    try:
        return parse(argv)
    except SystemExit as exit_:
        pytest.fail(f"python -m nanorun.trainer.{stage} refuses {argv} (exit {exit_.code}); see stderr above")


def flags_after_module(command: list[str], module: str) -> list[str]:
    return command[command.index(module) + 1 :]


def load_example(path: Path):
    """The example's LLMRun spec; for an LLMSweep, its last point's (the child runs it creates)."""
    doc = yaml.safe_load(path.read_text())
    if doc["kind"] == "LLMSweep":
        sweep = parse_sweep_spec(doc["spec"])
        return point_spec(sweep, sweep_points(doc["metadata"]["name"], sweep)[-1])
    return parse_spec(doc["spec"])


def test_there_are_examples_to_check():
    names = {p.name for p in EXAMPLES}
    assert "tiny.yaml" in names and "speedrun-d20.yaml" in names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_flag_the_plan_passes_for_an_example_is_accepted_by_the_stage(path, capsys):
    spec = load_example(path)
    plan = stage_plan(spec)
    assert plan, f"{path} enables no stage"
    for stage in plan:
        # The operator's container command and the local executor's command, flags only.
        for command in (command_for_stage(spec, stage), stage_command(stage, "/tmp/run", 1, 9400)):
            args = parse_stage_args(stage.module, flags_after_module(command, stage.entry_point))
            assert args.run_dir in (spec.storage.uri, "/tmp/run")
            assert args.metrics_port in (spec.metrics_port, 9400)


def test_every_spec_field_reaches_its_stage_with_its_value():
    spec = parse_spec(EVERY_FLAG_SPEC)
    plan = {s.key: s for s in stage_plan(spec)}
    assert list(plan) == list(KEYS)

    def parsed(key: str) -> argparse.Namespace:
        s = plan[key]
        return parse_stage_args(s.module, flags_after_module(command_for_stage(spec, s), s.entry_point))

    tok = parsed("tokenizer")
    assert (tok.data, tok.vocab_size, tok.max_chars, tok.doc_cap) == ("s3://bucket/shards", 8192, 123456, 999)
    pre = parsed("pretrain")
    assert (
        pre.data,
        pre.shards,
        pre.depth,
        pre.max_seq_len,
        pre.head_dim,
        pre.aspect_ratio,
        pre.n_kv_head,
        pre.window_pattern,
    ) == ("s3://bucket/shards", 7, 6, 512, 64, 32, 1, "SL")
    assert (pre.target_param_data_ratio, pre.num_iterations, pre.device_batch_size, pre.total_batch_size) == (
        8.5,
        11,
        4,
        8192,
    )
    assert (pre.embedding_lr, pre.unembedding_lr, pre.matrix_lr, pre.scalar_lr, pre.weight_decay) == (
        0.2,
        0.004,
        0.01,
        0.4,
        0.1,
    )
    assert (pre.eval_every, pre.save_every, pre.compile) == (5, 3, False)
    base_eval = parsed("baseEval")
    assert (base_eval.max_per_task, base_eval.device_batch_size, base_eval.compile) == (9, 3, False)
    for key, (iters, batch) in {"midtrain": (12, 5), "sft": (13, 6), "rl": (14, 7)}.items():
        args = parsed(key)
        assert (args.num_iterations, args.device_batch_size, args.compile) == (iters, batch, False), key
    assert parsed("eval").max_problems == 15
    export = parsed("export")
    assert (export.source, export.dtype) == ("rl", "float16")  # the last model stage of the plan
    parsed("report")


def test_extra_args_come_last_so_they_override_the_spec():
    spec = parse_spec(
        {
            **EVERY_FLAG_SPEC,
            "stages": {"pretrain": {"numIterations": 11, "extraArgs": ["--num-iterations", "99"]}},
        }
    )
    pretrain = next(s for s in stage_plan(spec) if s.key == "pretrain")
    assert parse_stage_args("base_train", ["--run-dir", "x", *pretrain.args]).num_iterations == 99


def test_a_flag_no_stage_knows_is_caught():
    spec = parse_spec({**EVERY_FLAG_SPEC, "stages": {"sft": {"extraArgs": ["--no-such-flag", "1"]}}})
    sft = next(s for s in stage_plan(spec) if s.key == "sft")
    with pytest.raises(pytest.fail.Exception, match="refuses"):
        parse_stage_args("chat_sft", ["--run-dir", "x", *sft.args])
