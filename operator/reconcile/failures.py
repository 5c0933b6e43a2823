"""What a stage job's pods say about how its attempt ended: still running or stopping (not a lost
node's, which no kubelet will ever report), disrupted by the cluster (a preemption, an eviction, a
lost node's taint, SIGTERM), or failed, with the failed container's last log lines, rank 0's first.
The controller reads the pods and their logs; `reconcile()` decides from the FailureFacts.
"""

from __future__ import annotations

import logging
from typing import Any

from nanorun.operator.children.pytorchjob import CONTAINER_NAME
from nanorun.operator.reconcile.decision import FailureFacts

log = logging.getLogger("nanorun.operator")

LOG_TAIL_LINES = 20
LOG_TAIL_BYTES = 16384  # a pod's lines can be any length; the operator reads no more than this
SIGTERM_EXIT = 143  # 128 + 15: the process ended on the SIGTERM a pod deletion or eviction sends
TAINT_EVICTION = "DeletionByTaintManager"  # DisruptionTarget reason of a pod evicted from a lost node
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # a TrainJob pod's node rank


def _rank0(pod: Any) -> bool:
    """Rank 0's pod: a PyTorchJob's Master, or the TrainJob pod of completion index 0."""
    labels = (pod.metadata.labels or {}) if pod.metadata else {}
    return "master" in pod.metadata.name or labels.get(COMPLETION_INDEX) == "0"


def _disruption(pod: Any) -> str:
    """The reason of a pod's DisruptionTarget condition (preemption, eviction, a lost node's taint),
    or "" when the cluster did not disrupt it."""
    for c in (pod.status.conditions or []) if pod.status else []:
        if c.type == "DisruptionTarget" and c.status == "True":
            return c.reason or "unknown reason"
    return ""


def _lost(pod: Any) -> bool:
    """A pod the taint manager deleted from a node that stopped reporting: no kubelet will ever say
    it stopped, so it is not waited for (the newer attempt fences its ranks off, liveness.py)."""
    return bool(pod.metadata.deletion_timestamp) and _disruption(pod) == TAINT_EVICTION


def failure_facts(pods: list[Any], read_log: Any, container: str = CONTAINER_NAME) -> FailureFacts:
    """FailureFacts from a stage job's pods (kubernetes client V1Pod objects): those still running
    or stopping (not a lost node's), a disruption of any, else the failed container's last log
    lines; `container` is the trainer container's name (the launcher's)."""
    failed: list[tuple[Any, int]] = []
    disrupted = {p.metadata.name: reason for p in pods if (reason := _disruption(p))}
    active = tuple(
        sorted(
            p.metadata.name
            for p in pods
            if (p.status.phase if p.status else "") not in ("Succeeded", "Failed") and not _lost(p)
        )
    )
    disruption = next((f"pod {name}: DisruptionTarget ({r})" for name, r in disrupted.items()), "")
    if active or disruption:
        return FailureFacts(active=active, disruption=disruption)
    for pod in pods:
        name = pod.metadata.name
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            term = cs.state.terminated if cs.state else None
            if cs.name != container or term is None:
                continue
            if term.exit_code == SIGTERM_EXIT:
                return FailureFacts(disruption=f"pod {name}: exited {SIGTERM_EXIT} (SIGTERM)")
            if term.exit_code:
                failed.append((pod, term.exit_code))
    # Rank 0's log first (the Master): a Worker usually fails because the Master did.
    failed.sort(key=lambda pf: not _rank0(pf[0]))
    for pod, code in failed:
        try:
            text = read_log(pod) or ""
        except Exception as err:  # the log is a help, not a requirement
            log.info("could not read the log of %s: %s", pod.metadata.name, err)
            continue
        return FailureFacts(log_tail=f"[{pod.metadata.name}, exit {code}]\n{text.strip()}")
    return FailureFacts()
