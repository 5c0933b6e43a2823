"""The Job that deletes a run's files for `storage.cleanupOnDelete`: in the run's namespace, with the
run's image and its own S3 credentials (`storage.credentialsSecret`), under the `restricted` pod
security profile, so the operator's credentials never need to delete anything.

    job = cleanup_job(run, spec)   # `<run>-cleanup`, running `nanorun delete-run URI`

The delete handler (loop/handlers.py) creates it, waits for it to succeed, and only then lets the LLMRun
go; the Job is owned by the LLMRun, so the garbage collector removes it right after.
"""

from __future__ import annotations

from typing import Any

from nanorun.operator.api import LLMRunSpec
from nanorun.operator.children.pytorchjob import placement, storage_env
from nanorun.operator.children.security import TRAINER_USER, restrict
from nanorun.operator.names import LABEL_RUN, dns_name
from nanorun.operator.run_ref import RunRef

BACKOFF_LIMIT = 3
DEADLINE_SECONDS = 3600


def cleanup_job_name(run: str) -> str:
    return dns_name(run, "cleanup")


def cleanup_job(run: RunRef, spec: LLMRunSpec) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "cleanup",
                "image": spec.image,
                "imagePullPolicy": spec.image_pull_policy,
                "command": ["nanorun", "delete-run", spec.storage.uri],
                "env": storage_env(spec),
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            }
        ],
    }
    pod.update(placement(spec))  # where the run's pods go: the run's image is most likely pulled there
    owner = {**run.owner_reference(), "blockOwnerDeletion": False}  # the owner is being deleted
    labels = {
        LABEL_RUN: run.name,
        "app.kubernetes.io/name": "nanorun-cleanup",
        "app.kubernetes.io/managed-by": "nanorun",
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": cleanup_job_name(run.name),
            "namespace": run.namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "activeDeadlineSeconds": DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": 600,
            "template": {"metadata": {"labels": labels}, "spec": restrict(pod, user=TRAINER_USER)},
        },
    }


def job_outcome(job: dict[str, Any]) -> str:
    """ "Complete", "Failed" or "" (still running) from a Job's conditions."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c["type"]
    return ""
