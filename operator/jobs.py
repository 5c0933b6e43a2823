"""The PyTorchJob (kubeflow.org/v1) of one attempt at one stage: a pure function of the spec.

    job = pytorchjob_for_stage(run, spec, planned_stage, attempt=1)

Named `<run>-<stage>-<attempt>` (`speedrun-base-eval-1`: the stage's key in kebab case; DNS-1035,
deterministic, so a second create is a 409), owned by the LLMRun, labelled
`nanorun.io/{run,stage,attempt}` (the stage's key). The container `pytorch` runs

    torchrun -m nanorun.trainer.<module> ... --run-dir <storage.uri> --metrics-port N

(`python -m` for single-process stages) on a Master plus nodes-1 Workers; torchrun reads the PET_*
variables the training operator injects. S3 credentials come from the referenced Secret. The pods
pass Pod Security Admission's `restricted` profile and mount no ServiceAccount token
(operator/security.py).
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from nanorun.operator.api import API_VERSION, KIND, LLMRunSpec
from nanorun.operator.names import (
    ANNOTATION_RUN_DIR,
    LABEL_ATTEMPT,
    LABEL_CONFIG,
    LABEL_RUN,
    LABEL_STAGE,
    PYTORCHJOB_GROUP,
    PYTORCHJOB_VERSION,
    QUEUE_LABEL,
)
from nanorun.operator.plan import PlannedStage, processes_per_node
from nanorun.operator.security import TRAINER_USER, restrict
from nanorun.pipeline.stages import stage_named

CONTAINER_NAME = "pytorch"  # the training operator requires this name
RENDEZVOUS_PORT = 23456  # the training operator's default `pytorchjob-port`
MAX_NAME = 63  # DNS-1035 label; the training operator's Services are named after the job


@dataclass(frozen=True)
class RunRef:
    """What a child needs to know about its LLMRun."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def dns_name(*parts: str, limit: int = MAX_NAME) -> str:
    """Join parts into a DNS-1035 label of at most `limit` characters; a too-long first part is cut
    and keeps a short hash."""
    tail = "-".join(re.sub(r"[^a-z0-9-]", "-", p.lower()) for p in parts[1:])
    head = re.sub(r"[^a-z0-9-]", "-", parts[0].lower()).strip("-")
    room = limit - len(tail) - 1
    if len(head) > room:
        digest = hashlib.sha256(parts[0].encode()).hexdigest()[:6]
        head = f"{head[: room - 7].rstrip('-')}-{digest}"
    name = f"{head}-{tail}" if tail else head
    if not name[0].isalpha():
        name = "r" + name[1:]
    return name


def job_name(run: str, stage: str, attempt: int, limit: int = MAX_NAME) -> str:
    """`<run>-<stage>-<attempt>` with the stage key in kebab case, e.g. `speedrun-base-eval-1`."""
    return dns_name(run, stage_named(stage).dns, str(attempt), limit=limit)


def storage_env(spec: LLMRunSpec) -> list[dict[str, Any]]:
    """S3 endpoint and credentials for a pod: the same variables the operator itself reads."""
    env: list[dict[str, Any]] = []
    if spec.storage.endpoint:
        env += [
            {"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint},
            {"name": "AWS_ENDPOINT_URL_S3", "value": spec.storage.endpoint},
        ]
    if spec.storage.credentials_secret:
        env += [
            {
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": spec.storage.credentials_secret, "key": key}},
            }
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ]
    return env


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def placement(spec: LLMRunSpec) -> dict[str, Any]:
    """The pod fields that place a run's pods (compute.nodeSelector, tolerations, affinity), those set."""
    c = spec.compute
    fields = {"nodeSelector": c.node_selector, "tolerations": c.tolerations, "affinity": c.affinity}
    return {key: copy.deepcopy(value) for key, value in fields.items() if value}


def resources(spec: LLMRunSpec, gpus: int) -> dict[str, Any]:
    c = spec.compute
    amounts: dict[str, Any] = {}
    if c.cpu:
        amounts["cpu"] = c.cpu
    if c.memory:
        amounts["memory"] = c.memory
    limits = dict(amounts)
    if gpus:
        limits[c.gpu_resource] = gpus
    out: dict[str, Any] = {}
    if amounts:
        out["requests"] = amounts
    if limits:
        out["limits"] = limits
    return _merge(out, c.resources)


def command_for_stage(spec: LLMRunSpec, stage: PlannedStage) -> list[str]:
    """The container command: `torchrun` (the training-operator sets its node and rank flags
    through PET_* variables) or `python` for a one-process stage."""
    launcher = ["torchrun", "-m"] if stage.distributed else ["python", "-m"]
    return [*launcher, stage.module, *stage.flags(spec.storage.uri, spec.metrics_port)]


def stage_labels(
    run: RunRef, spec: LLMRunSpec, stage: PlannedStage, attempt: int, config_id: str
) -> dict[str, str]:
    """The labels of a stage job (and, without the queue label, of its pods)."""
    labels = {
        LABEL_RUN: run.name,
        LABEL_STAGE: stage.key,
        LABEL_ATTEMPT: str(attempt),
        LABEL_CONFIG: config_id,
        "app.kubernetes.io/name": "nanorun-trainer",
        "app.kubernetes.io/managed-by": "nanorun",
    }
    if spec.compute.queue:
        labels[QUEUE_LABEL] = spec.compute.queue
    return labels


def stage_env(
    run: RunRef, spec: LLMRunSpec, stage: PlannedStage, attempt: int, config_id: str
) -> list[dict[str, Any]]:
    """The trainer container's environment: which run, stage, attempt and configuration it is, and storage."""
    return [
        {"name": "NANORUN_RUN", "value": run.name},
        {"name": "NANORUN_STAGE", "value": stage.key},
        {"name": "NANORUN_ATTEMPT", "value": str(attempt)},
        {"name": "NANORUN_CONFIG_ID", "value": config_id},
        *storage_env(spec),
    ]


def pod_metadata(spec: LLMRunSpec, labels: dict[str, str]) -> dict[str, Any]:
    """The metadata of a stage's pods: the job's labels but Kueue's (which belongs on the job), and
    the annotations Prometheus' pod discovery reads."""
    return {
        "labels": {k: v for k, v in labels.items() if k != QUEUE_LABEL},
        "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(spec.metrics_port)},
    }


def stage_shape(spec: LLMRunSpec, stage: PlannedStage) -> tuple[int, int, int]:
    """(nodes, processes per node, GPUs per node) of a stage: a one-process stage gets one CPU pod."""
    if not stage.distributed:
        return 1, 1, 0
    return spec.compute.nodes, processes_per_node(spec), spec.compute.gpus_per_node


def pytorchjob_for_stage(
    run: RunRef, spec: LLMRunSpec, stage: PlannedStage, attempt: int, config_id: str = ""
) -> dict[str, Any]:
    """The PyTorchJob manifest for one attempt (from 1) at one planned stage; `config_id` (from
    plan.config_ids) is passed to the stage, which records it in done.json and its checkpoints."""
    name = job_name(run.name, stage.key, attempt)
    labels = stage_labels(run, spec, stage, attempt, config_id)
    nodes, nproc, gpus = stage_shape(spec, stage)
    env = stage_env(run, spec, stage, attempt, config_id)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": command_for_stage(spec, stage),
        "env": env,
        "ports": [
            {"name": "pytorchjob-port", "containerPort": RENDEZVOUS_PORT},
            {"name": "metrics", "containerPort": spec.metrics_port},
        ],
    }
    amounts = resources(spec, gpus)
    if amounts:
        container["resources"] = amounts
    # SIGTERM → the trainer finishes its step, checkpoints and exits; the grace period must cover that.
    pod: dict[str, Any] = {
        "containers": [container],
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": spec.compute.termination_grace_period_seconds,
    }
    if spec.compute.shm_size:
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
        pod["volumes"] = [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.compute.shm_size}}
        ]
    pod.update(placement(spec))
    if spec.compute.priority_class_name:
        pod["priorityClassName"] = spec.compute.priority_class_name
    template = {"metadata": pod_metadata(spec, labels), "spec": restrict(pod, user=TRAINER_USER)}
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if nodes > 1:
        replicas["Worker"] = {
            "replicas": nodes - 1,
            "restartPolicy": "Never",
            "template": copy.deepcopy(template),
        }
    return {
        "apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}",
        "kind": "PyTorchJob",
        "metadata": {
            "name": name,
            "namespace": run.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_RUN_DIR: spec.storage.uri},
            "ownerReferences": [run.owner_reference()],
        },
        "spec": {
            "pytorchReplicaSpecs": replicas,
            "nprocPerNode": str(nproc),
            "runPolicy": {
                # One pod failure fails the attempt; the operator retries the stage from its checkpoint.
                "backoffLimit": 0,
                "cleanPodPolicy": "Running",
                "ttlSecondsAfterFinished": spec.compute.ttl_seconds_after_finished,
                # With a Kueue queue the job starts suspended and Kueue admits it.
                "suspend": bool(spec.suspend or spec.compute.queue),
            },
        },
    }
