"""Offline, every stage's mixture falls back to the tasks that need no download and says which
tasks it used and which it skipped."""

from __future__ import annotations

from nanorun.trainer.tasks.customjson import CONVERSATIONS_PATH, IDENTITY_PATH, CustomJSON
from nanorun.trainer.tasks.mixtures import midtrain_mixture, rl_tasks, sft_mixture


def test_offline_sft_mixture_uses_shipped_tasks_and_reports_skipped_ones(offline, tmp_path):
    train, val, report = sft_mixture(str(tmp_path), limit=20)
    used = " ".join(report.used)
    assert set(report.skipped) == {"SmolTalk", "MMLU-aux", "GSM8K"}
    for name in ("identity", "conversations", "SpellingBee", "SimpleSpelling", "Arithmetic"):
        assert name in used
    assert "task skipped: GSM8K" in str(report) and len(train) > 0 and len(val) > 0


def test_online_midtrain_mixture_includes_the_downloaded_datasets(fake_hub, tmp_path):
    train, _, report = midtrain_mixture(str(tmp_path), limit=10)
    assert report.skipped == {}
    assert any(u.startswith("SmolTalk (2)") for u in report.used) and any(
        u.startswith("GSM8K (2)") for u in report.used
    )


def test_rl_falls_back_to_arithmetic_when_gsm8k_is_unavailable(offline, tmp_path):
    train, test, report = rl_tasks(str(tmp_path))
    assert "GSM8K" in report.skipped and report.used[0].startswith("Arithmetic")
    assert train.evaluate(train[0], "".join(p["text"] for p in train[0]["messages"][1]["content"]))


def test_shipped_conversation_sets_are_valid(tmp_path):
    assert len(CustomJSON(IDENTITY_PATH)) >= 20 and len(CustomJSON(CONVERSATIONS_PATH)) >= 20
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [{"role": "assistant", "content": "x"}]}\n'
    )
    import pytest

    with pytest.raises(ValueError, match="bad.jsonl:2"):
        CustomJSON(str(bad))
