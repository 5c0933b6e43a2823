"""The TrainJob (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1) of one attempt at one stage:
a pure function of the spec, the counterpart of pytorchjob.pytorchjob_for_stage.

    job = trainjob_for_stage(run, spec, planned_stage, attempt=1)

A TrainJob names a training runtime (`spec.compute.trainingRuntime`, a ClusterTrainingRuntime the
chart installs as `nanorun-torch`) and says only what differs per job; the Trainer controller
renders runtime plus TrainJob into a JobSet (one indexed batch/v1 Job `node` with `numNodes` pods)
and its torch plugin injects the rendezvous variables torchrun reads: PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK (the pod's completion index), PET_MASTER_ADDR
(`<job>-node-0-0.<job>`, the first pod through the JobSet's headless Service) and PET_MASTER_PORT
(https://www.kubeflow.org/docs/components/trainer/user-guides/pytorch/). What the TrainJob API
offers per job goes where the API puts it:

- `spec.trainer`: image, command, env, numNodes, numProcPerNode, resourcesPerNode;
- `spec.runtimePatches` (one entry, manager `nanorun.io/operator`): the pods' labels and Prometheus
  annotations, nodeSelector, tolerations, affinity, terminationGracePeriodSeconds (not with a Kueue
  queue: see below), and the /dev/shm volume with its mount in the trainer container `node`;
- `spec.suspend` (the PyTorchJob's runPolicy.suspend): true with spec.suspend or a Kueue queue.

What the API leaves to the runtime (the pods' priorityClassName, image pull policy, the ports,
`backoffLimit: 0` so one failed pod fails the attempt) is in the chart's runtime
(charts/nanorun/templates/trainingruntime.yaml). A finished TrainJob has no TTL of its own (a
JobSet's ttlSecondsAfterFinished would remove only the JobSet), so the operator deletes it after
`compute.ttlSecondsAfterFinished` (reconcile/attempts.py).
"""

from __future__ import annotations

from typing import Any

from nanorun.operator.api import LLMRunSpec
from nanorun.operator.children.pytorchjob import (
    command_for_stage,
    job_name,
    placement,
    pod_metadata,
    resources,
    stage_env,
    stage_labels,
    stage_shape,
)
from nanorun.operator.names import ANNOTATION_RUN_DIR, MAX_NAME, TRAINJOB_GROUP, TRAINJOB_VERSION
from nanorun.operator.reconcile.plan import PlannedStage
from nanorun.operator.reconcile.status import JobState, parse_time
from nanorun.operator.run_ref import RunRef

CONTAINER_NAME = "node"  # the torch runtime's trainer container; the PET_* variables go into it
REPLICATED_JOB = "node"  # the JobSet's replicated Job of the trainer
RUNTIME_KIND = "ClusterTrainingRuntime"
PATCH_MANAGER = "nanorun.io/operator"  # owner of the runtimePatches entry
# The first pod's hostname is `<job>-node-0-0`: the job's name leaves room for that suffix.
NAME_LIMIT = MAX_NAME - len(f"-{REPLICATED_JOB}-0-0")


def trainjob_name(run: str, stage: str, attempt: int) -> str:
    """`<run>-<stage>-<attempt>`, short enough for the pods' hostnames."""
    return job_name(run, stage, attempt, limit=NAME_LIMIT)


def trainjob_for_stage(
    run: RunRef, spec: LLMRunSpec, stage: PlannedStage, attempt: int, config_id: str = ""
) -> dict[str, Any]:
    """The TrainJob manifest for one attempt (from 1) at one planned stage."""
    c = spec.compute
    labels = stage_labels(run, spec, stage, attempt, config_id)
    nodes, nproc, gpus = stage_shape(spec, stage)
    trainer: dict[str, Any] = {
        "image": spec.image,
        "command": command_for_stage(spec, stage),
        "env": stage_env(run, spec, stage, attempt, config_id),
        "numNodes": nodes,
        "numProcPerNode": nproc,
    }
    amounts = resources(spec, gpus)
    if amounts:
        trainer["resourcesPerNode"] = amounts
    pod: dict[str, Any] = {}
    if not c.queue:
        # SIGTERM → the trainer finishes its step, checkpoints and exits; the grace period must cover
        # that. Not with Kueue: Kueue v0.17 updates an admitted TrainJob through Trainer v2.2's API,
        # which lacks this field, so the patch would lose it and Trainer's JobSet update (a changed
        # pod field) is refused; the runtime's grace period (the chart's trainer.runtime) applies.
        pod["terminationGracePeriodSeconds"] = c.termination_grace_period_seconds
    if c.shm_size:
        pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": c.shm_size}}]
        pod["containers"] = [
            {"name": CONTAINER_NAME, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
        ]
    pod.update(placement(spec))
    node_job = {
        "name": REPLICATED_JOB,
        "template": {"spec": {"template": {"metadata": pod_metadata(spec, labels), "spec": pod}}},
    }
    return {
        "apiVersion": f"{TRAINJOB_GROUP}/{TRAINJOB_VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": trainjob_name(run.name, stage.key, attempt),
            "namespace": run.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_RUN_DIR: spec.storage.uri},
            "ownerReferences": [run.owner_reference()],
        },
        "spec": {
            "runtimeRef": {"name": c.training_runtime, "apiGroup": TRAINJOB_GROUP, "kind": RUNTIME_KIND},
            "trainer": trainer,
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node_job]}}},
                }
            ],
            # With a Kueue queue the job starts suspended and Kueue admits it.
            "suspend": bool(spec.suspend or c.queue),
        },
    }


def trainjob_suspended(job: dict[str, Any]) -> bool:
    return bool((job.get("spec") or {}).get("suspend"))


def trainjob_suspend_patch(suspend: bool) -> dict[str, Any]:
    return {"spec": {"suspend": suspend}}


def trainjob_state(job: dict[str, Any]) -> JobState:
    """Where a TrainJob stands, from the conditions the Trainer controller writes (Complete, Failed,
    Suspended) and spec.suspend; Running once any of its Jobs has an active pod."""
    status = job.get("status") or {}
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    for kind, phase in (("Complete", "Succeeded"), ("Failed", "Failed")):
        if kind in true:
            c = true[kind]
            return JobState(
                phase, c.get("reason", ""), c.get("message", ""), parse_time(c.get("lastTransitionTime"))
            )
    if trainjob_suspended(job) or "Suspended" in true:
        return JobState("Suspended")
    if any((j.get("active") or 0) > 0 for j in status.get("jobsStatus") or []):
        return JobState("Running")
    return JobState("Pending")
