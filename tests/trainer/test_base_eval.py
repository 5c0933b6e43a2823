"""CORE on tiny tasks in the DCLM bundle's own format, and the baseEval stage on a tiny run."""

from __future__ import annotations

import csv
import io
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from nanorun.pipeline import storage
from nanorun.pipeline.progress import read_done
from nanorun.trainer.evaluation import core_eval

from tests.fixtures.tiny_run import check, run_stage, small_tokenizer

BUNDLE = Path(__file__).parent / "fixtures" / "eval_bundle"


class PrefixOracle(torch.nn.Module):
    """A language model that knows some token sequences by heart: after a known prefix it puts all its
    probability on the known next token, elsewhere it is uniform. Scoring it tells whether CORE's
    span bookkeeping and choice rules are right."""

    def __init__(self, sequences: list[list[int]], vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.next = {tuple(s[:i]): s[i] for s in sequences for i in range(1, len(s))}
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, self.vocab)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                nxt = self.next.get(tuple(row[: t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return logits


def known_sequences(tok, tasks, answer) -> list[list[int]]:
    """The token sequences of each item rendered the way core_eval renders it, with `answer(item)` chosen."""
    seqs = []
    for task in tasks:
        for idx, item in enumerate(task.items):
            shots = []
            if task.num_fewshot:
                import random

                others = [i for i in range(len(task.items)) if i != idx]
                shots = [task.items[i] for i in random.Random(1234 + idx).sample(others, task.num_fewshot)]
            prompts = core_eval.render(task, item, shots)
            pick = prompts[-1] if task.task_type == "language_modeling" else prompts[answer(item)]
            seqs.append(tok.encode(pick, prepend=tok.bos_token_id))
    return seqs


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


def test_bundle_format_is_read_with_baselines_and_shots():
    tasks = {t.label: t for t in core_eval.load_tasks(BUNDLE)}
    assert set(tasks) == {"arc_easy", "winograd", "lambada_openai"}
    assert (
        tasks["arc_easy"].num_fewshot,
        tasks["arc_easy"].random_baseline,
        len(tasks["arc_easy"].items),
    ) == (2, 0.25, 6)
    assert tasks["arc_easy"].delimiter == "\nAnswer: " and tasks["winograd"].delimiter == " "
    assert len(core_eval.load_tasks(BUNDLE, max_per_task=2)[0].items) == 2


def test_prompts_follow_the_few_shot_layout():
    task = core_eval.CoreTask("t", "multiple_choice", 1, "\nAnswer: ", 0.25, [])
    shot = {"query": "Q1?", "choices": ["a", "b"], "gold": 1}
    item = {"query": "Q2?", "choices": ["x", "y"], "gold": 0}
    assert core_eval.render(task, item, [shot]) == [
        "Q1?\nAnswer: b\n\nQ2?\nAnswer: x",
        "Q1?\nAnswer: b\n\nQ2?\nAnswer: y",
    ]
    lm = core_eval.CoreTask("t", "language_modeling", 0, " ", 0.0, [])
    assert core_eval.render(lm, {"context": "The end of the ", "continuation": "story"}, []) == [
        "The end of the",
        "The end of the story",
    ]


def test_a_model_that_knows_the_answers_scores_core_one(tok):
    tasks = core_eval.load_tasks(BUNDLE)
    model = PrefixOracle(known_sequences(tok, tasks, lambda item: item["gold"]), tok.vocab_size)
    result = core_eval.evaluate_core(model, tok, BUNDLE, torch.device("cpu"))
    assert result["results"] == {"arc_easy": 1.0, "winograd": 1.0, "lambada_openai": 1.0}
    assert result["core"] == pytest.approx(1.0)


def test_a_model_that_knows_wrong_answers_scores_below_the_random_baseline(tok):
    tasks = [t for t in core_eval.load_tasks(BUNDLE) if t.task_type != "language_modeling"]
    wrong = lambda item: (item["gold"] + 1) % len(item.get("choices") or item["context_options"])  # noqa: E731
    model = PrefixOracle(known_sequences(tok, tasks, wrong), tok.vocab_size)
    result = core_eval.evaluate_core(model, tok, BUNDLE, torch.device("cpu"))
    assert result["results"]["arc_easy"] == 0.0 and result["results"]["winograd"] == 0.0
    assert result["results"]["lambada_openai"] == 0.0  # nothing known: uniform logits, argmax is token 0
    assert result["centered"]["arc_easy"] == pytest.approx(-0.25 / 0.75)
    assert result["centered"]["winograd"] == pytest.approx(-1.0)
    assert result["core"] == pytest.approx((-1 / 3 - 1.0 + 0.0) / 3)


def test_core_csv_lists_tasks_then_core():
    text = core_eval.write_csv({"results": {"a": 0.5}, "centered": {"a": 0.25}, "core": 0.25})
    assert list(csv.reader(io.StringIO(text))) == [
        ["task", "accuracy", "centered"],
        ["a", "0.500000", "0.250000"],
        ["CORE", "", "0.250000"],
    ]


def test_bundle_zip_is_extracted_once_and_bad_sources_explain_themselves(tmp_path, s3_bucket):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in BUNDLE.rglob("*"):
            if f.is_file():
                z.write(f, f"eval_bundle/{f.relative_to(BUNDLE)}")
    uri = f"s3://{s3_bucket}/eval_bundle.zip"
    storage.write_bytes(uri, buf.getvalue())
    path = core_eval.fetch_bundle(uri, tmp_path / "cache")
    assert len(core_eval.load_tasks(path)) == 3
    with pytest.raises(core_eval.EvalBundleError, match="could not fetch the eval bundle"):
        core_eval.fetch_bundle(f"s3://{s3_bucket}/missing.zip", tmp_path / "other")
    broken = tmp_path / "broken"
    shutil.copytree(BUNDLE, broken)
    (broken / "eval_meta_data.csv").write_text("Eval Task,Random baseline\narc_easy,25\n")
    with pytest.raises(core_eval.EvalBundleError, match="winograd has no row in eval_meta_data.csv"):
        core_eval.load_tasks(broken)


@pytest.mark.slow
def test_base_eval_stage_reports_bpb_samples_and_core(tiny_base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_base_run, run)
    check(
        run_stage(
            "base_eval",
            "--run-dir",
            str(run),
            "--eval-bundle",
            str(BUNDLE),
            "--device-batch-size",
            "4",
            "--eval-tokens",
            "2048",
            "--sample-tokens",
            "4",
            "--device",
            "cpu",
        )
    )
    done = read_done(str(run), "baseEval")
    assert 0 < done.metrics["val_bpb"] < 20
    # CORE from the stage's per-task accuracies, by hand: each accuracy is k of the task's fixture
    # items, centred on the bundle's random baseline, and CORE is their mean.
    *rows, core_row = csv.DictReader(io.StringIO(storage.read_text(done.outputs["core_csv"])))
    with open(BUNDLE / "eval_meta_data.csv") as f:
        baselines = {r["Eval Task"]: float(r["Random baseline"]) / 100 for r in csv.DictReader(f)}
    items = {"arc_easy": 6, "winograd": 4, "lambada_openai": 4}
    centered = {}
    for row in rows:
        task, accuracy = row["task"], float(row["accuracy"])
        assert accuracy * items[task] == pytest.approx(round(accuracy * items[task]), abs=1e-4), row
        centered[task] = (accuracy - baselines[task]) / (1 - baselines[task])
        assert float(row["centered"]) == pytest.approx(centered[task], abs=1e-5), row
    assert done.metrics["core_tasks"] == pytest.approx(centered, abs=1e-5) and set(centered) == set(items)
    core = sum(centered.values()) / len(centered)
    assert core_row["task"] == "CORE" and float(core_row["centered"]) == pytest.approx(core, abs=1e-5)
    assert done.metrics["core"] == pytest.approx(core, abs=1e-5)
    assert len(storage.read_json(done.outputs["samples"])) == 5
    again = check(run_stage("base_eval", "--run-dir", str(run), "--device", "cpu"))  # idempotent: a no-op
    assert "already done" in again.stdout
