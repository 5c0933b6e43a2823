"""The RayService (ray.io/v1) serving a run's chat model: a pure function of the spec.

    svc = rayservice_for_run(run, spec, checkpoint="s3://.../sft/checkpoints/step_000700")

Named `<run>-chat`, owned by the LLMRun. Its serveConfigV2 runs the nanorun serving application
(`nanorun.serving.SERVE_IMPORT_PATH`) with the checkpoint in the deployment's `user_config`: a new
checkpoint changes only `user_config`, which Ray Serve applies by calling the replicas'
`reconfigure()` without restarting them. Replicas, autoscaling and GPUs come from spec.serving.

One replica per worker pod: each worker offers the Ray resource `SERVE_REPLICA_RESOURCE` once and
each replica takes it, whatever its CPU and GPU fractions. That makes a worker pod's metrics port
(`serve-metrics`, SERVE_METRICS_PORT, where the replica serves its own /metrics) one replica's, so
the chart's PodMonitor scrapes every replica as its own series. The head runs no replica (and so
declares no such port): its `serve` port goes through the proxy to any replica.

Access: spec.serving.apiKeysSecret is mounted read-only, as a volume (never as environment
variables, which a running process cannot see change), at `SERVE_API_KEYS_DIR` on the worker pods,
where the replicas run, and the application's `api_keys_file` names that directory. The kubelet
updates a mounted Secret's files when the Secret changes and the replicas read them again, so keys
rotate without a restart (a `subPath` mount would not be updated, hence the whole directory).
With spec.serving.allowUnauthenticated nothing is mounted and the application is told so. The
body cap and the rate limit go into the application's `args` too.

Ray itself authenticates with a token (`authOptions.mode: token`, Ray >= 2.52 with KubeRay >= 1.5.1):
KubeRay makes a Secret with a random token per RayCluster and gives it to the Ray containers only.
Who may connect at all is the run's NetworkPolicy's business (network.py).
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import yaml
from nanorun.operator.api import LLMRunSpec
from nanorun.operator.children.pytorchjob import storage_env
from nanorun.operator.children.security import CONTAINER_SECURITY_CONTEXT, restrict
from nanorun.operator.names import LABEL_RUN, RAYSERVICE_GROUP, RAYSERVICE_VERSION, dns_name
from nanorun.operator.run_ref import RunRef
from nanorun.serving import (
    SERVE_API_KEYS_DIR,
    SERVE_APP_NAME,
    SERVE_DEPLOYMENT_NAME,
    SERVE_IMPORT_PATH,
    SERVE_METRICS_PORT,
    SERVE_METRICS_PORT_ENV,
    SERVE_REPLICA_RESOURCE,
    SERVE_SLOTS,
)

SERVE_PORT = 8000
RAY_METRICS_PORT = 8080  # the head's Ray metrics
CHAT_APP_LABEL = "nanorun-chat"  # app.kubernetes.io/name of the Ray pods
SERVE_METRICS_PORT_NAME = "serve-metrics"  # the chart's podMonitor.servingPort
API_KEYS_VOLUME = "api-keys"


def rayservice_name(run: str) -> str:
    return dns_name(run, "chat")


def service_url(run: str, namespace: str) -> str:
    """KubeRay exposes the Serve endpoints as the Service `<rayservice>-serve-svc`."""
    return f"http://{rayservice_name(run)}-serve-svc.{namespace}.svc:{SERVE_PORT}"


def access_args(spec: LLMRunSpec) -> dict[str, Any]:
    """The application's access arguments (`nanorun.serving.app.AppArgs`) for spec.serving."""
    s = spec.serving
    who: dict[str, Any] = (
        {"api_keys_file": SERVE_API_KEYS_DIR}
        if s.api_keys_secret
        else {"allow_unauthenticated": s.allow_unauthenticated}
    )
    return {**who, "max_request_bytes": s.max_request_bytes, "rate_limit_per_minute": s.rate_limit_per_minute}


def serve_config(
    spec: LLMRunSpec, checkpoint: str, args_checkpoint: str | None = None, version: str = ""
) -> dict[str, Any]:
    """Ray Serve's multi-application config. `args_checkpoint` is the checkpoint the application
    was first built with: `args` must not change when only the checkpoint rolls, or Serve would
    redeploy the application instead of reconfiguring its replicas. `version` (the final stage's
    config id) goes into user_config too: a stage that ran again after a spec change may write its
    final checkpoint to the same path, and the replicas must still load the new weights."""
    s = spec.serving
    actor: dict[str, Any] = {"num_cpus": s.cpus_per_replica, "resources": {SERVE_REPLICA_RESOURCE: 1}}
    if s.gpus_per_replica:
        actor["num_gpus"] = s.gpus_per_replica
    return {
        "applications": [
            {
                "name": SERVE_APP_NAME,
                "route_prefix": "/",
                "import_path": SERVE_IMPORT_PATH,
                "args": {"checkpoint": args_checkpoint or checkpoint, **access_args(spec)},
                "deployments": [
                    {
                        "name": SERVE_DEPLOYMENT_NAME,
                        # a replica decodes SERVE_SLOTS requests together and queues as many more
                        "max_ongoing_requests": 2 * SERVE_SLOTS,
                        "autoscaling_config": {
                            "min_replicas": s.min_replicas,
                            "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests or SERVE_SLOTS,
                        },
                        "ray_actor_options": actor,
                        "user_config": {
                            "checkpoint": checkpoint,
                            **({"version": version} if version else {}),
                        },
                    }
                ],
            }
        ],
    }


def _container(
    name: str,
    spec: LLMRunSpec,
    cpu: str,
    memory: str,
    gpus: float,
    ports: list[dict[str, Any]],
    env: tuple[dict[str, str], ...] = (),
) -> dict[str, Any]:
    """A Ray container with spec.serving's resources (nothing of spec.compute, which is training's)."""
    limits: dict[str, Any] = {"cpu": cpu}
    if gpus:
        limits[spec.serving.gpu_resource] = math.ceil(gpus)
    if memory:
        limits["memory"] = memory
    return {
        "name": name,
        "image": spec.serving.image,
        "imagePullPolicy": spec.image_pull_policy,
        "env": storage_env(spec) + list(env),
        "ports": ports,
        "resources": {"requests": dict(limits), "limits": limits},
    }


TOKEN_AUTH_SINCE = (2, 52)  # the first Ray with token authentication, which KubeRay checks


def token_auth(ray_version: str) -> bool:
    """Whether the RayCluster gets Ray's token authentication: KubeRay makes a Secret with a
    random token per RayCluster and gives it to the Ray containers only; it refuses a RayCluster
    that asks for it with a Ray older than 2.52."""
    try:
        major, minor = (int(p) for p in ray_version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= TOKEN_AUTH_SINCE


def _cpu_quantity(cpus: float) -> str:
    """A replica's CPUs as a Kubernetes quantity ("2", "500m"), at least 0.1 CPU. A fraction stays
    one: KubeRay gives Ray the limit rounded up as `--num-cpus`."""
    cpus = max(cpus, 0.1)
    return str(int(cpus)) if cpus == int(cpus) else f"{cpus * 1000:.0f}m"


def rayservice_for_run(
    run: RunRef, spec: LLMRunSpec, checkpoint: str, args_checkpoint: str | None = None, version: str = ""
) -> dict[str, Any]:
    """The RayService manifest serving `checkpoint` (of configuration `version`, when known)."""
    s = spec.serving
    labels = {
        LABEL_RUN: run.name,
        "app.kubernetes.io/name": CHAT_APP_LABEL,
        "app.kubernetes.io/managed-by": "nanorun",
    }
    head_ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": "serve", "containerPort": SERVE_PORT},
        {"name": "metrics", "containerPort": RAY_METRICS_PORT},
    ]
    worker = _container(
        "ray-worker",
        spec,
        _cpu_quantity(s.cpus_per_replica),
        s.memory_per_replica,
        s.gpus_per_replica,
        [{"name": SERVE_METRICS_PORT_NAME, "containerPort": SERVE_METRICS_PORT}],
        env=({"name": SERVE_METRICS_PORT_ENV, "value": str(SERVE_METRICS_PORT)},),
    )
    worker_pod: dict[str, Any] = {"containers": [worker]}
    if s.api_keys_secret:
        worker["volumeMounts"] = [
            {"name": API_KEYS_VOLUME, "mountPath": SERVE_API_KEYS_DIR, "readOnly": True}
        ]
        worker_pod["volumes"] = [{"name": API_KEYS_VOLUME, "secret": {"secretName": s.api_keys_secret}}]
    head_pod: dict[str, Any] = {
        "containers": [_container("ray-head", spec, s.head_cpu, s.head_memory, 0, head_ports)]
    }
    for pod in (worker_pod, head_pod):
        for key, value in (("nodeSelector", s.node_selector), ("tolerations", s.tolerations)):
            if value:
                pod[key] = copy.deepcopy(value)
    restrict(worker_pod)
    restrict(head_pod, api_token=True)  # KubeRay's autoscaler sidecar scales the workers through the API
    return {
        "apiVersion": f"{RAYSERVICE_GROUP}/{RAYSERVICE_VERSION}",
        "kind": "RayService",
        "metadata": {
            "name": rayservice_name(run.name),
            "namespace": run.namespace,
            "labels": labels,
            "ownerReferences": [run.owner_reference()],
        },
        "spec": {
            "serveConfigV2": yaml.safe_dump(
                serve_config(spec, checkpoint, args_checkpoint, version), sort_keys=False
            ),
            "rayClusterConfig": {
                "rayVersion": s.ray_version,
                "enableInTreeAutoscaling": True,
                **({"authOptions": {"mode": "token"}} if token_auth(s.ray_version) else {}),
                # The sidecar KubeRay adds to the head pod, under the same `restricted` profile.
                "autoscalerOptions": {"securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT)},
                "headGroupSpec": {
                    "rayStartParams": {
                        "dashboard-host": "0.0.0.0",
                        "num-cpus": "0",
                        "num-gpus": "0",
                    },  # no replica on the head
                    "template": {"metadata": {"labels": labels}, "spec": head_pod},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "chat",
                        "replicas": s.min_replicas,
                        "minReplicas": s.min_replicas,
                        "maxReplicas": s.max_replicas,
                        # `ray start --resources=...` through a shell: single-quoted JSON, as KubeRay writes it
                        "rayStartParams": {"resources": f"'{json.dumps({SERVE_REPLICA_RESOURCE: 1})}'"},
                        "template": {"metadata": {"labels": labels}, "spec": worker_pod},
                    }
                ],
            },
        },
    }


def served_checkpoints(rayservice: dict[str, Any]) -> tuple[str | None, str | None]:
    """(user_config checkpoint, args checkpoint) of an existing RayService."""
    try:
        app = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
        return app["deployments"][0]["user_config"]["checkpoint"], app["args"]["checkpoint"]
    except (KeyError, IndexError, TypeError, yaml.YAMLError):
        return None, None
