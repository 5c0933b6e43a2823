"""The stage plan: THE list of pipeline stages and the flags each one gets from an LLMRun spec.

Both executors read it: the operator turns each planned stage into a PyTorchJob, `nanorun run`
into a local process. A stage runs as

    python -m nanorun.trainer.<entry> <args...> --run-dir <storage.uri> [--metrics-port N]

under torchrun on nodes × processes-per-node processes when `distributed`, else as one process.

    for s in stage_plan(spec): print(s.key, s.entry_point, s.args)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from nanorun.operator.api import LLMRunSpec
from nanorun.pipeline.stages import BY_KEY, MODEL_KEYS, STAGES


@dataclass(frozen=True)
class PlannedStage:
    key: str  # the stage's name, e.g. "pretrain": its folder, job label and job name
    module: str  # its trainer module, e.g. "base_train": the command line, nothing else
    args: list[str] = field(default_factory=list)  # the stage's flags, extraArgs last
    distributed: bool = False

    @property
    def entry_point(self) -> str:
        """What `python -m` runs: "nanorun.trainer.base_train"."""
        return f"nanorun.trainer.{self.module}"

    def flags(self, run_dir: str, metrics_port: int | None) -> list[str]:
        """What follows `-m <module>` in the stage's command, in both executors: the stage's flags,
        then the run directory and the port of its Prometheus endpoint (None: none). Those two come
        last because argparse keeps a flag's last value: no extraArgs can move a run's files or its
        metrics port (api/rules.py refuses them at admission too)."""
        port = ["--metrics-port", str(metrics_port)] if metrics_port is not None else []
        return [*self.args, "--run-dir", run_dir, *port]


def _flags(pairs: list[tuple[str, object]]) -> list[str]:
    """`--flag value` for every pair whose value is set (None means: the stage's own default)."""
    out: list[str] = []
    for flag, value in pairs:
        if value is not None:
            out += [flag, str(value)]
    return out


def _compile_flag(compile_: bool | None) -> list[str]:
    """spec.model.compile as the stages' --compile / --no-compile (unset: their own default)."""
    return [] if compile_ is None else ["--compile" if compile_ else "--no-compile"]


def _stage_args(key: str, spec: LLMRunSpec) -> list[str]:
    m, t, s = spec.model, spec.tokenizer, spec.stages
    if key == "tokenizer":
        if t.from_run:  # copy another run's tokenizer instead of training one
            return ["--from", t.from_run]
        return _flags(
            [
                ("--data", spec.data.pretrain),
                ("--vocab-size", t.vocab_size),
                ("--max-chars", t.max_chars),
                ("--doc-cap", t.doc_cap),
            ]
        )
    if key == "pretrain":
        p = s.pretrain
        return _flags(
            [
                ("--data", spec.data.pretrain),
                ("--shards", spec.data.shards or None),
                ("--depth", m.depth),
                ("--max-seq-len", m.max_seq_len),
                ("--head-dim", m.head_dim),
                ("--aspect-ratio", m.aspect_ratio),
                ("--n-kv-head", m.n_kv_head),
                ("--window-pattern", m.window_pattern),
                ("--device-batch-size", p.device_batch_size),
                ("--total-batch-size", p.total_batch_size),
                ("--num-iterations", p.num_iterations),
                ("--target-flops", p.target_flops),
                ("--target-param-data-ratio", p.target_param_data_ratio),
                ("--embedding-lr", p.embedding_lr),
                ("--unembedding-lr", p.unembedding_lr),
                ("--matrix-lr", p.matrix_lr),
                ("--scalar-lr", p.scalar_lr),
                ("--weight-decay", p.weight_decay),
                ("--eval-every", p.eval_every),
                ("--save-every", p.save_every),
            ]
        ) + _compile_flag(m.compile)
    if key == "baseEval":
        return _flags(
            [
                ("--device-batch-size", s.base_eval.device_batch_size),
                ("--max-per-task", s.base_eval.max_per_task),
            ]
        ) + _compile_flag(m.compile)
    if key in ("midtrain", "sft", "rl"):
        st = getattr(s, key)
        return _flags(
            [("--num-iterations", st.num_iterations), ("--device-batch-size", st.device_batch_size)]
        ) + _compile_flag(m.compile)
    if key == "eval":
        return _flags([("--max-problems", s.eval.max_problems)])
    if key == "export":
        return _flags([("--source", final_model_stage(spec)), ("--dtype", s.export.dtype)])
    return []


def stage_spec(spec: LLMRunSpec, key: str):
    """The spec.stages entry of a stage key."""
    return getattr(spec.stages, BY_KEY[key].attribute)


def stage_plan(spec: LLMRunSpec) -> list[PlannedStage]:
    """The enabled stages of a run, in order, with their flags (extraArgs last, so they win)."""
    plan = []
    for stage in STAGES:
        st = stage_spec(spec, stage.key)
        if st.enabled:
            plan.append(
                PlannedStage(
                    stage.key,
                    stage.module,
                    _stage_args(stage.key, spec) + list(st.extra_args),
                    stage.distributed,
                )
            )
    return plan


def config_ids(plan: list[PlannedStage]) -> dict[str, str]:
    """Stage key → an id of everything that decides the stage's result: its key and flags, and
    the id of the stage before it (so a change upstream changes every id after it). A stage whose
    done.json carries another id ran with another configuration and runs again."""
    ids: dict[str, str] = {}
    previous = ""
    for s in plan:
        digest = hashlib.sha256("\0".join([previous, s.key, *s.args]).encode()).hexdigest()[:16]
        ids[s.key] = previous = digest
    return ids


def final_model_stage(spec: LLMRunSpec) -> str | None:
    """The last enabled stage that saves a model (what serving loads and the export stage exports)."""
    enabled = [k for k in MODEL_KEYS if stage_spec(spec, k).enabled]
    return enabled[-1] if enabled else None
