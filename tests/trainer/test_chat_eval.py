"""eval: scores (with stand-in models whose answers are known, see tests/tasks/test_task_eval.py),
ChatCORE, and the stage on a tiny run: every finished chat stage, skipped tasks, resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nanorun.trainer.chat_eval import chatcore

from tests.fixtures.post_training import copy_run
from tests.fixtures.tiny_run import check, run_stage


def test_chatcore_centres_each_task_on_its_random_baseline():
    score, tasks = chatcore({"ARC-Easy": 0.625, "MMLU": 0.25, "GSM8K": 0.5, "Arithmetic": 1.0})
    assert tasks == ["ARC-Easy", "MMLU", "GSM8K"]  # Arithmetic is not a ChatCORE task
    assert score == pytest.approx(((0.625 - 0.25) / 0.75 + 0.0 + 0.5) / 3)
    assert chatcore({}) == (None, [])


@pytest.mark.slow
def test_chat_eval_scores_every_finished_stage_and_resumes_missing_tasks(tiny_rl_run, fake_hub, tmp_path):
    run_dir = copy_run(tiny_rl_run, tmp_path / "run")
    flags = [
        "--run-dir",
        run_dir,
        "--device",
        "cpu",
        "--source",
        "all",
        "-a",
        "ARC-Easy|MMLU|SpellingBee|HumanEval",
        "--max-problems",
        "2",
        "--max-new-tokens",
        "8",
    ]
    fake_hub.rows = {
        k: v for k, v in fake_hub.rows.items() if k[0] != "openai/openai_humaneval"
    }  # not downloadable
    proc = check(run_stage("chat_eval", *flags))
    assert "skipping HumanEval" in proc.stdout
    eval_dir = Path(run_dir) / "eval"
    for stage in ("midtrain", "sft", "rl"):
        summary = json.loads((eval_dir / f"{stage}.json").read_text())
        assert set(summary["results"]) == {"ARC-Easy", "MMLU", "SpellingBee"}
        # each score is k of the two problems asked
        assert set(summary["results"].values()) <= {0.0, 0.5, 1.0}, summary["results"]
        assert summary["chatcore_partial"] and "HumanEval" in summary["skipped"]
        assert summary["ChatCORE"] == pytest.approx(chatcore(summary["results"])[0])
    done = json.loads((eval_dir / "done.json").read_text())
    assert done["metrics"]["source"] == "rl" and set(done["metrics"]["by_source"]) == {
        "midtrain",
        "sft",
        "rl",
    }

    # interrupted before SpellingBee of chat_rl was saved: only that task runs again
    (eval_dir / "done.json").unlink()
    (eval_dir / "results" / "rl" / "SpellingBee.json").unlink()
    proc = check(run_stage("chat_eval", *flags[:5], "rl", *flags[6:]))
    assert "rl: SpellingBee" in proc.stdout and "rl: ARC-Easy" not in proc.stdout

    report = check(run_stage("report", "--run-dir", run_dir, "--device", "cpu"))
    text = (Path(run_dir) / "report" / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| SpellingBee |"))
    assert row.count("-") == 1, row  # BASE has no chat eval; MID, SFT and RL do
    assert (Path(run_dir) / "report" / "loss.png").exists() and "report.md" in report.stdout
