"""The LLMRun's cross-field rules: each is a CEL expression the API server evaluates at admission
(operator/api/crd.py puts them into the CRD) and the same test in Python, which `parse_spec` runs for
`nanorun run`, so both refuse a spec with the same message naming the same field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nanorun.pipeline.stages import MODEL_KEYS, MODEL_STAGES, STAGES

if TYPE_CHECKING:
    from nanorun.operator.api.llmrun import ComputeSpec, LLMRunSpec


@dataclass(frozen=True)
class Rule:
    """A check the schema's types and limits cannot express. `path` is where the CEL rule sits in
    the schema ("" = the whole object, "spec", "spec.serving", or a field itself, where `self` is its
    value); `field` (a CEL fieldPath under `path`, e.g. ".serving.minReplicas") is the field the
    API server names when the rule fails; `check` is the same test in Python, on the spec (and, for
    transition rules, the old spec and whether any stage has run)."""

    path: str
    cel: str
    message: str
    check: Callable[..., bool]
    transition: bool = False
    field: str = ""

    @property
    def where(self) -> str:
        """The field a refusal names: `spec.serving.minReplicas`."""
        return self.path + self.field


def _batch_divisible(s: LLMRunSpec) -> bool:
    p = s.stages.pretrain
    if p.total_batch_size is None:
        return True
    unit = p.device_batch_size * s.model.max_seq_len * s.compute.nodes * s.compute.processes_per_node
    return p.total_batch_size % unit == 0


def _asks_for_gpus(c: ComputeSpec) -> bool:
    return any(c.gpu_resource in c.resources.get(kind, {}) for kind in ("limits", "requests"))


# The same regular expressions in CEL (RE2) and Python.
# An S3 URI names a bucket and a prefix in it. The bucket's spelling is the store's to judge
# (S3-compatible stores differ, and a wrong name fails the run with the store's own error), its
# presence is ours; a run never owns a whole bucket (cleanupOnDelete deletes everything under the
# URI), and no `..` segment makes a prefix look like another (local paths resolve it).
S3_URI_PATTERN = r"^s3://[^/]+/[^/].*$"
DOTDOT_PATTERN = r"(^|/)[.][.](/|$)"
# A LocalQueue is a Kubernetes object (a DNS subdomain name) and its name a label value (<= 63).
QUEUE_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# What apimachinery's ParseQuantity accepts (the pattern kubebuilder puts on quantities).
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _quantity_rule(section: str, field: str) -> Rule:
    """spec.<section>.<field> is empty or a Kubernetes quantity (a rule on the string itself)."""
    attr = re.sub(r"(?<!^)(?=[A-Z])", "_", field).lower()

    def check(s: Any) -> bool:
        value = getattr(getattr(s, section), attr)
        return not value or re.search(QUANTITY_PATTERN, value) is not None

    return Rule(
        f"spec.{section}.{field}",
        "self == '' || isQuantity(self)",
        "must be a Kubernetes quantity such as 32, 500m or 256Gi (binary suffixes Ki, Mi, Gi, Ti; decimal k, M, G, T)",
        check,
    )


# Flags the operator sets from fields it checks: where a stage reads and writes the run's files, and
# the port Prometheus scrapes (and the NetworkPolicy opens). reconcile/plan.py puts them after extraArgs, so
# argparse keeps the operator's value even for an abbreviation (`--run-d`); the rule says so early.
OPERATOR_FLAGS = ("--run-dir", "--metrics-port")


def _extra_args_rule(key: str, attribute: str) -> Rule:
    def check(s: Any) -> bool:
        args = getattr(s.stages, attribute).extra_args
        return not any(a == f or a.startswith(f + "=") for a in args for f in OPERATOR_FLAGS)

    owned = " || ".join(f"a == '{f}' || a.startsWith('{f}=')" for f in OPERATOR_FLAGS)
    return Rule(
        f"spec.stages.{key}.extraArgs",
        f"!self.exists(a, {owned})",
        f"must not set {' or '.join(OPERATOR_FLAGS)}: the operator sets them from spec.storage.uri "
        "and spec.metricsPort",
        check,
    )


# The chat service is reachable by anyone who reaches its Service: who may use its API is a choice
# the spec makes, never a default. (A sweep's points never serve, so its template is exempt.)
SERVING_ACCESS_RULE = Rule(
    "spec",
    "!self.serving.enabled || (self.serving.apiKeysSecret != '') != self.serving.allowUnauthenticated",
    "serving.enabled needs exactly one of serving.apiKeysSecret (a Secret holding the chat API's keys) and "
    "serving.allowUnauthenticated: true (no keys: anyone who reaches the Service may use the API); or set "
    "serving.enabled: false",
    lambda s: not s.serving.enabled or bool(s.serving.api_keys_secret) != s.serving.allow_unauthenticated,
    field=".serving.apiKeysSecret",
)
_RAN = "has(oldSelf.status) && has(oldSelf.status.stages) && oldSelf.status.stages.exists(s, s.attempts > 0)"

RULES: list[Rule] = [
    Rule(
        "spec",
        "!has(self.stages.pretrain.totalBatchSize) || self.stages.pretrain.totalBatchSize % "
        "(self.stages.pretrain.deviceBatchSize * self.model.maxSeqLen * self.compute.nodes * "
        "(self.compute.gpusPerNode > 0 ? self.compute.gpusPerNode : 1)) == 0",
        "stages.pretrain.totalBatchSize must be a multiple of deviceBatchSize × model.maxSeqLen × "
        "compute.nodes × compute.gpusPerNode (tokens of one micro-step over all processes)",
        _batch_divisible,
        field=".stages.pretrain.totalBatchSize",
    ),
    Rule(
        "spec",
        "self.serving.minReplicas <= self.serving.maxReplicas",
        "serving.minReplicas must not exceed serving.maxReplicas",
        lambda s: s.serving.min_replicas <= s.serving.max_replicas,
        field=".serving.minReplicas",
    ),
    Rule(
        "spec",
        " || ".join(f"self.stages.{s.key}.enabled" for s in STAGES),
        "at least one stage must be enabled",
        lambda s: any(getattr(s.stages, st.attribute).enabled for st in STAGES),
        field=".stages",
    ),
    Rule(
        "spec",
        "!self.serving.enabled || " + " || ".join(f"self.stages.{k}.enabled" for k in MODEL_KEYS),
        f"serving.enabled needs a stage that produces a model ({', '.join(MODEL_KEYS[:-1])} or "
        f"{MODEL_KEYS[-1]}); enable one or set serving.enabled: false",
        lambda s: (
            not s.serving.enabled or any(getattr(s.stages, st.attribute).enabled for st in MODEL_STAGES)
        ),
        field=".serving.enabled",
    ),
    SERVING_ACCESS_RULE,
    # Workers on other nodes read the tokenizer and write checkpoints next to the Master's.
    Rule(
        "spec",
        "self.compute.nodes == 1 || self.storage.uri.startsWith('s3://')",
        "compute.nodes > 1 needs storage.uri on S3 (s3://bucket/prefix): every node reads and writes "
        "the same run directory",
        lambda s: s.compute.nodes == 1 or s.storage.uri.startswith("s3://"),
        field=".compute.nodes",
    ),
    # A CPU pod that asks for a GPU waits for one it never uses (or is never scheduled).
    Rule(
        "spec.compute",
        "self.gpusPerNode > 0 || !has(self.resources) || !("
        "(has(self.resources.limits) && self.gpuResource in self.resources.limits) || "
        "(has(self.resources.requests) && self.gpuResource in self.resources.requests))",
        "compute.resources asks for compute.gpuResource while compute.gpusPerNode is 0; "
        "set gpusPerNode to the GPUs of each node instead",
        lambda s: s.compute.gpus_per_node > 0 or not _asks_for_gpus(s.compute),
        field=".resources",
    ),
    # tokenizer.from: the tokenizer stage's pod reads that run's tokenizer, so on a cluster it is on S3.
    Rule(
        "spec",
        "self.tokenizer.from == '' || !self.storage.uri.startsWith('s3://') || "
        "self.tokenizer.from.startsWith('s3://')",
        "tokenizer.from must be on S3 (s3://bucket/prefix) when storage.uri is: the tokenizer stage's pod "
        "reads it from there",
        lambda s: (
            not s.tokenizer.from_run
            or not s.storage.uri.startswith("s3://")
            or s.tokenizer.from_run.startswith("s3://")
        ),
        field=".tokenizer.from",
    ),
    Rule(
        "spec",
        "self.tokenizer.from == '' || self.tokenizer.from != self.storage.uri",
        "tokenizer.from must be another run's directory, not this run's own storage.uri",
        lambda s: not s.tokenizer.from_run or s.tokenizer.from_run != s.storage.uri,
        field=".tokenizer.from",
    ),
    Rule(
        "spec.storage.uri",
        f"!self.startsWith('s3:') || self.matches('{S3_URI_PATTERN}')",
        "an S3 URI must name a bucket and a prefix in it: s3://bucket/prefix",
        lambda s: not s.storage.uri.startswith("s3:") or re.search(S3_URI_PATTERN, s.storage.uri) is not None,
    ),
    Rule(
        "spec.storage.uri",
        f"!self.matches('{DOTDOT_PATTERN}')",
        "must not contain a '..' segment",
        lambda s: re.search(DOTDOT_PATTERN, s.storage.uri) is None,
    ),
    Rule(
        "spec.compute.queue",
        f"self == '' || self.matches('{QUEUE_PATTERN}')",
        "must be the name of a Kueue LocalQueue (it becomes the kueue.x-k8s.io/queue-name label): "
        "lowercase letters, digits, '-' and '.', starting and ending with a letter or digit",
        lambda s: not s.compute.queue or re.search(QUEUE_PATTERN, s.compute.queue) is not None,
    ),
    *(_quantity_rule("compute", field) for field in ("cpu", "memory", "shmSize")),
    *(_quantity_rule("serving", field) for field in ("memoryPerReplica", "headCpu", "headMemory")),
    *(_extra_args_rule(s.key, s.attribute) for s in STAGES),
]


def _immutable_once_run(field: str, why: str) -> Rule:
    """`spec.<field>` may not change once any stage has run (a transition rule)."""

    def value(spec: LLMRunSpec) -> Any:
        for part in field.split("."):
            spec = getattr(spec, part)
        return spec

    return Rule(
        "",
        f"!({_RAN}) || self.spec.{field} == oldSelf.spec.{field}",
        f"spec.{field} may not change once a stage has run ({why}); create a new LLMRun",
        lambda new, old, ran: not ran or value(new) == value(old),
        transition=True,
    )


RULES += [
    _immutable_once_run("model", "its checkpoints have that shape"),
    _immutable_once_run("tokenizer", "the model's vocabulary depends on it"),
    _immutable_once_run("storage.uri", "the run's files are there"),
]
