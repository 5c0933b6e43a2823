"""The stage table is the one list of stages: the spec, the CRD, the plan, the report and the chat
stages agree with it, and the operator's side of it imports without torch. A stage has one name
wherever a user sees it (its key); its module name is only its entry point, and is still read as
the stage's name in old command lines and old run directories."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from nanorun.operator.api import StagesSpec, crd, parse_spec
from nanorun.operator.children.pytorchjob import pytorchjob_for_stage
from nanorun.operator.reconcile.plan import stage_plan
from nanorun.operator.run_ref import RunRef
from nanorun.pipeline import layout, stages
from nanorun.pipeline.progress import Done, write_done
from nanorun.trainer import chat_eval, report


def test_the_spec_and_the_crd_have_exactly_the_tables_stages_in_order():
    aliases = [f.alias for f in StagesSpec.model_fields.values()]
    assert aliases == list(stages.KEYS)
    assert [s.attribute for s in stages.STAGES] == list(StagesSpec.model_fields)
    properties = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    assert list(properties["spec"]["properties"]["stages"]["properties"]) == list(stages.KEYS)


def test_every_stage_is_a_module_and_continues_only_from_an_earlier_model():
    for i, stage in enumerate(stages.STAGES):
        assert importlib.util.find_spec(stage.entry_point) is not None, stage.module
        earlier = {s.key for s in stages.STAGES[:i] if s.model}
        assert set(stage.starts_from) <= earlier, stage


def test_the_trainer_reads_its_stage_lists_from_the_table():
    assert stages.MODEL_KEYS == ("pretrain", "midtrain", "sft", "rl")
    assert stages.CHAT_KEYS == ("midtrain", "sft", "rl")
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
        "export": "export",
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
        assert stage.entry_point in container["command"]
    assert layout.tokenizer_dir("s3://b/r") == "s3://b/r/tokenizer"


def test_a_stage_is_named_by_its_key_only():
    for s in stages.STAGES:
        assert stages.by_key(s.key) is s
    assert layout.stage_dir("/r", "pretrain") == "/r/pretrain"
    for name in ("pretraining", "base_train"):
        with pytest.raises(
            ValueError, match=f"no stage '{name}'; the stages are tokenizer, pretrain, baseEval"
        ):
            stages.by_key(name)


def test_chat_eval_takes_a_stage_key_as_source(tmp_path):
    run = str(tmp_path)
    write_done(run, Done(stage="sft", seconds=1.0))
    write_done(run, Done(stage="pretrain", seconds=1.0))
    assert chat_eval.sources_to_evaluate(run, "sft") == ["sft"]
    assert chat_eval.sources_to_evaluate(run, "pretrain") == ["pretrain"]
    assert chat_eval.sources_to_evaluate(run, "latest") == ["sft"]
    for source in ("tokenizer", "chat_sft"):
        with pytest.raises(SystemExit, match=f"one of pretrain, midtrain, sft, rl, got '{source}'"):
            chat_eval.sources_to_evaluate(run, source)


def test_post_training_names_a_source_that_is_no_stage(tmp_path):
    from nanorun.trainer.training.finetune import source_checkpoint

    with pytest.raises(SystemExit, match="--source midtrain,base_train: no stage 'base_train'"):
        source_checkpoint(str(tmp_path), "midtrain,base_train")


def test_the_operator_imports_without_torch():
    # The operator image has no torch: its modules and the torch-free shared ones must not need it.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import nanorun.operator.loop.handlers, nanorun.cli.main, nanorun.cli.run, nanorun.pipeline.stages\n"
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
