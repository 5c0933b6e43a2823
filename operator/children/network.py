"""The NetworkPolicies (networking.k8s.io/v1) of a run: pure functions of the run and the admin's
settings, owned by the LLMRun so the garbage collector removes them with it.

    settings = NetworkSettings.from_env()          # the chart's operator.networkPolicy
    for policy in network_policies(run, spec, settings): ...

Two policies per run, each selecting disjoint pods
(https://kubernetes.io/docs/concepts/services-networking/network-policies/):

- `<run>-train`, the stage pods (label `nanorun.io/stage`): ingress from the same run's pods on
  every port (torchrun's rendezvous, NCCL and gloo pick their ports), and from the admin's
  metrics scrapers on `spec.metricsPort`;
- `<run>-chat`, the RayService's pods (label `app.kubernetes.io/name: nanorun-chat`): ingress from
  the same run's Ray pods on every port (GCS 6379, the dashboard and Jobs API 8265, Ray Client
  10001, and the raylets' and workers' own ports), from the KubeRay operator's namespace on every
  port (it submits the Serve config through the dashboard and checks the proxies), from the
  admin's chat sources on the Serve port only, and from the metrics scrapers on the metrics ports.

Egress is left open: stages and replicas reach object storage, DNS and the API server. A
NetworkPolicy does nothing unless the cluster's network plugin implements it.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any

from nanorun.operator.api import LLMRunSpec
from nanorun.operator.children.rayservice import CHAT_APP_LABEL, RAY_METRICS_PORT, SERVE_PORT, rayservice_name
from nanorun.operator.names import LABEL_RUN, LABEL_STAGE, dns_name
from nanorun.operator.run_ref import RunRef
from nanorun.serving import SERVE_METRICS_PORT

NETWORK_POLICY_ENV = "NANORUN_NETWORK_POLICY"  # the chart's operator.networkPolicy, as JSON
NAMESPACE_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace


@dataclass(frozen=True)
class NetworkSettings:
    """The admin's choices. `chat_from` and `metrics_from` are NetworkPolicyPeers (namespaceSelector,
    podSelector, ipBlock); no `chat_from` means the run's own namespace."""

    enabled: bool = False
    chat_from: tuple[dict[str, Any], ...] = ()
    metrics_from: tuple[dict[str, Any], ...] = ()
    kuberay_namespace: str = ""

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> NetworkSettings:
        return cls(
            enabled=bool(data.get("enabled", False)),
            chat_from=tuple(data.get("chatFrom") or ()),
            metrics_from=tuple(data.get("metricsFrom") or ()),
            kuberay_namespace=data.get("kuberayNamespace") or "",
        )

    @classmethod
    def from_env(cls) -> NetworkSettings:
        """From NANORUN_NETWORK_POLICY (the chart sets it); unset: no policies."""
        text = os.environ.get(NETWORK_POLICY_ENV, "")
        return cls.from_data(json.loads(text)) if text else cls()


def _namespace_peer(namespace: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: namespace}}}


def _ports(*numbers: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": n} for n in numbers]


def _policy(
    run: RunRef, name: str, selector: dict[str, Any], ingress: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": name,
            "namespace": run.namespace,
            "labels": {LABEL_RUN: run.name, "app.kubernetes.io/managed-by": "nanorun"},
            "ownerReferences": [run.owner_reference()],
        },
        "spec": {"podSelector": selector, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def training_policy_name(run: str) -> str:
    return dns_name(run, "train")


def serving_policy_name(run: str) -> str:
    return rayservice_name(run)  # `<run>-chat`, as the RayService


def training_policy(run: RunRef, spec: LLMRunSpec, settings: NetworkSettings) -> dict[str, Any]:
    """Ingress to the run's stage pods: its own pods, and the scrapers on the metrics port."""
    selector = {
        "matchLabels": {LABEL_RUN: run.name},
        "matchExpressions": [{"key": LABEL_STAGE, "operator": "Exists"}],
    }
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": {"matchLabels": {LABEL_RUN: run.name}}}]}]
    if settings.metrics_from:
        ingress.append(
            {"from": copy.deepcopy(list(settings.metrics_from)), "ports": _ports(spec.metrics_port)}
        )
    return _policy(run, training_policy_name(run.name), selector, ingress)


def serving_policy(run: RunRef, settings: NetworkSettings) -> dict[str, Any]:
    """Ingress to the run's Ray pods: Ray's ports from the same RayService's pods and the KubeRay
    operator, the Serve port from the chat sources, the metrics ports from the scrapers."""
    own = {"matchLabels": {LABEL_RUN: run.name, "app.kubernetes.io/name": CHAT_APP_LABEL}}
    ray: list[dict[str, Any]] = [{"podSelector": copy.deepcopy(own)}]
    if settings.kuberay_namespace:
        ray.append(_namespace_peer(settings.kuberay_namespace))
    chat = copy.deepcopy(list(settings.chat_from)) or [{"podSelector": {}}]  # {}: the run's namespace
    ingress: list[dict[str, Any]] = [{"from": ray}, {"from": chat, "ports": _ports(SERVE_PORT)}]
    if settings.metrics_from:
        ingress.append(
            {
                "from": copy.deepcopy(list(settings.metrics_from)),
                "ports": _ports(RAY_METRICS_PORT, SERVE_METRICS_PORT),
            }
        )
    return _policy(run, serving_policy_name(run.name), own, ingress)


def network_policies(run: RunRef, spec: LLMRunSpec, settings: NetworkSettings) -> list[dict[str, Any]]:
    """The run's NetworkPolicies; none when the admin turned them off."""
    if not settings.enabled:
        return []
    out = [training_policy(run, spec, settings)]
    if spec.serving.enabled:
        out.append(serving_policy(run, settings))
    return out
