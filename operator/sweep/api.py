"""The LLMSweep API (nanorun.io/v1alpha1) and its plan: a scaling-law sweep as one resource.

A sweep is a template LLMRun spec and the axes of the sweep. Each point is a child LLMRun that
only pretrains and evaluates the base model, with its depth and its pretraining horizon set by the
sweep:

- a ladder (`tokensPerParam`): every depth trained to the same tokens:params ratio, as nanochat's
  runs/miniseries.sh (base_train's --target-param-data-ratio);
- isoFLOP curves (`flopBudgets`): every depth at every budget, as nanochat's runs/scaling_laws.sh
  (base_train's --target-flops); the report fits the compute-optimal model size per budget
  (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", approach 2).

Every point uses one tokenizer: `template.tokenizer.from` when it names a run, else the tokenizer
trained once by the child run `<sweep>-tokenizer`. Points are named `<sweep>-d<depth>` (ladder) or
`<sweep>-d<depth>-f<budget>` (`scaling-d12-f2p15e18` for 2.15e18 FLOPs) and keep their files in
`<template.storage.uri>/<depth and budget>` (pipeline/sweep.py).

    spec = parse_sweep_spec(yaml.safe_load(open("sweep.yaml"))["spec"])   # SpecError on a bad one
    for p in sweep_points("scaling", spec): print(p.name, point_spec(spec, p).stages.pretrain)

The template is validated with the LLMRun's own rules, re-rooted at `spec.template`, so a mistake
there is named `spec.template.<field>` by the API server and by `nanorun run` alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from nanorun.operator.api import (
    Condition,
    LLMRunSpec,
    Model,
    SpecError,
    parse_spec,
    spec_to_dict,
)
from nanorun.operator.api.llmrun import _format_pydantic
from nanorun.operator.api.rules import RULES, SERVING_ACCESS_RULE, Rule
from nanorun.operator.names import dns_name
from nanorun.pipeline import sweep as sweep_files
from nanorun.pipeline.stages import STAGES
from pydantic import Field, ValidationError

KIND = "LLMSweep"
PLURAL = "llmsweeps"
SINGULAR = "llmsweep"
SHORT_NAMES = ["sweep"]

SweepPhase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
# The only stages a point runs: its tokenizer (copied), pretraining and the base model's evaluation.
POINT_STAGES = ("tokenizer", "pretrain", "baseEval")


class LLMSweepSpec(Model):
    """Pretrain a ladder of depths, or every depth at several FLOP budgets, and fit scaling laws."""

    template: LLMRunSpec = Field(
        description="The LLMRun spec every point starts from. The sweep sets each point's model.depth, its "
        "pretraining horizon, its tokenizer and storage.uri (`<storage.uri>/<point>`), enables only the "
        "tokenizer, pretrain and baseEval stages and turns serving off. storage.uri is the sweep's directory."
    )
    depths: list[Annotated[int, Field(ge=1, le=128)]] = Field(
        min_length=1, max_length=32, description="Model depths to train (each point's model.depth)."
    )
    tokens_per_param: float | None = Field(
        None,
        gt=0,
        description="A ladder: train every depth on this many tokens per scaling parameter "
        "(stages.pretrain.targetParamDataRatio), as nanochat's miniseries.",
    )
    flop_budgets: list[Annotated[float, Field(gt=0)]] | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="IsoFLOP curves: train every depth at each of these training FLOPs "
        "(stages.pretrain.targetFlops), as nanochat's scaling_laws.sh; the report fits the compute-optimal "
        "parameters and tokens per budget.",
    )
    suspend: bool = Field(
        False,
        description="Suspend the sweep: every unfinished point (and the tokenizer run) is suspended, "
        "its pods stop and it keeps its checkpoints; unsetting it resumes the runs the sweep suspended.",
    )


class SweepPointStatus(Model):
    """One point of the sweep: its run and, once it has finished, its numbers."""

    name: str = Field(description="The point's LLMRun.")
    depth: int = Field(description="Model depth.")
    flop_budget: float | None = Field(None, description="Training FLOPs of an isoFLOP point.")
    phase: str = Field("Pending", description="The point's LLMRun phase.")
    val_bpb: float | None = Field(None, description="Validation bits per byte at the end of pretraining.")
    core: float | None = Field(None, description="CORE score of the base model.")
    params: int | None = Field(None, description="Parameters of the model.")
    tokens: int | None = Field(None, description="Training tokens.")
    flops: float | None = Field(None, description="Training FLOPs spent.")
    seconds: float | None = Field(None, description="Seconds of pretraining and evaluation.")


class LLMSweepStatus(Model):
    """Observed state, written by the operator."""

    phase: SweepPhase = Field("Pending", description="Pending, Running, Suspended, Succeeded or Failed.")
    done: int = Field(0, description="Points that have succeeded.")
    running: int = Field(0, description="Points training or evaluating now (or queued), not suspended.")
    total: int = Field(0, description="Points in the sweep.")
    best: str = Field("", description="The finished point with the lowest validation bpb so far.")
    best_bpb: float | None = Field(None, description="Its validation bpb.")
    tokenizer: str = Field("", description="Run directory the points take their tokenizer from.")
    points: list[SweepPointStatus] = Field(default_factory=list, max_length=512, description="Every point.")
    report: str = Field("", description="The sweep report (report.md) once every point has finished.")
    report_job: str = Field("", description="The report's PyTorchJob.")
    report_attempts: int = Field(0, description="Report jobs created so far.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16, description="Ready, Degraded.")
    observed_generation: int = Field(0, description="metadata.generation this status reflects.")


# --- rules ----------------------------------------------------------------------------------------

_HORIZON_FIELDS = ("numIterations", "targetParamDataRatio", "targetFlops")


def _template_rule(rule: Rule) -> Rule:
    """An LLMRun rule moved under spec.template: CEL's `self` is the same object there."""
    check = rule.check
    return Rule(
        "spec.template" + rule.path.removeprefix("spec"),
        rule.cel,
        rule.message,
        lambda s: check(s.template),
        field=rule.field,
    )


SWEEP_RULES: list[Rule] = [
    Rule(
        "spec",
        "has(self.tokensPerParam) != has(self.flopBudgets)",
        "set exactly one of tokensPerParam (a ladder of depths at one tokens:params ratio) and flopBudgets "
        "(isoFLOP curves)",
        lambda s: (s.tokens_per_param is None) != (s.flop_budgets is None),
        field=".tokensPerParam",
    ),
    Rule(
        "spec",
        "self.depths.all(d, self.depths.exists_one(e, e == d))",
        "depths must not repeat a depth",
        lambda s: len(set(s.depths)) == len(s.depths),
        field=".depths",
    ),
    Rule(
        "spec",
        "!has(self.flopBudgets) || self.flopBudgets.all(f, self.flopBudgets.exists_one(g, g == f))",
        "flopBudgets must not repeat a budget",
        lambda s: s.flop_budgets is None or len(set(s.flop_budgets)) == len(s.flop_budgets),
        field=".flopBudgets",
    ),
    Rule(
        "spec",
        " && ".join(f"!has(self.template.stages.pretrain.{f})" for f in _HORIZON_FIELDS),
        "template.stages.pretrain may not set numIterations, targetParamDataRatio or targetFlops: the sweep "
        "sets each point's horizon from tokensPerParam or flopBudgets",
        lambda s: all(
            getattr(s.template.stages.pretrain, a) is None
            for a in ("num_iterations", "target_param_data_ratio", "target_flops")
        ),
        field=".template.stages.pretrain",
    ),
    # The points never serve (the sweep turns serving off), so the template needs no API keys.
    *(_template_rule(r) for r in RULES if not r.transition and r is not SERVING_ACCESS_RULE),
]


def parse_sweep_spec(data: Any) -> LLMSweepSpec:
    """Validate a sweep's spec; SpecError names each field as the API server does."""
    if not isinstance(data, dict):
        raise SpecError("spec: must be a mapping")
    try:
        spec = LLMSweepSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_pydantic(err)) from None
    broken = [f"{r.where}: {r.message}" for r in SWEEP_RULES if not r.check(spec)]
    if broken:
        raise SpecError("\n".join(broken))
    return spec


def sweep_to_dict(spec: LLMSweepSpec) -> dict[str, Any]:
    return spec.model_dump(by_alias=True, exclude_none=True)


# --- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One child run of the sweep."""

    name: str  # the child LLMRun, e.g. "scaling-d12-f1e18"
    folder: str  # its run directory under the sweep's, e.g. "d12-f1e18"
    depth: int
    flop_budget: float | None = None
    tokens_per_param: float | None = None


def budget_tag(flops: float) -> str:
    """A FLOP budget as a name part: 1e18 → "1e18", 2.15e18 → "2p15e18" (no dots in job names)."""
    mantissa, exponent = f"{flops:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.').replace('.', 'p')}e{int(exponent)}"


def sweep_points(name: str, spec: LLMSweepSpec) -> list[Point]:
    """The points, budget by budget, each in the order of `depths`."""
    if spec.flop_budgets is None:
        return [
            Point(dns_name(name, f"d{d}"), f"d{d}", d, tokens_per_param=spec.tokens_per_param)
            for d in spec.depths
        ]
    return [
        Point(dns_name(name, f"d{d}", f"f{budget_tag(f)}"), f"d{d}-f{budget_tag(f)}", d, flop_budget=f)
        for f in spec.flop_budgets
        for d in spec.depths
    ]


def tokenizer_run_name(name: str) -> str:
    return dns_name(name, "tokenizer")


def sweep_dir(spec: LLMSweepSpec) -> str:
    return spec.template.storage.uri.rstrip("/")


def tokenizer_source(spec: LLMSweepSpec) -> str:
    """The run directory every point copies its tokenizer from."""
    return spec.template.tokenizer.from_run or sweep_files.tokenizer_run_dir(sweep_dir(spec))


def trains_tokenizer(spec: LLMSweepSpec) -> bool:
    """Whether the sweep trains its own tokenizer (in the run `<sweep>-tokenizer`) first."""
    return not spec.template.tokenizer.from_run


def _child(spec: LLMSweepSpec, uri: str, enabled: tuple[str, ...]) -> dict[str, Any]:
    d = spec_to_dict(spec.template)
    d["storage"]["uri"] = uri
    d["serving"]["enabled"] = False
    stages = d["stages"]
    for stage in STAGES:
        stages.setdefault(stage.key, {})["enabled"] = stage.key in enabled
    return d


def tokenizer_spec(spec: LLMSweepSpec) -> LLMRunSpec:
    """The child run that trains the sweep's tokenizer: the template's tokenizer stage alone."""
    return parse_spec(_child(spec, tokenizer_source(spec), ("tokenizer",)))


def point_spec(spec: LLMSweepSpec, point: Point) -> LLMRunSpec:
    """A point's LLMRun spec: the template at the point's depth and horizon, pretraining and base
    evaluation only, the sweep's tokenizer, its own folder of the sweep's directory."""
    d = _child(spec, sweep_files.point_dir(sweep_dir(spec), point_info(point)), POINT_STAGES)
    d["model"]["depth"] = point.depth
    d["tokenizer"]["from"] = tokenizer_source(spec)
    pretrain = d["stages"]["pretrain"]
    if point.flop_budget is not None:
        pretrain["targetFlops"] = point.flop_budget
    else:
        pretrain["targetParamDataRatio"] = point.tokens_per_param
    return parse_spec(d)


def point_info(point: Point, gpus: int = 0) -> sweep_files.PointInfo:
    """A point as sweep.json lists it (pipeline/sweep.py)."""
    return sweep_files.PointInfo(
        point.name, point.folder, point.depth, point.flop_budget, point.tokens_per_param, gpus
    )


def point_infos(name: str, spec: LLMSweepSpec) -> list[sweep_files.PointInfo]:
    """What sweep.json lists: the points and the GPUs each trains on (for GPU-hours)."""
    c = spec.template.compute
    return [point_info(p, c.nodes * c.gpus_per_node) for p in sweep_points(name, spec)]
