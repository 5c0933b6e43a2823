"""The stage table: every fact about the pipeline's stages, in one place.

Everything that lists stages derives from `STAGES`: the LLMRun spec (`spec.stages.<key>`, checked by
a test against `StagesSpec`), the CRD's validation rules, the operator's plan and both executors,
the report, the chat stages that load and evaluate models, and the `--source` defaults of the
post-training stages.

A stage has one name wherever a user sees it, its `key`: `spec.stages.pretrain`,
`status.stages[].name`, `kubectl get llmrun`, its folder in the run directory (`<run-dir>/pretrain/`),
its job label (`nanorun.io/stage=pretrain`) and job name (`<run>-pretrain-1`, the key in kebab case:
`Stage.dns`), `NANORUN_STAGE`, the `stage` of progress.json and done.json and of the trainer's
metrics, `--source`, logs and the report. Its `module` is only its entry point, the command line
`python -m nanorun.trainer.<module>` (as in nanochat's scripts: `base_train`, `chat_sft`, ...).

Adding a stage: a row here, its spec model in operator/api/llmrun.py, its flags in
operator/reconcile/plan.py, and the module in trainer/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    key: str  # the stage's name, e.g. "pretrain" (spec, status, folder, labels, metrics, logs)
    module: str  # the entry point nanorun.trainer.<module>, e.g. "base_train"
    distributed: bool  # runs under torchrun on every GPU of every node (else one process)
    model: str = ""  # the checkpoint it saves: "" (none), "base" or "chat"
    starts_from: tuple[str, ...] = ()  # keys of the stages whose checkpoint it continues, first finished wins
    report_column: str = ""  # its column in the report's metrics table

    @property
    def entry_point(self) -> str:
        """What `python -m` runs: "nanorun.trainer.base_train"."""
        return f"nanorun.trainer.{self.module}"

    @property
    def attribute(self) -> str:
        """The Python name of `spec.stages.<key>` (the spec's fields are camelCase in YAML)."""
        return _split_words(self.key, "_")

    @property
    def dns(self) -> str:
        """The key in a Kubernetes object's name, lowercase kebab case: "baseEval" → "base-eval"."""
        return _split_words(self.key, "-")


def _split_words(key: str, sep: str) -> str:
    return re.sub(r"[A-Z]", lambda m: sep + m.group(0).lower(), key)


STAGES: tuple[Stage, ...] = (
    Stage("tokenizer", "tok_train", distributed=False),
    Stage("pretrain", "base_train", distributed=True, model="base", report_column="BASE"),
    Stage("baseEval", "base_eval", distributed=True, starts_from=("pretrain",)),
    Stage(
        "midtrain",
        "mid_train",
        distributed=True,
        model="chat",
        starts_from=("pretrain",),
        report_column="MID",
    ),
    Stage(
        "sft",
        "chat_sft",
        distributed=True,
        model="chat",
        starts_from=("midtrain", "pretrain"),
        report_column="SFT",
    ),
    Stage("rl", "chat_rl", distributed=True, model="chat", starts_from=("sft",), report_column="RL"),
    Stage("eval", "chat_eval", distributed=True),
    # Off by default; after eval so that turning it on re-runs nothing but the report, which links it.
    Stage("export", "export", distributed=False),
    Stage("report", "report", distributed=False),
)

BY_KEY: dict[str, Stage] = {s.key: s for s in STAGES}
KEYS: tuple[str, ...] = tuple(s.key for s in STAGES)
# The stages that save a model checkpoint, and their keys, in pipeline order: the last one that
# finished is a run's model (what serving loads, what chat evaluation's `latest` means).
MODEL_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.model)
MODEL_KEYS: tuple[str, ...] = tuple(s.key for s in MODEL_STAGES)
# Keys of the model stages whose checkpoints are chat models, in pipeline order.
CHAT_KEYS: tuple[str, ...] = tuple(s.key for s in MODEL_STAGES if s.model == "chat")
TOKENIZER = BY_KEY["tokenizer"]


def by_key(key: str) -> Stage:
    """The stage whose key is `key`, or a ValueError that lists the keys."""
    try:
        return BY_KEY[key]
    except KeyError:
        raise ValueError(f"no stage {key!r}; the stages are {', '.join(KEYS)}") from None


def source_keys(key: str) -> str:
    """The `--source` default of a stage that continues a checkpoint: the keys of the stages it
    starts from, comma-separated (e.g. "midtrain,pretrain" for sft)."""
    return ",".join(BY_KEY[key].starts_from)
