"""The stage table is the one list of stages: the spec, the CRD, the plan, the report and the chat
stages agree with it, and the operator's side of it imports without torch. A stage has one name
wherever a user sees it (its key); its module name is only its entry point, and is still read as
the stage's name in old command lines and old run directories."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from nanorun.operator import crd
from nanorun.operator.api import StagesSpec, parse_spec
from nanorun.operator.jobs import RunRef, pytorchjob_for_stage
from nanorun.operator.plan import STAGE_KEYS, stage_plan
from nanorun.operator.rules import CHECKPOINT_STAGES
from nanorun.pipeline import layout, stages
from nanorun.pipeline.progress import Done, Progress, read_done, read_progress, write_done, write_progress
from nanorun.trainer import chat_eval, report


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
    assert stages.MODEL_KEYS == ("rl", "sft", "midtrain", "pretrain")
    assert stages.CHAT_KEYS == ("rl", "sft", "midtrain")
    assert report.COLUMNS == {"BASE": "pretrain", "MID": "midtrain", "SFT": "sft", "RL": "rl"}
    assert "report" not in report.STAGES and report.STAGES[0] == "tokenizer"
    assert stages.source_keys("sft") == "midtrain,pretrain"
    assert stages.source_keys("rl") == "sft"
    assert stages.source_keys("baseEval") == "pretrain"


def test_no_folder_label_or_job_name_a_user_sees_uses_a_module_name():
    spec = parse_spec({"storage": {"uri": "s3://b/runs/speedrun"}, "serving": {"apiKeysSecret": "chat-keys"}})
    run = RunRef(name="speedrun", namespace="team-a", uid="uid")
    dns = {s.key: s.dns for s in stages.STAGES}
    assert dns == {
        "tokenizer": "tokenizer",
        "pretrain": "pretrain",
        "baseEval": "base-eval",
        "midtrain": "midtrain",
        "sft": "sft",
        "rl": "rl",
        "eval": "eval",
        "report": "report",
    }
    old_names = {s.module for s in stages.STAGES if s.module != s.key}
    # base_eval's kebab case is baseEval's too: that one is the key's own.
    old_names |= {name.replace("_", "-") for name in old_names} - set(dns.values())
    for planned in stage_plan(spec):
        stage = stages.BY_KEY[planned.key]
        job = pytorchjob_for_stage(run, spec, planned, attempt=1)
        container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        seen = {
            "folder": layout.stage_dir(spec.storage.uri, planned.key).rsplit("/", 1)[1],
            "label": job["metadata"]["labels"]["nanorun.io/stage"],
            "NANORUN_STAGE": env["NANORUN_STAGE"],
            "job name": job["metadata"]["name"],
        }
        assert seen == {
            "folder": stage.key,
            "label": stage.key,
            "NANORUN_STAGE": stage.key,
            "job name": f"speedrun-{stage.dns}-1",
        }
        assert not [name for name in old_names if any(name in value for value in seen.values())], seen
        # The module stays the entry point, and only there.
        assert f"nanorun.trainer.{stage.module}" in container["command"]
    assert layout.tokenizer_dir("s3://b/r") == "s3://b/r/tokenizer"


def test_a_stage_is_named_by_its_key_or_for_one_release_by_its_module():
    for s in stages.STAGES:
        assert stages.stage_named(s.key) is s
        assert stages.stage_named(s.module) is s
    assert layout.stage_dir("/r", "base_train") == layout.stage_dir("/r", "pretrain") == "/r/pretrain"
    with pytest.raises(
        ValueError, match="no stage 'pretraining'; the stages are tokenizer, pretrain, baseEval"
    ):
        stages.stage_named("pretraining")


def test_chat_eval_takes_a_stage_key_or_its_old_module_name_as_source(tmp_path):
    run = str(tmp_path)
    write_done(run, Done(stage="sft", seconds=1.0))
    write_done(run, Done(stage="pretrain", seconds=1.0))
    assert chat_eval.sources_to_evaluate(run, "sft") == ["sft"]
    assert chat_eval.sources_to_evaluate(run, "chat_sft") == ["sft"]
    assert chat_eval.sources_to_evaluate(run, "base_train") == ["pretrain"]
    assert chat_eval.sources_to_evaluate(run, "latest") == ["sft"]
    with pytest.raises(SystemExit, match="one of rl, sft, midtrain, pretrain, got 'tokenizer'"):
        chat_eval.sources_to_evaluate(run, "tokenizer")


def _legacy_run(root: Path) -> str:
    """A run directory as runs wrote it before stages had one name: folders named by module."""
    (root / "base_train").mkdir(parents=True)
    (root / "base_train" / "done.json").write_text(
        json.dumps({"stage": "base_train", "seconds": 7.0, "outputs": {"checkpoint": str(root / "nowhere")}})
    )
    (root / "base_train" / "progress.json").write_text(json.dumps({"stage": "base_train", "step": 40}))
    (root / "tok_train").mkdir()
    (root / "tok_train" / layout.TOKENIZER_FILE).write_text("")
    return str(root)


def test_readers_find_the_files_of_a_run_written_with_module_folders(tmp_path):
    run = _legacy_run(tmp_path)
    assert read_done(run, "pretrain").seconds == 7.0
    assert read_progress(run, "pretrain").step == 40
    assert layout.stage_dir_to_read(run, "pretrain") == f"{run}/base_train"
    assert layout.tokenizer_dir_to_read(run) == f"{run}/tok_train"
    assert read_done(run, "midtrain") is None
    # Writers write the new folder, and from then on readers read it.
    write_progress(run, Progress(stage="pretrain", step=41))
    assert (tmp_path / "pretrain" / "progress.json").exists()
    assert read_progress(run, "pretrain").step == 41
    assert read_done(run, "pretrain").seconds == 7.0  # no new done.json yet: still the old one
    write_done(run, Done(stage="pretrain", seconds=9.0))
    assert read_done(run, "pretrain").seconds == 9.0
    assert layout.stage_dir_to_read(run, "pretrain") == f"{run}/pretrain"
    assert layout.tokenizer_dir_to_read(str(tmp_path / "elsewhere")) == f"{tmp_path}/elsewhere/tokenizer"


def test_post_training_reads_an_old_runs_source_named_by_its_module(tmp_path):
    from nanorun.trainer.training.checkpoint import CheckpointError
    from nanorun.trainer.training.finetune import source_checkpoint

    run = _legacy_run(tmp_path)
    # Found through the old name and the old folder; the checkpoint it names is checked next.
    with pytest.raises(CheckpointError, match=r"^pretrain/done.json points at .*nowhere, which is missing"):
        source_checkpoint(run, "mid_train,base_train")
    with pytest.raises(SystemExit, match="--source mid_train,basetrain: no stage 'basetrain'"):
        source_checkpoint(run, "mid_train,basetrain")


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
    ckpt = layout.checkpoint_dir(layout.stage_dir("s3://b/runs/x", "sft"), 12)
    assert ckpt == "s3://b/runs/x/sft/checkpoints/step_000012"
    assert layout.run_dir_of_checkpoint(ckpt + "/") == "s3://b/runs/x"
    assert layout.tokenizer_dir(layout.run_dir_of_checkpoint(ckpt)) == "s3://b/runs/x/tokenizer"
    with pytest.raises(ValueError, match="is not <run-dir>/<stage>/checkpoints/step_NNNNNN"):
        layout.run_dir_of_checkpoint("s3://b/runs/x/sft")


def test_the_shared_package_imports_nothing_from_the_trainer():
    code = (
        "import sys, nanorun.pipeline.layout, nanorun.pipeline.progress, nanorun.pipeline.errors\n"
        "assert not [m for m in sys.modules if m.startswith('nanorun.trainer')], sorted(sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
