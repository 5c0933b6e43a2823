"""The task mixtures of each post-training stage, with an offline fallback.

    train, val, report = sft_mixture(cache="<run-dir>/task_data")
    print(report)            # which tasks were used and which were skipped (and why)

Every mixture names the tasks nanochat trains on. A task whose data cannot be downloaded (no
network, no cached copy) is skipped with its reason; the mixture then leans on the tasks that need
no download: the spelling tasks, the identity set, the shipped conversation set and, for RL, the
synthetic arithmetic problems. A mixture that ends up empty is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nanorun.trainer.tasks.arc import ARC
from nanorun.trainer.tasks.arithmetic import Arithmetic
from nanorun.trainer.tasks.common import Task, TaskMixture
from nanorun.trainer.tasks.customjson import CONVERSATIONS_PATH, IDENTITY_PATH, CustomJSON
from nanorun.trainer.tasks.gsm8k import GSM8K
from nanorun.trainer.tasks.hf import TaskDataUnavailable
from nanorun.trainer.tasks.humaneval import HumanEval
from nanorun.trainer.tasks.mmlu import MMLU
from nanorun.trainer.tasks.smoltalk import SmolTalk
from nanorun.trainer.tasks.spelling import SimpleSpelling, SpellingBee


@dataclass
class MixtureReport:
    used: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> reason

    def __str__(self) -> str:
        lines = [f"tasks used: {', '.join(self.used) or '(none)'}"]
        lines += [f"task skipped: {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _collect(
    specs: list[tuple[str, Callable[[], Task]]], report: MixtureReport, repeat: dict[str, int] | None = None
) -> list[Task]:
    tasks = []
    for name, make in specs:
        try:
            task = make()
        except TaskDataUnavailable as err:
            report.skipped[name] = err.reason
            continue
        report.used.append(
            f"{name} ({len(task)})" + (f" x{repeat[name]}" if repeat and repeat.get(name, 1) > 1 else "")
        )
        tasks.extend([task] * (repeat or {}).get(name, 1))
    return tasks


def _mixture(tasks: list[Task], what: str, report: MixtureReport) -> TaskMixture:
    if not tasks:
        raise RuntimeError(f"no task data available for the {what} mixture:\n{report}")
    return TaskMixture(tasks)


def _capped(limit: int | None, size: int) -> int:
    return min(limit or size, size)


def _conversation_tasks(
    cache: str, limit: int | None, spelling_bee: int, simple_spelling: int, arithmetic: int
) -> list[tuple[str, Callable[[], Task]]]:
    """The training tasks of midtraining and SFT (which differ in the sizes of the generated ones)."""
    return [
        ("SmolTalk", lambda: SmolTalk("train", cache=cache, stop=limit)),
        ("MMLU-aux", lambda: MMLU("auxiliary_train", cache=cache, stop=limit)),
        ("GSM8K", lambda: GSM8K("train", cache=cache, stop=limit)),
        ("identity", lambda: CustomJSON(IDENTITY_PATH)),
        ("conversations", lambda: CustomJSON(CONVERSATIONS_PATH)),
        ("SpellingBee", lambda: SpellingBee("train", size=_capped(limit, spelling_bee))),
        ("SimpleSpelling", lambda: SimpleSpelling("train", size=_capped(limit, simple_spelling))),
        ("Arithmetic", lambda: Arithmetic("train", size=_capped(limit, arithmetic))),
    ]


def midtrain_mixture(cache: str, limit: int | None = None) -> tuple[Task, Task, MixtureReport]:
    """(train, val) for midtraining: SmolTalk, MMLU auxiliary_train, GSM8K, identity, spelling."""
    report = MixtureReport()
    train = _collect(
        _conversation_tasks(cache, limit, spelling_bee=80_000, simple_spelling=200_000, arithmetic=20_000),
        report,
        repeat={"identity": 2},
    )
    val = _collect(
        [
            ("SmolTalk-test", lambda: SmolTalk("test", cache=cache, stop=limit)),
            ("SpellingBee-test", lambda: SpellingBee("test", size=_capped(limit, 2000))),
            ("Arithmetic-test", lambda: Arithmetic("test", size=_capped(limit, 2000))),
        ],
        MixtureReport(),
    )
    return _mixture(train, "midtraining", report), _mixture(val, "midtraining validation", report), report


def sft_mixture(cache: str, limit: int | None = None) -> tuple[Task, Task, MixtureReport]:
    """(train, val) for SFT: SmolTalk, MMLU aux x3, GSM8K x4, identity, spelling, arithmetic."""
    report = MixtureReport()
    train = _collect(
        _conversation_tasks(cache, limit, spelling_bee=300, simple_spelling=300, arithmetic=1000),
        report,
        repeat={"MMLU-aux": 3, "GSM8K": 4, "identity": 2, "conversations": 2},
    )
    val = _collect(
        [
            ("SmolTalk-test", lambda: SmolTalk("test", cache=cache, stop=limit)),
            ("conversations", lambda: CustomJSON(CONVERSATIONS_PATH)),
            ("Arithmetic-test", lambda: Arithmetic("test", size=_capped(limit, 200))),
        ],
        MixtureReport(),
    )
    return _mixture(train, "SFT", report), _mixture(val, "SFT validation", report), report


def rl_tasks(cache: str, task: str = "GSM8K") -> tuple[Task, Task, MixtureReport]:
    """(train, test) for RL: GSM8K, or the synthetic arithmetic problems when GSM8K is unavailable
    (or asked for by name)."""
    report = MixtureReport()
    if task == "GSM8K":
        try:
            train, test = GSM8K("train", cache=cache), GSM8K("test", cache=cache)
            report.used.append(f"GSM8K ({len(train)})")
            return train, test, report
        except TaskDataUnavailable as err:
            report.skipped["GSM8K"] = err.reason
    elif task != "Arithmetic":
        raise ValueError(f"unknown RL task {task!r}: GSM8K or Arithmetic")
    train, test = Arithmetic("train", size=10_000), Arithmetic("test", size=500)
    report.used.append(f"Arithmetic ({len(train)})")
    return train, test, report


EVAL_TASKS: dict[str, Callable[[str], Task]] = {
    "ARC-Easy": lambda cache: ARC("ARC-Easy", cache=cache),
    "ARC-Challenge": lambda cache: ARC("ARC-Challenge", cache=cache),
    "MMLU": lambda cache: MMLU("all", "test", cache=cache),
    "GSM8K": lambda cache: GSM8K("test", cache=cache),
    "HumanEval": lambda cache: HumanEval(cache=cache),
    "SpellingBee": lambda cache: SpellingBee("test", size=256),
    "Arithmetic": lambda cache: Arithmetic("test", size=256),
}
# The chance accuracy of each eval task, for ChatCORE's centring (generative tasks: 0).
RANDOM_BASELINE = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25}
CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
