"""The LLMRun's status (nanorun.io/v1alpha1), which the operator writes: the run's phase and
progress, a record per stage (attempts, failures, preemptions, stalls, metrics), serving and
conditions. The spec's models: llmrun.py."""

from __future__ import annotations

from typing import Literal

from nanorun.operator.api.llmrun import Model, Phase
from pydantic import Field


class Condition(Model):
    """A Kubernetes-style condition."""

    type: str = Field(description="Ready, Progressing, Degraded, Queued or Stalled.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason.")
    message: str = Field("", description="Human-readable details.")
    last_transition_time: str = Field("", description="When status last changed (RFC 3339).")


class StageMetrics(Model):
    """Numbers read from the stage's progress.json and done.json."""

    step: int | None = Field(None, description="Current step.")
    total_steps: int | None = Field(None, description="Total steps.")
    loss: float | None = Field(None, description="Training loss.")
    val_bpb: float | None = Field(None, description="Validation bits per byte.")
    tokens_per_second: float | None = Field(None, description="Training throughput.")
    mfu: float | None = Field(None, description="Model FLOPs utilisation, 0..1.")
    eta_seconds: float | None = Field(None, description="Estimated seconds to the end of the stage.")


class StageStatus(Model):
    """One stage's record."""

    name: str = Field(description="Stage key (tokenizer, pretrain, ...).")
    phase: Phase = Field(
        "Pending",
        description="Pending, Queued (waiting in the Kueue queue), Running, Succeeded, Failed or Suspended.",
    )
    job: str = Field("", description="The current attempt's PyTorchJob.")
    attempts: int = Field(0, description="Jobs created for this stage so far.")
    start_time: str = Field("", description="When the first attempt started (RFC 3339).")
    completion_time: str = Field("", description="When the stage succeeded or finally failed (RFC 3339).")
    duration_seconds: float | None = Field(None, description="Seconds from start to completion.")
    outputs: dict[str, str] = Field(
        default_factory=dict, description="What the stage produced, e.g. its checkpoint URI."
    )
    metrics: StageMetrics = Field(default_factory=StageMetrics, description="Latest metrics of the stage.")
    message: str = Field("", description="Why the last attempt failed, if it did.")
    failed_attempt: int = Field(
        0, description="The last attempt known to have failed (kept when its job is gone)."
    )
    failure_time: str = Field("", description="When that attempt failed (RFC 3339).")
    failures: int = Field(0, description="Failed attempts that count against retry.maxAttempts.")
    preemptions: int = Field(
        0, description="Attempts ended by a preemption, eviction or node loss (not counted as failures)."
    )
    preempted_attempt: int = Field(0, description="The last attempt that ended by a preemption.")
    stalls: int = Field(
        0, description="Attempts ended because the stage stopped progressing (not counted as failures)."
    )
    stalled_attempt: int = Field(0, description="The last attempt that stalled.")
    stalled_step: int | None = Field(None, description="The step at which that attempt stalled.")
    last_stall: str = Field(
        "", description="What the last stall's ranks reported: last heartbeat and progress, stack dumps."
    )
    config_id: str = Field(
        "",
        description="Id of the stage's flags and everything upstream; when the spec changes it, the stage runs again.",
    )

    @property
    def failed_by_stalling(self) -> bool:
        """Failed by stalling again at the step of its previous stall: the last attempt is the stalled one."""
        return self.phase == "Failed" and self.stalled_attempt == self.attempts


class ServingStatus(Model):
    """The chat service."""

    ray_service: str = Field("", description="Name of the RayService.")
    ready: bool = Field(False, description="Whether the RayService reports Ready.")
    url: str = Field("", description="In-cluster URL of the OpenAI-compatible API.")
    checkpoint: str = Field("", description="Checkpoint being served.")


class LLMRunStatus(Model):
    """Observed state, written by the operator."""

    phase: Phase = Field(
        "Pending",
        description="Pending, Queued (waiting in the Kueue queue), Running, Succeeded, Failed or Suspended.",
    )
    stage: str = Field("", description="Stage running now (or the last one).")
    progress: str = Field("", description="step/total of the current stage.")
    loss: float | None = Field(None, description="Latest training loss of the current stage.")
    eta: str = Field(
        "", description="Estimated time left in the current stage (from its progress), e.g. 1h05m."
    )
    stages: list[StageStatus] = Field(
        default_factory=list, max_length=16, description="Per-stage records, in plan order."
    )
    checkpoint: str = Field("", description="Latest final checkpoint of the pipeline.")
    launcher: str = Field(
        "",
        description="The kind of job the stages run as (PyTorchJob or TrainJob), chosen when the first job is "
        "created and kept, so `compute.launcher: auto` never switches kinds in the middle of a run.",
    )
    serving: ServingStatus = Field(default_factory=ServingStatus, description="The chat service.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Ready, Progressing, Degraded; Queued when compute.queue is set; Stalled once a stage stalled.",
    )
    observed_generation: int = Field(0, description="metadata.generation this status reflects.")
