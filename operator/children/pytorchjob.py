"""The PyTorchJob (kubeflow.org/v1) of one attempt at one stage: a pure function of the spec.

    job = pytorchjob_for_stage(run, spec, planned_stage, attempt=1)

Named `<run>-<stage>-<attempt>` (`speedrun-base-eval-1`: the stage's key in kebab case; DNS-1035,
deterministic, so a second create is a 409), owned by the LLMRun, labelled
`nanorun.io/{run,stage,attempt}` (the stage's key). The container `pytorch` runs

    torchrun -m nanorun.trainer.<module> ... --run-dir <storage.uri> --metrics-port N

(`python -m` for single-process stages) on a Master plus nodes-1 Workers; torchrun reads the PET_*
variables the training operator injects. S3 credentials come from the referenced Secret. The pods
pass Pod Security Admission's `restricted` profile and mount no ServiceAccount token
(operator/children/security.py).
"""

from __future__ import annotations

import copy
from typing import Any

from nanorun.operator.api import LLMRunSpec
from nanorun.operator.children.security import TRAINER_USER, restrict
from nanorun.operator.names import (
    ANNOTATION_RUN_DIR,
    LABEL_ATTEMPT,
    LABEL_CONFIG,
    LABEL_RUN,
    LABEL_STAGE,
    MAX_NAME,
    PYTORCHJOB_GROUP,
    PYTORCHJOB_VERSION,
    QUEUE_LABEL,
    dns_name,
)
from nanorun.operator.reconcile.plan import PlannedStage
from nanorun.operator.run_ref import RunRef
from nanorun.pipeline import liveness
from nanorun.pipeline.stages import by_key

CONTAINER_NAME = "pytorch"  # the training operator requires this name
RENDEZVOUS_PORT = 23456  # the training operator's default `pytorchjob-port`


def job_name(run: str, stage: str, attempt: int, limit: int = MAX_NAME) -> str:
    """`<run>-<stage>-<attempt>` with the stage key in kebab case, e.g. `speedrun-base-eval-1`."""
    return dns_name(run, by_key(stage).dns, str(attempt), limit=limit)


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


# Taints the node lifecycle controller puts on a node that stops reporting; a pod without its own
# toleration for them gets 300 s from the DefaultTolerationSeconds admission plugin
# (https://kubernetes.io/docs/concepts/scheduling-eviction/taint-and-toleration/#taint-based-evictions).
NODE_LOST_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def node_lost_tolerations(spec: LLMRunSpec) -> list[dict[str, Any]]:
    """compute.tolerations plus, for each node-lost taint they do not tolerate already, a NoExecute
    toleration of compute.nodeLostTolerationSeconds: a pod on a lost node is evicted that soon, and the
    stage resumes on the nodes left."""
    own = copy.deepcopy(spec.compute.tolerations)
    mentioned = {t.get("key") for t in own}
    return own + [
        {
            "key": key,
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": spec.compute.node_lost_toleration_seconds,
        }
        for key in NODE_LOST_TAINTS
        if key not in mentioned
    ]


def placement(spec: LLMRunSpec) -> dict[str, Any]:
    """The pod fields that place a run's pods (compute.nodeSelector, tolerations with the node-lost
    ones, affinity), those set."""
    c = spec.compute
    fields = {
        "nodeSelector": c.node_selector,
        "tolerations": node_lost_tolerations(spec),
        "affinity": c.affinity,
    }
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
    return [*launcher, stage.entry_point, *stage.flags(spec.storage.uri, spec.metrics_port)]


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
    """The trainer container's environment: which run, stage, attempt and configuration it is, how
    often it beats and how long a collective may block (pipeline/liveness.py), and storage."""
    beats = liveness.stage_environment(spec.retry.stall_timeout_seconds, spec.retry.heartbeat_seconds)
    return [
        {"name": "NANORUN_RUN", "value": run.name},
        {"name": "NANORUN_STAGE", "value": stage.key},
        {"name": "NANORUN_ATTEMPT", "value": str(attempt)},
        {"name": "NANORUN_CONFIG_ID", "value": config_id},
        *({"name": name, "value": value} for name, value in beats.items()),
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
    return spec.compute.nodes, spec.compute.processes_per_node, spec.compute.gpus_per_node


def pytorchjob_for_stage(
    run: RunRef, spec: LLMRunSpec, stage: PlannedStage, attempt: int, config_id: str = ""
) -> dict[str, Any]:
    """The PyTorchJob manifest for one attempt (from 1) at one planned stage; `config_id` (from
    reconcile.plan.config_ids) is passed to the stage, which records it in done.json and its checkpoints."""
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
