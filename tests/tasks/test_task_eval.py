"""Each evaluation computes the right score on fixture items, with stand-in models whose answers are
scripted (see scripted.py), and the shared Task plumbing (slices, mixtures, sequences)."""

from __future__ import annotations

import pytest
from nanorun.trainer.tasks.arc import ARC
from nanorun.trainer.tasks.arithmetic import Arithmetic
from nanorun.trainer.tasks.common import TaskMixture, TaskSequence, run_categorical_eval, run_generative_eval
from nanorun.trainer.tasks.gsm8k import GSM8K
from nanorun.trainer.tasks.humaneval import HumanEval
from nanorun.trainer.tasks.mmlu import MMLU
from nanorun.trainer.tasks.spelling import SimpleSpelling, SpellingBee

from tests.tasks.byte_tokenizer import ByteTokenizer
from tests.tasks.scripted import ScriptedEngine, ScriptedLogitsModel

TOK = ByteTokenizer()


def test_categorical_eval_scores_the_letter_with_the_highest_logit(fake_hub, tmp_path):
    mmlu = MMLU("all", "test", cache=str(tmp_path))
    model = ScriptedLogitsModel(TOK, {"2+2?": "B", "Capital of Italy?": "C"})  # right, then wrong
    result = run_categorical_eval(mmlu, model, TOK, batch_size=2)
    assert result == {"accuracy": 0.5, "correct": 1, "total": 2}


def test_categorical_eval_only_considers_the_offered_letters(fake_hub, tmp_path):
    arc = ARC("ARC-Easy", cache=str(tmp_path))
    # "Z" is not an option: the logits of the offered letters tie and the first one ("A"/"1") is taken
    model = ScriptedLogitsModel(TOK, {"mammal": "Z", "freezes": "Z"})
    assert run_categorical_eval(arc, model, TOK)["correct"] == 1  # only e2 ("1") is right


def test_generative_eval_is_pass_at_k_over_samples(fake_hub, tmp_path):
    gsm8k = GSM8K("train", cache=str(tmp_path))
    engine = ScriptedEngine(TOK, {"Tom has": ["#### 11", "#### 12"], "Ann had": ["#### 7", "#### 9"]})
    assert run_generative_eval(gsm8k, engine, TOK, num_samples=1)["accuracy"] == 0.0
    result = run_generative_eval(gsm8k, engine, TOK, num_samples=2)
    assert (result["accuracy"], result["correct"], result["total"]) == (0.5, 1, 2)


def test_humaneval_eval_runs_the_generated_code(fake_hub, tmp_path):
    # A correct program returns at once, so a budget that a loaded machine cannot exhaust costs nothing;
    # only the program that never ends waits out its (short) timeout.
    humaneval = HumanEval(cache=str(tmp_path), timeout=60.0)
    right = ScriptedEngine(TOK, {"def area": "def area(r):\n    return math.pi * r * r\n"})
    wrong = ScriptedEngine(TOK, {"def area": "def area(r):\n    return 2 * math.pi * r\n"})  # the perimeter
    endless = ScriptedEngine(TOK, {"def area": "def area(r):\n    while True: pass\n"})
    assert run_generative_eval(humaneval, right, TOK)["accuracy"] == 1.0
    assert run_generative_eval(humaneval, wrong, TOK)["accuracy"] == 0.0
    impatient = HumanEval(cache=str(tmp_path), timeout=1.0)
    assert run_generative_eval(impatient, endless, TOK)["accuracy"] == 0.0


def test_spelling_bee_reference_reply_is_consistent_with_the_calculator():
    from nanorun.trainer.chat.calculator import calculate

    task = SpellingBee("train", size=50)
    for i in range(len(task)):
        example = task[i]
        parts = example["messages"][1]["content"]
        call, output = parts[1], parts[2]
        assert calculate(call["text"]) == output["text"] == example["answer"]
        reply = "".join(p["text"] for p in parts)
        assert task.evaluate(example, reply)
    assert not task.evaluate(task[0], f"#### {int(task[0]['answer']) + 1}")


def test_arithmetic_reference_reply_is_consistent_with_the_calculator():
    from nanorun.trainer.chat.calculator import calculate

    task = Arithmetic("test", size=50)
    for i in range(len(task)):
        example = task[i]
        parts = example["messages"][1]["content"]
        assert calculate(parts[1]["text"]) == parts[2]["text"] == example["answer"]
        assert task.evaluate(example, "".join(p["text"] for p in parts))
    assert Arithmetic("test", size=5)[3] == task[3]  # deterministic
    assert Arithmetic("train", size=5)[3] != task[3]  # splits differ


def test_simple_spelling_spells_letter_by_letter():
    task = SimpleSpelling("test", size=3)
    example = task[0]
    word = example["messages"][0]["content"].removeprefix("Spell the word: ")
    assert example["messages"][1]["content"] == ",".join(word)
    assert task.evaluate(example, ",".join(word) + "\n") and not task.evaluate(example, word)


def test_slices_mixtures_and_sequences_index_every_example_once():
    a, b = SimpleSpelling("train", size=5), Arithmetic("train", size=3)
    assert len(SimpleSpelling("train", size=10, start=2, stop=9, step=3)) == 3  # 2, 5, 8
    assert SimpleSpelling("train", size=10, start=2, step=3)[1] == SimpleSpelling("train", size=10)[5]
    mixture = TaskMixture([a, b], seed=1)
    assert len(mixture) == 8
    seen = [mixture[i] for i in range(8)]
    assert sorted(map(str, seen)) == sorted(map(str, [a[i] for i in range(5)] + [b[i] for i in range(3)]))
    assert [mixture[i] for i in range(8)] == [TaskMixture([a, b], seed=1)[i] for i in range(8)]
    sequence = TaskSequence([a, b])
    assert sequence[5] == b[0] and len(sequence) == 8
    with pytest.raises(IndexError):
        sequence[8]


def test_a_question_longer_than_the_context_counts_as_failed_instead_of_crashing(fake_hub, tmp_path):
    from nanorun.trainer.chat.engine import ContextOverflowError

    class ShortContextEngine(ScriptedEngine):
        def generate_batch(self, tokens, **kwargs):
            if "Ann had" in self.tokenizer.decode(tokens):
                raise ContextOverflowError("prompt longer than the context")
            return super().generate_batch(tokens, **kwargs)

    gsm8k = GSM8K("train", cache=str(tmp_path))
    engine = ShortContextEngine(TOK, {"Tom has": "#### 12"})
    assert run_generative_eval(gsm8k, engine, TOK) == {
        "accuracy": 0.5,
        "correct": 1,
        "total": 2,
        "too_long": 1,
    }


def test_categorical_eval_keeps_the_end_of_prompts_longer_than_the_context(fake_hub, tmp_path):
    import types

    class ShortContextModel(ScriptedLogitsModel):
        config = types.SimpleNamespace(sequence_len=90)  # the prompts have 111 and 136 tokens
        widths: list[int] = []

        def __call__(self, ids):
            self.widths.append(ids.shape[1])
            return super().__call__(ids)

    mmlu = MMLU("all", "test", cache=str(tmp_path))
    model = ShortContextModel(TOK, {"- 4=B": "B", "- Rome=A": "A"})  # the choices are at the end: kept
    assert run_categorical_eval(mmlu, model, TOK)["accuracy"] == 1.0
    assert max(model.widths) == 90
