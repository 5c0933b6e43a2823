"""Exactly the API access the operator uses (its ClusterRole). The helm chart renders its role
from this list, and the operator tests run the operator under a ServiceAccount bound to a role
made of exactly these rules.

    from nanorun.operator.rbac import OPERATOR_RBAC_RULES

Helm cannot import Python, so the chart reads the rules from `charts/nanorun/files/rbac-rules.yaml`
and the plain manifests carry them in `manifests/rbac/clusterrole.yaml`; both are written from this
list by `python -m tools.generate --write` (a test fails when one is stale).
"""

from __future__ import annotations

from typing import Any

OPERATOR_RBAC_RULES: list[dict[str, Any]] = [
    # LLMRuns: kopf lists and watches them; patch adds/removes the cleanup finalizer and kopf's
    # bookkeeping annotations; an LLMSweep's children are created.
    {"apiGroups": ["nanorun.io"], "resources": ["llmruns"], "verbs": ["list", "watch", "patch", "create"]},
    # The operator writes the status (phase, stages, conditions) as a merge patch.
    {"apiGroups": ["nanorun.io"], "resources": ["llmruns/status"], "verbs": ["patch"]},
    # LLMSweeps: listed and watched; their status is written as a merge patch. A sweep creates its
    # points and tokenizer run as LLMRuns (the `create` above) and its report as a PyTorchJob.
    {"apiGroups": ["nanorun.io"], "resources": ["llmsweeps"], "verbs": ["list", "watch"]},
    {"apiGroups": ["nanorun.io"], "resources": ["llmsweeps/status"], "verbs": ["patch"]},
    # One PyTorchJob per stage attempt: created, watched, patched (runPolicy.suspend).
    {
        "apiGroups": ["kubeflow.org"],
        "resources": ["pytorchjobs"],
        "verbs": ["list", "watch", "create", "patch"],
    },
    # Or, with Kubeflow Trainer v2 (compute.launcher), one TrainJob per stage attempt: created, watched,
    # patched (spec.suspend), and deleted after compute.ttlSecondsAfterFinished (a TrainJob has no TTL).
    {
        "apiGroups": ["trainer.kubeflow.org"],
        "resources": ["trainjobs"],
        "verbs": ["list", "watch", "create", "patch", "delete"],
    },
    # The chat RayService: created, watched, patched (serving changes), deleted when serving is turned off.
    {
        "apiGroups": ["ray.io"],
        "resources": ["rayservices"],
        "verbs": ["list", "watch", "create", "patch", "delete"],
    },
    # storage.cleanupOnDelete: a Job in the run's namespace deletes the run's files with the run's
    # own credentials; the operator reads its outcome and deletes a failed one to start anew.
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "create", "delete"]},
    # The run's NetworkPolicies (children/network.py): created before its jobs and RayService, patched to the
    # admin's settings where they exist; the garbage collector deletes them with the run.
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["create", "patch"],
    },
    # A failed job's pods: a DisruptionTarget condition or exit 143 makes the failure a preemption;
    # otherwise the failed container's last log lines go into the stage's message.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    # With compute.queue, Kueue's Workload of each job: read (and watched) for the Queued status; patched
    # (spec.active) to suspend and resume a job that Kueue admits.
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list", "watch", "patch"]},
    # Kubernetes Events on every transition (the operator's and kopf's own).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # kopf lists namespaces when it watches the whole cluster, and watches CRDs to notice new resources;
    # the operator lists the TrainJob CRD to tell whether `compute.launcher: auto` means TrainJob.
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
]
