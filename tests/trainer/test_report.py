"""The report stage turns what the stages recorded into report.md with its plots."""

from __future__ import annotations

import json
import subprocess
import sys

from nanorun.pipeline import storage
from nanorun.pipeline.progress import Done, Progress, write_done, write_progress

from tests.fixtures.tiny_run import stage_env


def fake_run(run_dir: str) -> None:
    """Status files as the stages write them (values chosen so each shows up distinctly)."""

    def stage(
        name: str, seconds: float, metrics: dict, world_size: int = 1, history: list | None = None
    ) -> None:
        write_progress(run_dir, Progress(stage=name, world_size=world_size))
        write_done(run_dir, Done(stage=name, seconds=seconds, metrics=metrics))
        if history:
            storage.write_text(
                storage.join(run_dir, name, "history.jsonl"), "".join(json.dumps(r) + "\n" for r in history)
            )

    stage("tokenizer", 60, {})
    stage(
        "pretrain",
        7200,
        {"val_bpb": 0.8123, "compile_seconds": 95.0},
        world_size=8,
        history=[{"step": s, "loss": 5 - s / 100} for s in range(0, 300, 10)]
        + [{"step": 300, "val_bpb": 0.8123}],
    )
    stage("baseEval", 600, {"core": 0.2219}, world_size=8)
    stage(
        "midtrain",
        900,
        {"val_bpb": 0.7011},
        history=[{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.1}, {"step": 2, "val_bpb": 0.7011}],
    )
    stage("sft", 300, {"val_bpb": 0.6555}, history=[{"step": 1, "loss": 1.9}, {"step": 2, "loss": 1.7}])
    stage(
        "rl",
        1800,
        {"pass@1": 0.0758, "task": "GSM8K"},
        history=[{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.3}],
    )
    storage.write_json(
        storage.join(run_dir, "eval", "sft.json"),
        {"results": {"ARC-Easy": 0.3876, "MMLU": 0.3151, "GSM8K": 0.0455}, "ChatCORE": 0.0884},
    )
    storage.write_text(
        storage.join(run_dir, "eval", "samples", "sft.jsonl"),
        json.dumps(
            {
                "task": "GSM8K",
                "prompt": [{"role": "user", "content": "What is 2+3?"}],
                "reply": "It is 5.\n#### 5",
                "passed": True,
            }
        )
        + "\n",
    )
    stage("eval", 120, {})


def run_report(run_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanorun.trainer.report", "--run-dir", run_dir, "--device", "cpu", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=stage_env(),
    )


def test_report_has_the_stage_table_costs_samples_and_plots(tmp_path):
    run_dir = str(tmp_path / "run")
    fake_run(run_dir)
    proc = run_report(run_dir, "--gpu-hour-price", "2.5")
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "| Metric | BASE | MID | SFT | RL |" in report
    assert "| CORE | 0.2219 | - | - | - |" in report
    assert "| ARC-Easy | - | - | 0.3876 | - |" in report
    assert "| GSM8K | - | - | 0.0455 | 0.0758 |" in report
    assert "| val bpb | 0.8123 | 0.7011 | 0.6555 | - |" in report
    assert "| ChatCORE | - | - | 0.0884 | - |" in report
    # pretrain: 2 h on 8 processes = 16 GPU-hours at 2.50 = 40.00, 95 s of it compiling
    assert "| pretrain | 2h00m00s | 1m35s | 8 | 16.000 | $40.00 |" in report
    assert "| baseEval | 10m00s | - | 8 |" in report  # a stage that compiled nothing
    assert "What is 2+3?" in report and "#### 5" in report
    assert "python" in report and "git commit" in report
    for plot in ("loss.png", "bpb.png", "rl.png"):
        assert f"]({plot})" in report
        assert (tmp_path / "run" / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "run" / "report" / "done.json").read_text())["outputs"]["report"].endswith(
        "report.md"
    )


def test_report_of_a_partial_run_in_s3_shows_missing_stages_as_dashes(s3_run_dir):
    from nanorun.trainer.report import write_report

    write_done(s3_run_dir, Done(stage="pretrain", seconds=30, metrics={"val_bpb": 1.5}))
    uri = write_report(s3_run_dir)
    report = storage.read_text(uri)
    assert "| val bpb | 1.5000 | - | - | - |" in report and "## Curves" not in report
