"""Every name the operator shares with the cluster, in one place: the kinds it reads and writes
besides its own LLMRun (whose group and version are in api/llmrun.py), the labels, annotations and
finalizer it puts on objects, and `dns_name`, which names its children."""

from __future__ import annotations

import hashlib
import re

# Kinds of other controllers: (group, version, plural).
PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
TRAINJOB_CRD = (
    f"{TRAINJOB_PLURAL}.{TRAINJOB_GROUP}"  # its presence makes `compute.launcher: auto` pick TrainJob
)
RAYSERVICE_GROUP, RAYSERVICE_VERSION, RAYSERVICE_PLURAL = "ray.io", "v1", "rayservices"
# Kueue's Workload, read through v1beta2 (served since Kueue v0.15).
WORKLOAD_GROUP, WORKLOAD_VERSION, WORKLOAD_PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"

# Labels on every stage job (PyTorchJob or TrainJob, and its pods) and on the RayService.
LABEL_RUN, LABEL_STAGE, LABEL_ATTEMPT = "nanorun.io/run", "nanorun.io/stage", "nanorun.io/attempt"
# On an LLMSweep's children (its point and tokenizer LLMRuns, its report job): the sweep's name.
LABEL_SWEEP = "nanorun.io/sweep"
# The stage's config id (reconcile.plan.config_ids): which flags this job ran.
LABEL_CONFIG = "nanorun.io/config"
# Annotation on every stage job: where its run directory is (its stage key is its LABEL_STAGE).
ANNOTATION_RUN_DIR = "nanorun.io/run-dir"

# Kueue: the queue label of a job, the label Kueue puts on a job's Workload, and the annotation
# marking a Workload the operator deactivated (spec.suspend) and may therefore reactivate.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
DEACTIVATED_BY_OPERATOR = "nanorun.io/deactivated"
# Annotation on a sweep's child LLMRun that the sweep's `spec.suspend` suspended: resuming the sweep
# resumes only these, not a point a user suspended on its own.
SUSPENDED_BY_SWEEP = "nanorun.io/suspended-by-sweep"

# The finalizer for storage.cleanupOnDelete.
CLEANUP_FINALIZER = "nanorun.io/cleanup"

MAX_NAME = 63  # DNS-1035 label; the training operator's Services are named after the job


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
