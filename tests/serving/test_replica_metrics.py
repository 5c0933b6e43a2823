"""Every replica's metrics are scraped on its own pod: the worker pods the operator builds declare
the `serve-metrics` port and hold one replica each, a replica serves its registry on that port, and
the autoscaling defaults follow the batching slots. (Two replicas on a cluster, each scraped
on its pod: the end-to-end test, tests/e2e/test_pipeline_kube.py.)"""

from __future__ import annotations

import json
import socket

import httpx
import yaml
from nanorun.operator.api import parse_spec
from nanorun.operator.children.rayservice import SERVE_METRICS_PORT_NAME, rayservice_for_run
from nanorun.operator.names import LABEL_RUN
from nanorun.operator.run_ref import RunRef
from nanorun.serving import SERVE_METRICS_PORT, SERVE_METRICS_PORT_ENV, SERVE_REPLICA_RESOURCE, SERVE_SLOTS
from nanorun.serving import metrics as serving_metrics

from tests.serving.conftest import free_port

RUN = RunRef(name="speedrun", namespace="ml", uid="0")


def rayservice(**serving):
    spec = parse_spec(
        {
            "storage": {"uri": "s3://b/r"},
            "serving": {"gpusPerReplica": 0.5, "apiKeysSecret": "chat-keys", **serving},
        }
    )
    return rayservice_for_run(RUN, spec, "s3://b/r/sft")


def test_each_worker_pod_declares_its_replicas_metrics_port_and_the_head_does_not():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert {"name": SERVE_METRICS_PORT_NAME, "containerPort": SERVE_METRICS_PORT} in worker["ports"]
    assert {"name": SERVE_METRICS_PORT_ENV, "value": str(SERVE_METRICS_PORT)} in worker["env"]
    assert LABEL_RUN in group["template"]["metadata"]["labels"]  # what the chart's PodMonitor selects
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert SERVE_METRICS_PORT_NAME not in {p["name"] for p in head["ports"]}
    assert SERVE_METRICS_PORT_ENV not in {e["name"] for e in head["env"]}


def test_a_worker_pod_holds_one_replica_whatever_its_fractions():
    svc = rayservice(cpusPerReplica=0.5)
    (group,) = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    offered = json.loads(group["rayStartParams"]["resources"].strip("'"))
    (deployment,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    taken = deployment["ray_actor_options"]["resources"]
    assert offered == taken == {SERVE_REPLICA_RESOURCE: 1}
    assert "resources" not in svc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]


def test_a_replica_takes_a_full_batch_and_as_many_queued():
    (deployment,) = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    assert deployment["max_ongoing_requests"] == 2 * SERVE_SLOTS


def test_build_app_scales_out_when_a_replicas_batch_is_full():
    from nanorun.serving.app import build_app

    config = build_app(
        {"slots": 8, "autoscaling_config": {"max_replicas": 4}, "allow_unauthenticated": True}
    )._bound_deployment._deployment_config
    assert config.max_ongoing_requests == 16
    assert config.autoscaling_config.target_ongoing_requests == 8
    assert config.autoscaling_config.max_replicas == 4


def test_a_replica_serves_its_metrics_on_the_pods_port(monkeypatch):
    monkeypatch.setattr(serving_metrics, "_exporter_port", None)
    monkeypatch.delenv(SERVE_METRICS_PORT_ENV, raising=False)
    assert serving_metrics.export_replica_metrics() is None  # no port named: the app's /metrics only
    port = free_port()
    monkeypatch.setenv(SERVE_METRICS_PORT_ENV, str(port))
    serving_metrics.serve_metrics().requests.labels(status="200").inc()
    assert serving_metrics.export_replica_metrics() == port
    assert serving_metrics.export_replica_metrics(free_port()) == port  # once per process
    scraped = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'nanorun_serve_requests_total{status="200"}' in scraped
    assert scraped == serving_metrics.serve_metrics().render()[0].decode()


def test_a_taken_port_is_logged_not_fatal(monkeypatch, caplog):
    monkeypatch.setattr(serving_metrics, "_exporter_port", None)
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        assert serving_metrics.export_replica_metrics(taken.getsockname()[1]) is None
    assert "not served" in caplog.text
