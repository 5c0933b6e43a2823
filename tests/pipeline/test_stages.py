"""The stage table is the one list of stages: the spec, the CRD, the plan, the report and the chat
stages agree with it, and the operator's side of it imports without torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from nanorun.operator import crd
from nanorun.operator.api import StagesSpec
from nanorun.operator.plan import STAGE_KEYS
from nanorun.operator.rules import CHECKPOINT_STAGES
from nanorun.pipeline import stages
from nanorun.trainer import chat_eval, report
from nanorun.trainer.chat import engine


def test_the_spec_and_the_crd_have_exactly_the_tables_stages_in_order():
    aliases = [f.alias for f in StagesSpec.model_fields.values()]
    assert aliases == list(stages.KEYS)
    assert [s.attribute for s in stages.STAGES] == list(StagesSpec.model_fields)
    properties = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    assert list(properties["spec"]["properties"]["stages"]["properties"]) == list(stages.KEYS)
    assert list(stages.KEYS) == STAGE_KEYS
    assert CHECKPOINT_STAGES == ("pretrain", "midtrain", "sft", "rl")


def test_every_stage_is_a_module_and_continues_only_from_an_earlier_model():
    for i, stage in enumerate(stages.STAGES):
        assert importlib.util.find_spec(f"nanorun.trainer.{stage.module}") is not None, stage.module
        earlier = {s.key for s in stages.STAGES[:i] if s.model}
        assert set(stage.starts_from) <= earlier, stage


def test_the_trainer_reads_its_stage_lists_from_the_table():
    assert engine.CHAT_STAGES == ("chat_rl", "chat_sft", "mid_train", "base_train")
    assert chat_eval.CHAT_STAGES == ("chat_rl", "chat_sft", "mid_train")
    assert report.COLUMNS == {"BASE": "base_train", "MID": "mid_train", "SFT": "chat_sft", "RL": "chat_rl"}
    assert "report" not in report.STAGES and report.STAGES[0] == "tok_train"
    assert stages.source_modules("sft") == "mid_train,base_train"
    assert stages.source_modules("rl") == "chat_sft"


def test_the_operator_imports_without_torch():
    # The operator image has no torch: its modules and the torch-free shared ones must not need it.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import nanorun.operator.handlers, nanorun.cli.main, nanorun.cli.run, nanorun.pipeline.stages\n"
        "assert 'torch' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def test_the_layout_finds_the_run_of_a_checkpoint_and_refuses_other_paths():
    import pytest
    from nanorun.pipeline import layout

    ckpt = layout.checkpoint_dir(layout.stage_dir("s3://b/runs/x", "chat_sft"), 12)
    assert ckpt == "s3://b/runs/x/chat_sft/checkpoints/step_000012"
    assert layout.run_dir_of_checkpoint(ckpt + "/") == "s3://b/runs/x"
    assert layout.tokenizer_dir(layout.run_dir_of_checkpoint(ckpt)) == "s3://b/runs/x/tok_train"
    with pytest.raises(ValueError, match="is not <run-dir>/<stage>/checkpoints/step_NNNNNN"):
        layout.run_dir_of_checkpoint("s3://b/runs/x/chat_sft")


def test_the_shared_package_imports_nothing_from_the_trainer():
    code = (
        "import sys, nanorun.pipeline.layout, nanorun.pipeline.progress, nanorun.pipeline.errors\n"
        "assert not [m for m in sys.modules if m.startswith('nanorun.trainer')], sorted(sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
