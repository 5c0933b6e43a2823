"""Dataset loaders read the Hub's parquet files by URL (here: a local stand-in serving files in each
dataset's real schema), cache them in run storage, and fail clearly when offline."""

from __future__ import annotations

import pytest
from nanorun.pipeline import storage
from nanorun.trainer.tasks.arc import ARC
from nanorun.trainer.tasks.gsm8k import GSM8K
from nanorun.trainer.tasks.hf import TaskDataUnavailable, load_rows
from nanorun.trainer.tasks.humaneval import HumanEval
from nanorun.trainer.tasks.mmlu import MMLU
from nanorun.trainer.tasks.smoltalk import SmolTalk


def test_gsm8k_calculator_annotations_become_tool_calls(fake_hub, tmp_path):
    task = GSM8K("train", cache=str(tmp_path))
    assert len(task) == 2
    assert task[0]["messages"][1]["content"] == [
        {"type": "text", "text": "3*4="},
        {"type": "python", "text": "3*4"},
        {"type": "python_output", "text": "12"},
        {"type": "text", "text": "12 apples.\n#### 12"},
    ]
    assert task.evaluate(task[0], "so... #### 12") and not task.evaluate(task[0], "#### 13")
    test = GSM8K("test", cache=str(tmp_path))
    assert test.evaluate(test[0], "#### 2400") and test.evaluate(test[0], "#### 2,400.")  # separators ignored
    assert not test.evaluate(test[0], "2400")  # the answer must follow ####


def test_mmlu_and_auxiliary_train_render_letter_questions(fake_hub, tmp_path):
    task = MMLU("all", "test", cache=str(tmp_path))
    first = task[0]
    assert first["answer"] == "B" and first["letters"] == ["A", "B", "C", "D"]
    assert "- 4=B" in first["messages"][0]["content"] and first["messages"][1]["content"] == "B"
    aux = MMLU("auxiliary_train", cache=str(tmp_path))
    assert aux[0]["answer"] == "C" and "Pick c" in aux[0]["messages"][0]["content"]


def test_arc_keeps_the_datasets_own_labels(fake_hub, tmp_path):
    easy = ARC("ARC-Easy", cache=str(tmp_path))
    assert [easy[0]["answer"], easy[1]["answer"]] == ["B", "1"]
    assert easy[1]["letters"] == ["1", "2", "3", "4"]
    assert ARC("ARC-Challenge", cache=str(tmp_path))[0]["answer"] == "D"


def test_smoltalk_rows_become_conversations(fake_hub, tmp_path):
    task = SmolTalk("train", cache=str(tmp_path))
    assert task[1]["messages"][0] == {"role": "system", "content": "Be terse."}
    assert task[0]["messages"] == [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
    ]


def test_humaneval_canonical_solution_passes_and_a_wrong_one_fails(fake_hub, tmp_path):
    task = HumanEval(cache=str(tmp_path))
    example = task[0]
    assert task.evaluate(example, example["messages"][1]["content"])
    assert task.evaluate(example, "```python\ndef area(r):\n    return math.pi * r ** 2\n```\nDone.")
    assert not task.evaluate(example, "def area(r):\n    return 3 * r * r\n")


def test_downloaded_split_is_cached_in_s3_run_storage_and_reused_offline(fake_hub, s3_run_dir, monkeypatch):
    cache = storage.join(s3_run_dir, "task_data")
    rows = load_rows("openai/gsm8k", "main", "train", cache)
    assert storage.exists(storage.join(cache, "openai", "gsm8k", "main", "train", "0000.parquet"))
    fake_hub.close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_rows("openai/gsm8k", "main", "train", cache) == rows


def test_offline_without_cache_raises_an_actionable_error(offline, tmp_path):
    with pytest.raises(TaskDataUnavailable) as err:
        GSM8K("test", cache=str(tmp_path / "cache"))
    message = str(err.value)
    assert "openai/gsm8k" in message and "HF_ENDPOINT" in message and str(tmp_path / "cache") in message


def test_a_failed_download_leaves_no_partial_cache(fake_hub, tmp_path):
    fake_hub.extra_urls = [f"{fake_hub.url}/files/gone.parquet"]  # the first file downloads, the second 404s
    with pytest.raises(TaskDataUnavailable, match="HTTPStatusError"):
        load_rows("openai/gsm8k", "main", "test", str(tmp_path))
    assert storage.list_files(str(tmp_path)) == []


def test_parquet_files_copied_into_the_cache_by_hand_are_used_offline(offline, tmp_path):
    from tests.fixtures.hub import ROWS, parquet_bytes

    split_dir = tmp_path / "openai" / "gsm8k" / "main" / "test"
    split_dir.mkdir(parents=True)
    (split_dir / "test-00000-of-00001.parquet").write_bytes(
        parquet_bytes(ROWS[("openai/gsm8k", "main", "test")])
    )
    assert GSM8K("test", cache=str(tmp_path))[0]["messages"][0]["content"].startswith("A box holds")
