"""The stage table: every fact about the pipeline's stages, in one place.

Everything that lists stages derives from `STAGES`: the LLMRun spec (`spec.stages.<key>`, checked by
a test against `StagesSpec`), the CRD's validation rules, the operator's plan and both executors,
the report, the chat stages that load and evaluate models, and the `--source` defaults of the
post-training stages.

A stage has two names:

- `key`, the name a user sees: `spec.stages.pretrain`, `status.stages[].name`, `kubectl get llmrun`,
  the report;
- `module`, its entry point `python -m nanorun.trainer.<module>` (as in nanochat's scripts:
  `base_train`, `chat_sft`, ...), which is also its folder in the run directory and its job label
  (`nanorun.io/stage`).

Adding a stage: a row here, its spec model in operator/api.py, its flags in operator/plan.py, and
the module in trainer/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    key: str  # the spec/status name, e.g. "pretrain"
    module: str  # nanorun.trainer.<module>, the run-directory folder and the job label, e.g. "base_train"
    distributed: bool  # runs under torchrun on every GPU of every node (else one process)
    model: str = ""  # the checkpoint it saves: "" (none), "base" or "chat"
    starts_from: tuple[str, ...] = ()  # keys of the stages whose checkpoint it continues, first finished wins
    report_column: str = ""  # its column in the report's metrics table

    @property
    def attribute(self) -> str:
        """The Python name of `spec.stages.<key>` (the spec's fields are camelCase in YAML)."""
        return re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), self.key)


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
    Stage("report", "report", distributed=False),
)

BY_KEY: dict[str, Stage] = {s.key: s for s in STAGES}
BY_MODULE: dict[str, Stage] = {s.module: s for s in STAGES}
KEYS: tuple[str, ...] = tuple(s.key for s in STAGES)
# Stages that save a model checkpoint, in pipeline order (the last enabled one is what serving loads).
MODEL_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.model)
# Modules whose checkpoints are chat models, newest first (what chat evaluation picks from).
CHAT_MODULES: tuple[str, ...] = tuple(s.module for s in reversed(STAGES) if s.model == "chat")
# Modules with any model checkpoint, newest first (what the chat engine loads from a run directory).
MODEL_MODULES: tuple[str, ...] = tuple(s.module for s in reversed(MODEL_STAGES))
TOKENIZER = BY_KEY["tokenizer"]


def source_modules(key: str) -> str:
    """The `--source` default of a stage that continues a checkpoint: its sources' modules,
    comma-separated (e.g. "mid_train,base_train" for sft)."""
    return ",".join(BY_KEY[k].module for k in BY_KEY[key].starts_from)
