"""Hollow nodes (tests/kube/hollow.py) are what their NodeSpec says, to the scheduler: a cluster with
one hollow node shaped like an 8-GPU machine (192 CPUs, 2 TiB, 8 `nvidia.com/gpu`, `rdma/ib`), no
pod network and no controllers, takes a pod asking for half its CPUs and memory and all its GPUs,
which then shows Running there; a pod that does not tolerate the hollow taints is not placed, not
even one that tolerates every NoSchedule taint, as add-ons such as CoreDNS do.
Run: .venv/bin/pytest tests/kube/test_hollow.py -q   (no root needed)
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.fixtures.kube import KubeEnv, running_cluster, wait_until
from tests.kube.cluster import Cluster, NodeSpec
from tests.kube.hollow import GPU_MACHINE, STATUS_REPORT_S, TAINTS, TOLERATION

pytestmark = [pytest.mark.kube]

NODE = NodeSpec(
    "gpu-1",
    capacity=GPU_MACHINE,
    labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    taints=("nvidia.com/gpu=present:NoSchedule",),
)
IMAGE = "registry.invalid/nanorun-not-pulled:0"  # the fake image service "pulls" anything


@pytest.fixture(scope="module")
def hollow_cluster(tmp_path_factory) -> Iterator[KubeEnv]:
    plane = Cluster(tmp_path_factory.mktemp("hollow"), nodes=(NODE,), pods=False, controllers=False)
    with running_cluster(plane) as env:
        env.kubectl("create", "namespace", "hollow")
        wait_until(
            lambda: env.kubectl("get", "serviceaccount", "default", "-n", "hollow", check=False).returncode,
            lambda rc: rc == 0,
        )
        yield env


def node(kube: KubeEnv) -> dict:
    return json.loads(kube.kubectl("get", "node", NODE.name, "-o", "json").stdout)


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# What add-ons tolerate (tests/kube/addons/coredns.yaml, as upstream's): every NoSchedule taint.
ADDON_TOLERATIONS = [
    {"key": "CriticalAddonsOnly", "operator": "Exists"},
    {"operator": "Exists", "effect": "NoSchedule"},
]


def pod(name: str, tolerations: list[dict]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "tolerations": tolerations,
            "containers": [
                {
                    "name": "main",
                    "image": IMAGE,
                    "resources": {
                        "requests": {"cpu": "96", "memory": "1000Gi", "nvidia.com/gpu": "8"},
                        "limits": {"nvidia.com/gpu": "8"},
                    },
                }
            ],
        },
    }


def test_a_hollow_node_declares_its_node_spec(hollow_cluster):
    status = node(hollow_cluster)
    assert status["status"]["capacity"] == GPU_MACHINE
    assert status["status"]["allocatable"] == GPU_MACHINE
    # The node lifecycle controller adds taints of its own for the node's conditions (such as
    # node.kubernetes.io/not-ready, with no value, until the first Ready status): the rest is declared.
    taints = {
        f"{t['key']}={t.get('value', '')}:{t['effect']}"
        for t in status["spec"]["taints"]
        if not t["key"].startswith("node.kubernetes.io/")
    }
    assert taints == {*TAINTS, "nvidia.com/gpu=present:NoSchedule"}
    assert status["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"


def test_a_gpu_pod_that_tolerates_the_hollow_taint_is_placed_and_shows_running(hollow_cluster):
    kube = hollow_cluster
    kube.apply("hollow", pod("big", [TOLERATION, GPU_TOLERATION]))
    placed = wait_until(
        lambda: kube.get("hollow", "pod", "big"), lambda p: p["status"].get("phase") == "Running"
    )
    assert placed["spec"]["nodeName"] == NODE.name


@pytest.mark.parametrize(
    "name, tolerations",
    [("ordinary", [GPU_TOLERATION]), ("addon", ADDON_TOLERATIONS)],
    ids=["ordinary-pod", "addon-tolerating-every-NoSchedule-taint"],
)
def test_a_pod_without_the_hollow_toleration_is_not_placed(hollow_cluster, name, tolerations):
    kube = hollow_cluster
    kube.apply("hollow", pod(name, tolerations))

    def refused() -> list[str]:
        events = json.loads(kube.kubectl("get", "events", "-n", "hollow", "-o", "json").stdout)["items"]
        return [
            e["message"]
            for e in events
            if e["reason"] == "FailedScheduling" and e["involvedObject"]["name"] == name
        ]

    messages = wait_until(refused, bool)
    assert "untolerated taint" in messages[0], messages
    assert not kube.get("hollow", "pod", name)["spec"].get("nodeName")


def test_the_kubelet_keeps_the_advertised_resources_across_its_status_updates(hollow_cluster):
    """A later status post by the kubelet (its Ready heartbeat moves on; it posts at least every
    STATUS_REPORT_S) keeps what was advertised, in capacity and allocatable."""
    kube = hollow_cluster

    def heartbeat(status: dict) -> str:
        return next(c["lastHeartbeatTime"] for c in status["conditions"] if c["type"] == "Ready")

    before = heartbeat(node(kube)["status"])
    status = wait_until(
        lambda: node(kube)["status"], lambda s: heartbeat(s) != before, timeout=3 * STATUS_REPORT_S
    )
    assert status["capacity"] == GPU_MACHINE
    assert status["allocatable"] == GPU_MACHINE
