"""A run's world as the pure reconcile sees it, for the reconcile tests: bodies and child objects as
plain dicts shaped like the API server's, pods as the kubernetes client's models, storage as a dict
of (progress, done) per stage key."""

from __future__ import annotations

import datetime as dt

from nanorun.operator.api import parse_spec
from nanorun.operator.reconcile.plan import config_ids, stage_plan
from nanorun.operator.run_ref import RunRef

RUN = RunRef("r1", "ns", "uid-1")
T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
ALL_OFF = {
    k: {"enabled": False}
    for k in ("tokenizer", "pretrain", "baseEval", "midtrain", "sft", "rl", "eval", "report")
}


def body(stages=("tokenizer", "pretrain"), status=None, **spec):
    enabled = {**ALL_OFF, **{k: {"enabled": True} for k in stages}}
    serving = {"apiKeysSecret": "r1-chat-keys", **spec.pop("serving", {})}
    return {
        "metadata": {
            "name": "r1",
            "namespace": "ns",
            "uid": "uid-1",
            "generation": 2,
            "creationTimestamp": "2026-01-01T11:59:00Z",
        },
        "spec": {
            "storage": {"uri": "s3://b/r1"},
            "stages": enabled,
            "retry": {"maxAttempts": 2, "backoffSeconds": 10},
            "serving": serving,
            **spec,
        },
        "status": status or {},
    }


def config_id(stage: str, spec=None) -> str:
    """The id of `stage`'s configuration in the run `spec` (default: `body()`'s), which labels its
    jobs and marks its done.json as current."""
    return config_ids(stage_plan(parse_spec(spec or body()["spec"])))[stage]


def job(
    name,
    stage,
    attempt,
    condition=None,
    at="2026-01-01T12:00:00Z",
    suspend=False,
    reason="",
    message="",
    config=None,
):
    conditions = [{"type": "Created", "status": "True"}]
    if condition:
        conditions.append(
            {
                "type": condition,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": at,
            }
        )
    return {
        "metadata": {
            "name": name,
            "labels": {
                "nanorun.io/run": "r1",
                "nanorun.io/stage": stage,
                "nanorun.io/attempt": str(attempt),
                "nanorun.io/config": config if config is not None else config_id(stage),
            },
            "creationTimestamp": "2026-01-01T12:00:00Z",
        },
        "spec": {"runPolicy": {"suspend": suspend}},
        "status": {"conditions": conditions},
    }


def storage(files=None):
    files = files or {}
    return lambda stage: files.get(stage, (None, None))


def cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def pod(name, exit_code=None, disruption=None):
    from kubernetes import client

    conditions = (
        [client.V1PodCondition(type="DisruptionTarget", status="True", reason=disruption)]
        if disruption
        else []
    )
    state = (
        client.V1ContainerState(terminated=client.V1ContainerStateTerminated(exit_code=exit_code))
        if exit_code is not None
        else None
    )
    statuses = [
        client.V1ContainerStatus(
            name="pytorch", state=state, image="i", image_id="", ready=False, restart_count=0
        )
    ]
    phase = "Running" if exit_code is None else "Succeeded" if exit_code == 0 else "Failed"
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, namespace="ns"),
        status=client.V1PodStatus(phase=phase, conditions=conditions, container_statuses=statuses),
    )
