"""The NetworkPolicies the operator creates with a run (operator/children/network.py), as objects; their
enforcement on the test cluster: tests/operator/test_network_kube.py."""

from __future__ import annotations

import pytest
from nanorun.operator.api import parse_spec
from nanorun.operator.children.network import NetworkSettings, network_policies
from nanorun.operator.children.pytorchjob import pytorchjob_for_stage
from nanorun.operator.children.rayservice import rayservice_for_run
from nanorun.operator.reconcile.plan import stage_plan
from nanorun.operator.run_ref import RunRef

RUN = RunRef(name="r1", namespace="team-a", uid="00000000-0000-0000-0000-000000000001")
SCRAPER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
INGRESS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
SETTINGS = NetworkSettings(enabled=True, metrics_from=(SCRAPER,), kuberay_namespace="kuberay")


def spec(**serving):
    return parse_spec(
        {
            "storage": {"uri": "s3://runs/team-a/r1"},
            "metricsPort": 9500,
            "serving": {"enabled": True, "apiKeysSecret": "keys", **serving},
        }
    )


def matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels, and matchExpressions with Exists) against a pod's labels."""
    exprs = selector.get("matchExpressions", [])
    assert all(e["operator"] == "Exists" for e in exprs)
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
        e["key"] in labels for e in exprs
    )


def pod_labels():
    """The labels of the run's stage pods and Ray pods, as the operator writes them."""
    s = spec()
    job = pytorchjob_for_stage(RUN, s, stage_plan(s)[0], attempt=1)
    train = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    service = rayservice_for_run(RUN, s, "s3://runs/team-a/r1/sft/checkpoints")
    ray = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    assert ray == worker
    return train, ray


def test_each_pod_of_a_run_is_selected_by_exactly_one_of_its_policies():
    train_policy, chat_policy = network_policies(RUN, spec(), SETTINGS)
    train, ray = pod_labels()
    assert matches(train_policy["spec"]["podSelector"], train)
    assert not matches(train_policy["spec"]["podSelector"], ray)
    assert matches(chat_policy["spec"]["podSelector"], ray)
    assert not matches(chat_policy["spec"]["podSelector"], train)
    other_run = {**train, "nanorun.io/run": "r2"}
    assert not any(matches(p["spec"]["podSelector"], other_run) for p in (train_policy, chat_policy))
    for policy in (train_policy, chat_policy):
        meta = policy["metadata"]
        assert meta["namespace"] == "team-a" and meta["ownerReferences"] == [RUN.owner_reference()]
        assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open (storage, DNS)


def test_training_pods_take_connections_from_their_run_and_scrapes_on_the_metrics_port_only():
    [policy] = network_policies(RUN, spec(enabled=False), SETTINGS)
    assert policy["metadata"]["name"] == "r1-train"
    own, scrape = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"nanorun.io/run": "r1"}}}]}  # every port
    assert scrape == {"from": [SCRAPER], "ports": [{"protocol": "TCP", "port": 9500}]}


def test_ray_ports_open_to_the_ray_pods_and_kuberay_and_the_chat_port_to_the_admins_sources():
    policy = network_policies(RUN, spec(), NetworkSettings(**{**SETTINGS.__dict__, "chat_from": (INGRESS,)}))[
        1
    ]
    assert policy["metadata"]["name"] == "r1-chat"
    ray, chat, scrape = policy["spec"]["ingress"]
    assert "ports" not in ray  # GCS, dashboard, client and the raylets' own ports
    assert ray["from"] == [
        {"podSelector": policy["spec"]["podSelector"]},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay"}}},
    ]
    assert chat == {"from": [INGRESS], "ports": [{"protocol": "TCP", "port": 8000}]}
    assert scrape["from"] == [SCRAPER]
    assert sorted(p["port"] for p in scrape["ports"]) == [8001, 8080]
    open_ports = {p["port"] for rule in (chat, scrape) for p in rule["ports"]}
    assert not open_ports & {6379, 8265, 10001}


def test_without_chat_sources_the_chat_answers_the_runs_namespace_and_without_scrapers_nobody_scrapes():
    policy = network_policies(RUN, spec(), NetworkSettings(enabled=True))[1]
    ray, chat = policy["spec"]["ingress"]
    assert ray["from"] == [{"podSelector": policy["spec"]["podSelector"]}]  # no KubeRay namespace set
    assert chat["from"] == [{"podSelector": {}}]  # every pod of the policy's own namespace


@pytest.mark.parametrize("data", [{}, {"enabled": False, "chatFrom": [INGRESS]}])
def test_turned_off_no_policy_is_made(data):
    assert network_policies(RUN, spec(), NetworkSettings.from_data(data)) == []


def test_the_ray_cluster_authenticates_with_a_token_where_ray_has_it():
    service = rayservice_for_run(RUN, spec(), "s3://runs/team-a/r1/sft/checkpoints")
    assert service["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    old = rayservice_for_run(RUN, spec(rayVersion="2.51.1"), "s3://runs/team-a/r1/sft/checkpoints")
    assert "authOptions" not in old["spec"]["rayClusterConfig"]  # KubeRay would refuse it
