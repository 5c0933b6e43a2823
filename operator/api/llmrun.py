"""The LLMRun API (nanorun.io/v1alpha1): pydantic models of the spec (those of the status: status.py).

These models are the single source of truth. They generate the CRD's structural schema
(`nanorun.operator.api.crd`), the configuration reference (`docs/configuration.md`) and the validation
`nanorun run FILE` applies locally. Checks beyond types and limits (across fields, or a format such
as an S3 URI or a quantity) are `Rule`s: each one is a CEL expression the API server evaluates at
admission, the message it answers with, and the same check in Python. Local schema errors use the
API server's wording, so a mistake gets the same message, naming the same field, on a cluster and
on a laptop.

    spec = parse_spec(yaml.safe_load(open("run.yaml"))["spec"])   # SpecError on a bad spec
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from nanorun.operator.api.rules import RULES
from nanorun.pipeline import defaults
from nanorun.serving import SERVE_MAX_REQUEST_BYTES, SERVE_RATE_LIMIT_PER_MINUTE
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from pydantic.alias_generators import to_camel
from typing_extensions import TypedDict

GROUP = "nanorun.io"
VERSION = "v1alpha1"
KIND = "LLMRun"
PLURAL = "llmruns"
SINGULAR = "llmrun"
SHORT_NAMES = ["llm"]
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_IMAGE = "ghcr.io/nanorun/nanorun-trainer:0.1.0"  # the Dockerfile's target `trainer`
DEFAULT_SERVING_IMAGE = "ghcr.io/nanorun/nanorun-serving:0.1.0"  # the Dockerfile's target `serving`
DEFAULT_RAY_VERSION = "2.60.0"

Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]


class Model(BaseModel):
    """Base: camelCase field names in YAML, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# --- spec -----------------------------------------------------------------------------------------


class StorageSpec(Model):
    """Where the run keeps everything: tokenizer, checkpoints, progress files, the report."""

    uri: str = Field(
        min_length=1,
        max_length=1024,
        description="Run directory: `s3://bucket/prefix` on a cluster (a local path works for `nanorun run`).",
    )
    endpoint: str = Field(
        "",
        max_length=1024,
        description="S3 endpoint URL for S3-compatible stores (MinIO, Ceph...); empty means AWS.",
    )
    credentials_secret: str = Field(
        "",
        max_length=253,
        description="Name of a Secret in the run's namespace with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; empty means the pods' own identity (IRSA, workload identity).",
    )
    cleanup_on_delete: bool = Field(
        False,
        description="Delete the run's files from storage when the LLMRun is deleted (adds a finalizer).",
    )


class DataSpec(Model):
    """Pretraining text."""

    pretrain: str = Field(
        "bundled",
        min_length=1,
        max_length=1024,
        description="Parquet shards with a `text` column: a local dir, `s3://...`, `hf://owner/dataset`, or `bundled` for the corpus shipped with nanorun.",
    )
    shards: int = Field(0, ge=0, description="How many shards to use; 0 means all of them.")


class ModelSpec(Model):
    """The GPT. Everything else (width, heads, batch, learning rates, horizon) derives from depth."""

    depth: int = Field(
        defaults.DEPTH, ge=1, le=128, description="Number of transformer layers; width = depth × aspectRatio."
    )
    max_seq_len: int = Field(defaults.MAX_SEQ_LEN, ge=16, le=131072, description="Context length in tokens.")
    head_dim: int | None = Field(
        None, ge=8, le=512, description=f"Attention head dimension (trainer default {defaults.HEAD_DIM})."
    )
    aspect_ratio: int | None = Field(
        None,
        ge=1,
        le=1024,
        description=f"Model width per layer of depth (trainer default {defaults.ASPECT_RATIO}).",
    )
    n_kv_head: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Key/value heads for grouped-query attention (trainer default: as many as query heads).",
    )
    window_pattern: str | None = Field(
        None,
        pattern=r"^[SL]+$",
        max_length=64,
        description="Sliding-window attention pattern per layer, S = short window, L = full context, repeated over depth (e.g. SSSL). Unset: SSSL where Flash Attention 3 runs, L elsewhere.",
    )
    compile: bool | None = Field(
        None,
        description="torch.compile the model in pretrain, baseEval (bits per byte), midtrain, sft and rl: true forces it, false runs eagerly. Unset: pretrain, baseEval and midtrain compile on GPUs, and on CPUs from 1e13 FLOPs of work; sft and rl (batches of changing shape) only when true.",
    )


class TokenizerSpec(Model):
    """The byte-level BPE tokenizer trained in the tokenizer stage."""

    vocab_size: int = Field(
        defaults.VOCAB_SIZE, ge=512, le=131072, description="Vocabulary size including the special tokens."
    )
    max_chars: int = Field(2_000_000_000, ge=1, description="Characters of pretraining text to train on.")
    doc_cap: int = Field(10000, ge=1, description="At most this many characters from each document.")
    from_run: str = Field(
        "",
        alias="from",
        max_length=1024,
        description="Another run's directory (`s3://...` or a local path): its tokenizer is copied into this "
        "run instead of training one, so runs compared with each other (a sweep's points) share a "
        "vocabulary; vocabSize, maxChars and docCap are then unused.",
    )


# A Kubernetes quantity in a resource map: `8`, `500m`, `256Gi` (int-or-string in the CRD).
Quantity = Annotated[int | str, WithJsonSchema({"x-kubernetes-int-or-string": True})]


class ResourceRequirements(TypedDict, total=False):
    """core/v1 ResourceRequirements, typed so the CEL rules can see which resources it asks for."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    limits: Annotated[dict[str, Quantity], Field(description="Resource limits, e.g. `{rdma/ib: 1}`.")]
    requests: Annotated[dict[str, Quantity], Field(description="Resource requests.")]
    claims: Annotated[
        list[dict[str, Any]], Field(description="Dynamic resource claims (core/v1 ResourceClaim).")
    ]


class ComputeSpec(Model):
    """Where and on how much hardware the training stages run."""

    nodes: int = Field(
        1, ge=1, le=1024, description="Nodes (pods) per distributed stage: one Master plus nodes-1 Workers."
    )
    gpus_per_node: int = Field(
        1,
        ge=0,
        le=64,
        description="GPUs per node, one training process each; 0 runs one CPU process per node.",
    )
    gpu_resource: str = Field(
        "nvidia.com/gpu", max_length=253, description="Extended resource name requested for GPUs."
    )
    cpu: str = Field(
        "",
        max_length=64,
        description="CPU request and limit per pod (Kubernetes quantity, e.g. `32`); empty leaves it unset.",
    )
    memory: str = Field(
        "",
        max_length=64,
        description="Memory request and limit per pod (e.g. `256Gi`); empty leaves it unset.",
    )
    shm_size: str = Field(
        "",
        max_length=64,
        description="Size of an in-memory /dev/shm volume (e.g. `16Gi`) for data loader workers and NCCL; empty leaves the runtime's default.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the training pods must match."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Tolerations of the training pods (core/v1 Toleration)."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict, description="Affinity of the training pods (core/v1 Affinity)."
    )
    priority_class_name: str = Field(
        "",
        max_length=253,
        description="PriorityClass of the training pods (PyTorchJob; a TrainJob's pods take the one of its "
        "training runtime, as Trainer v2's runtimePatches cannot set it).",
    )
    queue: str = Field(
        "",
        max_length=63,
        description="Kueue LocalQueue: sets the kueue.x-k8s.io/queue-name label so Kueue admits the jobs.",
    )
    launcher: Literal["auto", "PyTorchJob", "TrainJob"] = Field(
        "auto",
        description="The kind of job that runs each stage: `PyTorchJob` (Kubeflow training-operator, "
        "kubeflow.org/v1), `TrainJob` (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1) or `auto`: TrainJob "
        "where the cluster serves the trainjobs.trainer.kubeflow.org CRD, else PyTorchJob. The choice is kept "
        "in status.launcher for the rest of the run.",
    )
    training_runtime: str = Field(
        "nanorun-torch",
        max_length=253,
        description="The ClusterTrainingRuntime a TrainJob references (the chart installs `nanorun-torch` with "
        "`trainer.runtime.enabled`).",
    )
    resources: ResourceRequirements = Field(
        default_factory=dict,
        description="Extra container resources merged over the derived ones (core/v1 ResourceRequirements), e.g. `{limits: {rdma/ib: 1}}`.",
    )
    ttl_seconds_after_finished: int = Field(
        86400,
        ge=0,
        description="Seconds a finished stage job is kept before it is deleted (by the training-operator for a "
        "PyTorchJob, by the nanorun operator for a TrainJob).",
    )
    termination_grace_period_seconds: int = Field(
        120,
        ge=0,
        le=86400,
        description="Seconds a training pod has between SIGTERM (preemption, eviction, deletion) and SIGKILL: enough to "
        "finish the step and write a checkpoint to storage.",
    )
    node_lost_toleration_seconds: int = Field(
        60,
        ge=0,
        le=86400,
        description="Seconds a training pod stays bound to a node that stopped reporting (the node.kubernetes.io/"
        "not-ready and unreachable NoExecute taints) before it is evicted and the stage resumes elsewhere, as a "
        "preemption; Kubernetes' default is 300. A toleration of compute.tolerations for those keys wins.",
    )

    @property
    def processes_per_node(self) -> int:
        """Training processes per node: one per GPU, or one on a CPU-only node."""
        return self.gpus_per_node or 1


class StageSpec(Model):
    enabled: bool = Field(True, description="Run this stage.")
    # Bounded, so that the API server can bound the cost of the CEL rule on them (rules.py).
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list,
        max_length=128,
        description="Extra command-line flags passed to the stage module as they are (before the operator's own "
        "--run-dir and --metrics-port, which they may not set).",
    )


class TokenizerStage(StageSpec):
    """Train the BPE tokenizer (entry point `tok_train`); its settings are in spec.tokenizer."""


class PretrainStage(StageSpec):
    """Pretrain the base model (entry point `base_train`). Unset values are derived from depth, as in nanochat."""

    target_param_data_ratio: float | None = Field(
        None,
        gt=0,
        description="Training tokens per parameter; sets the horizon when numIterations is unset "
        f"(trainer default {defaults.PARAM_DATA_RATIO}).",
    )
    num_iterations: int | None = Field(
        None, ge=1, description="Optimizer steps; overrides the param:data ratio."
    )
    target_flops: float | None = Field(
        None,
        gt=0,
        description="Training FLOPs to spend (FLOPs per token × tokens, as nanochat's --target-flops); sets the "
        "horizon when numIterations is unset, before targetParamDataRatio.",
    )
    device_batch_size: int = Field(
        defaults.DEVICE_BATCH_SIZE, ge=1, description="Sequences per process per micro-step."
    )
    total_batch_size: int | None = Field(
        None,
        ge=1,
        description="Tokens per optimizer step, reached by gradient accumulation (derived from depth when unset).",
    )
    embedding_lr: float | None = Field(None, gt=0, description="AdamW learning rate of the token embedding.")
    unembedding_lr: float | None = Field(None, gt=0, description="AdamW learning rate of the LM head.")
    matrix_lr: float | None = Field(None, gt=0, description="Muon learning rate of the block matrices.")
    scalar_lr: float | None = Field(None, gt=0, description="AdamW learning rate of the scalar parameters.")
    weight_decay: float | None = Field(None, ge=0, description="Weight decay.")
    eval_every: int | None = Field(
        None, ge=1, description="Steps between validation bits-per-byte evaluations."
    )
    save_every: int | None = Field(
        None, ge=1, description="Steps between checkpoints (one is always written at the end and on SIGTERM)."
    )


class BaseEvalStage(StageSpec):
    """Evaluate the base model (entry point `base_eval`): validation bpb, CORE, samples."""

    max_per_task: int | None = Field(None, ge=1, description="At most this many examples per CORE task.")
    device_batch_size: int | None = Field(None, ge=1, description="Sequences per process per forward pass.")


class PostTrainStage(StageSpec):
    """A post-training stage: midtrain, sft or rl (entry points `mid_train`, `chat_sft`, `chat_rl`)."""

    num_iterations: int | None = Field(
        None, ge=1, description="Optimizer steps (stage default: one epoch of its mixture)."
    )
    device_batch_size: int | None = Field(None, ge=1, description="Sequences per process per micro-step.")


class EvalStage(StageSpec):
    """Evaluate the chat model (entry point `chat_eval`): ARC, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE."""

    max_problems: int | None = Field(None, ge=1, description="At most this many problems per task.")


class ExportStage(StageSpec):
    """Write the final model as a Hugging Face folder, `<run-dir>/export/model/` (`export`; see docs/export.md)."""

    enabled: bool = Field(False, description="Run this stage (off unless asked for).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype of the exported weights."
    )


class ReportStage(StageSpec):
    """Write `<run-dir>/report/report.md` (`report`)."""


class StagesSpec(Model):
    """The pipeline's stages, run in this order; each can be disabled and given its own flags."""

    tokenizer: TokenizerStage = Field(default_factory=TokenizerStage, description="BPE tokenizer training.")
    pretrain: PretrainStage = Field(default_factory=PretrainStage, description="Base model pretraining.")
    base_eval: BaseEvalStage = Field(default_factory=BaseEvalStage, description="Base model evaluation.")
    midtrain: PostTrainStage = Field(
        default_factory=PostTrainStage, description="Midtraining on the conversation mixture."
    )
    sft: PostTrainStage = Field(default_factory=PostTrainStage, description="Supervised finetuning.")
    rl: PostTrainStage = Field(default_factory=PostTrainStage, description="Reinforcement learning on GSM8K.")
    eval: EvalStage = Field(default_factory=EvalStage, description="Chat model evaluation.")
    export: ExportStage = Field(
        default_factory=ExportStage,
        description="The final model as a Hugging Face folder, which transformers loads with the model code it ships.",
    )
    report: ReportStage = Field(default_factory=ReportStage, description="The run report.")


class ServingSpec(Model):
    """The chat service (a KubeRay RayService), started once every stage of the run has succeeded."""

    enabled: bool = Field(True, description="Serve the final checkpoint once training has finished.")
    min_replicas: int = Field(
        1, ge=0, le=1000, description="Fewest Ray Serve replicas (0 scales to zero when idle)."
    )
    max_replicas: int = Field(1, ge=1, le=1000, description="Most Ray Serve replicas.")
    gpus_per_replica: float = Field(
        1, ge=0, le=64, description="GPUs per replica (fractions share a GPU); 0 serves on CPU."
    )
    cpus_per_replica: float = Field(
        1,
        ge=0,
        le=512,
        description="CPUs per replica: the Ray actor's num_cpus and its worker pod's CPU request and limit (fractions allowed, at least 0.1).",
    )
    memory_per_replica: str = Field(
        "",
        max_length=64,
        description="Memory request and limit of each serving worker pod (Kubernetes quantity, e.g. 16Gi); empty leaves it unset.",
    )
    gpu_resource: str = Field(
        "nvidia.com/gpu",
        max_length=253,
        description="Extended resource name requested for the replicas' GPUs.",
    )
    head_cpu: str = Field(
        "2",
        max_length=64,
        description="CPU request and limit of the Ray head pod (it runs the GCS, the dashboard and the HTTP proxy, no replica).",
    )
    head_memory: str = Field(
        "",
        max_length=64,
        description="Memory request and limit of the Ray head pod (e.g. 8Gi); empty leaves it unset.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels the serving pods must match (the training pods have compute.nodeSelector).",
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Tolerations of the serving pods (core/v1 Toleration)."
    )
    target_ongoing_requests: float | None = Field(
        None,
        gt=0,
        description="Autoscaling target of concurrent requests per replica; unset: the replica's continuous-batching slots (16), so a replica is scaled out once its batch is full.",
    )
    ray_version: str = Field(
        DEFAULT_RAY_VERSION, max_length=64, description="Ray version of the serving image."
    )
    image: str = Field(
        DEFAULT_SERVING_IMAGE,
        min_length=1,
        max_length=1024,
        description="Serving image: Ray Serve and nanorun (the Dockerfile's target `serving`), not the trainer image.",
    )
    api_keys_secret: str = Field(
        "",
        max_length=253,
        description="Name of a Secret in the run's namespace holding the chat API's keys: every data value is one "
        "key or several, one per line (at least 16 characters each, e.g. `openssl rand -hex 32`). Clients send "
        "`Authorization: Bearer <key>` (the openai client's api_key) to /v1 and /api; /healthz, /metrics and the "
        "web UI's pages stay open. Mounted read-only into the serving pods, so a changed Secret takes effect "
        "without a restart. Serving needs this or allowUnauthenticated.",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="Serve /v1 and /api without API keys: anyone who reaches the Service may use them (rate "
        "limits then apply per client address). Serving needs this or apiKeysSecret.",
    )
    max_request_bytes: int = Field(
        SERVE_MAX_REQUEST_BYTES,
        ge=1024,
        le=67108864,
        description="Largest request body a replica accepts, in bytes; a larger one is refused with 413 before "
        "it is parsed.",
    )
    rate_limit_per_minute: int = Field(
        SERVE_RATE_LIMIT_PER_MINUTE,
        ge=0,
        le=1000000,
        description="Requests per minute each API key may make to each replica (a token bucket holding as many; "
        "over it: 429 with Retry-After). With N replicas a key may make up to N times this in all. 0 means "
        "no limit.",
    )


class RetrySpec(Model):
    """What happens when a stage's job fails (it resumes from its last checkpoint)."""

    max_attempts: int = Field(3, ge=1, le=100, description="Attempts per stage before the run fails.")
    backoff_seconds: int = Field(
        30, ge=0, le=86400, description="Wait before the second attempt; doubles for each further one."
    )
    stall_timeout_seconds: int | None = Field(
        None,
        ge=1,
        le=604800,
        description="Seconds a running stage may go without progress (no step, evaluation batch or checkpoint "
        "chunk on some rank, or a rank's heartbeats stopped) before it is Stalled: its job is deleted and the next "
        "attempt resumes from the last checkpoint. Unset: derived from the stage itself (10 of its steps, twice "
        "its longest compile or evaluation so far, at least 600). While a rank compiles, evaluates or "
        "checkpoints, the stage may wait twice that pause's longest so far, at least 1800 s.",
    )
    heartbeat_seconds: int = Field(
        15,
        ge=1,
        le=3600,
        description="How often each training process writes its heartbeat (`<run>/<stage>/ranks/`), which stall "
        "detection reads; keep it well under stallTimeoutSeconds.",
    )


class LLMRunSpec(Model):
    """Train a chat model from scratch: tokenizer, pretraining, post-training, evaluation, serving."""

    image: str = Field(
        DEFAULT_IMAGE,
        min_length=1,
        max_length=1024,
        description="Trainer image (PyTorch and nanorun, the Dockerfile's target `trainer`), used by every stage; serving has its own, serving.image.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Pull policy of the trainer image."
    )
    storage: StorageSpec = Field(description="Where the run keeps its files.")
    data: DataSpec = Field(default_factory=DataSpec, description="Pretraining data.")
    model: ModelSpec = Field(
        default_factory=ModelSpec, description="Model size and shape; may not change once a stage has run."
    )
    tokenizer: TokenizerSpec = Field(
        default_factory=TokenizerSpec, description="Tokenizer settings; may not change once a stage has run."
    )
    compute: ComputeSpec = Field(
        default_factory=ComputeSpec, description="Nodes, GPUs and scheduling of the training jobs."
    )
    stages: StagesSpec = Field(default_factory=StagesSpec, description="Which stages run, and their flags.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="The chat service.")
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Retries of failed stages.")
    suspend: bool = Field(
        False,
        description="Suspend the running job (its pods stop; it resumes from its checkpoint when unset).",
    )
    metrics_port: int = Field(
        9400, ge=1, le=65535, description="Port of each training process's Prometheus metrics."
    )


# --- status ---------------------------------------------------------------------------------------


class SpecError(ValueError):
    """A spec that does not validate; the message lists every problem, one per line."""


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _supported(error: dict[str, Any]) -> str:
    values = ", ".join(f'"{v}"' for v in re.findall(r"'([^']*)'", error["ctx"]["expected"]))
    return f"Unsupported value: {json.dumps(error['input'])}: supported values: {values}"


# pydantic's errors in the API server's words for the same schema check, so that a mistake reads
# the same on a laptop as on a cluster; other errors keep pydantic's wording.
_SERVER_WORDS: dict[str, Callable[[dict[str, Any], str], str]] = {
    "greater_than_equal": lambda e, _: f"should be greater than or equal to {_num(e['ctx']['ge'])}",
    "greater_than": lambda e, _: f"should be greater than {_num(e['ctx']['gt'])}",
    "less_than_equal": lambda e, _: f"should be less than or equal to {_num(e['ctx']['le'])}",
    "less_than": lambda e, _: f"should be less than {_num(e['ctx']['lt'])}",
    "string_too_short": lambda e, _: f"should be at least {e['ctx']['min_length']} chars long",
    "too_short": lambda e, _: f"should have at least {e['ctx']['min_length']} items",
    "too_long": lambda e, _: f"Too many: must have at most {e['ctx']['max_length']} items",
    "string_too_long": lambda e, _: f"Too long: may not be more than {e['ctx']['max_length']} bytes",
    "string_pattern_mismatch": lambda e, _: f"should match '{e['ctx']['pattern']}'",
    "literal_error": lambda e, _: _supported(e),
    "extra_forbidden": lambda e, where: f'unknown field "{where}"',
    "missing": lambda e, _: "Required value",
    "int_parsing": lambda e, _: "must be of type integer",
    "int_type": lambda e, _: "must be of type integer",
    "int_from_float": lambda e, _: "must be of type integer",
    "bool_parsing": lambda e, _: "must be of type boolean",
    "bool_type": lambda e, _: "must be of type boolean",
    "string_type": lambda e, _: "must be of type string",
    "float_parsing": lambda e, _: "must be of type number",
    "float_type": lambda e, _: "must be of type number",
}


def _format_pydantic(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
        words = _SERVER_WORDS.get(e["type"])
        lines.append(f"{where}: {words(e, where) if words else e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def parse_spec(data: dict[str, Any]) -> LLMRunSpec:
    """Validate a spec (the YAML's `spec:` mapping) and apply the rules.

    Raises SpecError with the messages the API server gives for the same mistakes, each on a line
    that starts with the field it names (`spec.compute.queue: must be ...`).
    """
    if not isinstance(data, dict):
        raise SpecError("spec: must be a mapping")
    try:
        spec = LLMRunSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_pydantic(err)) from None
    broken = [f"{r.where}: {r.message}" for r in RULES if not r.transition and not r.check(spec)]
    if broken:
        raise SpecError("\n".join(broken))
    return spec


def check_update(old: LLMRunSpec, new: LLMRunSpec, stage_has_run: bool) -> list[str]:
    """Messages of the transition rules (immutability) a change from `old` to `new` breaks."""
    return [r.message for r in RULES if r.transition and not r.check(new, old, stage_has_run)]


def spec_to_dict(spec: LLMRunSpec) -> dict[str, Any]:
    """The spec as the API server stores it: camelCase, unset optional fields left out."""
    return spec.model_dump(by_alias=True, exclude_none=True)
