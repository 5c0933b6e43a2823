"""`nanorun run SWEEP.yaml` end to end on this machine: a tokenizer, four real points (depths 2 and 3
at two FLOP budgets) trained one after another, the report; running it again redoes nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from nanorun.cli import main as cli
from nanorun.pipeline.progress import read_done
from nanorun.trainer.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
BUDGETS = [1.0e11, 2.0e11]
POINTS = ["d2-f1e11", "d3-f1e11", "d2-f2e11", "d3-f2e11"]


def small_sweep(path: Path) -> Path:
    """examples/sweep-tiny.yaml, smaller still: two depths, smaller budgets, a smaller tokenizer."""
    doc = yaml.safe_load((REPO / "examples" / "sweep-tiny.yaml").read_text())
    spec = copy.deepcopy(doc["spec"])
    spec["depths"], spec["flopBudgets"] = [2, 3], BUDGETS
    spec["template"]["tokenizer"] = {"vocabSize": 1024, "maxChars": 500_000}
    spec["template"]["stages"]["baseEval"]["extraArgs"] = ["--eval-tokens", "4096"]
    spec["template"]["stages"]["pretrain"]["extraArgs"] = [
        "--warmup-steps",
        "1",
        "--eval-tokens",
        "4096",
        "--sample-every",
        "-1",
    ]
    path.write_text(yaml.safe_dump({**doc, "metadata": {"name": "small"}, "spec": spec}))
    return path


@pytest.mark.slow
def test_a_sweep_runs_every_point_writes_the_report_and_a_rerun_redoes_nothing(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    path = small_sweep(tmp_path / "sweep.yaml")
    assert cli.main(["run", str(path), "--run-dir", str(sweep_dir)]) == 0, capsys.readouterr().out[-3000:]
    out = capsys.readouterr().out
    assert "point 4/4: small-d3-f2e11" in out

    vocab = Tokenizer.from_run_dir(str(sweep_dir / "tokenizer")).encode("a shared vocabulary")
    for folder in POINTS:
        point = str(sweep_dir / folder)
        assert Tokenizer.from_run_dir(point).encode("a shared vocabulary") == vocab  # one tokenizer
        done = read_done(point, "pretrain").metrics
        budget = BUDGETS[folder.endswith("f2e11")]
        flops_per_step = done["flops"] / done["steps"]
        assert abs(done["flops"] - budget) <= flops_per_step / 2, folder  # the horizon spends the budget
        assert read_done(point, "baseEval").metrics["val_bpb"] > 0

    report = (sweep_dir / "report" / "report.md").read_text()
    assert "4 of 4 points finished" in report
    for folder in POINTS:
        assert f"| small-{folder} |" in report
    assert (sweep_dir / "report" / "bpb_vs_flops.png").exists()

    def finished() -> dict:
        return {f: read_done(str(sweep_dir / f), "pretrain") for f in POINTS}

    before = finished()
    assert cli.main(["run", str(path), "--run-dir", str(sweep_dir)]) == 0
    assert capsys.readouterr().out.count("already done") == 1 + 4 * 3  # the tokenizer run, 3 stages a point
    assert finished() == before  # no point trained again


def test_a_bad_sweep_file_is_refused_by_nanorun_run_with_the_crds_message(tmp_path, capsys):
    doc = yaml.safe_load((REPO / "examples" / "sweep-tiny.yaml").read_text())
    doc["spec"]["tokensPerParam"] = 8  # as well as flopBudgets
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "the LLMSweep 'sweep-tiny' is invalid" in err
    assert "spec.tokensPerParam: set exactly one of tokensPerParam" in err
