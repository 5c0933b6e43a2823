"""The scrape configuration a Prometheus gets from the chart's ServiceMonitor and PodMonitor
(tests/fixtures/prometheus/, what prometheus-operator would generate): Prometheus accepts it
(`promtool check config`), and its relabeling, applied here to the discovery labels Prometheus gives
the pods the operator creates, keeps the trainer's `metrics` port and each Ray worker's
`serve-metrics` port and nothing else (not the `metrics` port of Ray's own agent). The end-to-end
test (tests/e2e/test_pipeline_kube.py) runs a real Prometheus with the same configuration."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from nanorun.operator.api import parse_spec
from nanorun.operator.children.pytorchjob import pytorchjob_for_stage
from nanorun.operator.children.rayservice import rayservice_for_run
from nanorun.operator.reconcile.plan import stage_plan
from nanorun.operator.run_ref import RunRef

from tests.charts.conftest import MONITORING_API, REPO, Render
from tests.fixtures.prometheus import (
    check_config,
    endpoints_targets,
    label_name,
    monitors_of,
    pod_targets,
    prometheus_config,
    scrape_config,
    selector_rules,
    through_http_sd,
)

RELEASE_NS = "nanorun-system"


@pytest.fixture(scope="module")
def monitors(render: Render) -> list[dict[str, Any]]:
    return monitors_of(render(api_versions=[MONITORING_API], namespace=RELEASE_NS))


def relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus's relabeling (keep, drop, replace) of one target's labels; None when dropped.
    Regexes are anchored at both ends, and an unset label reads as ""."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep" and not match or action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
    return labels


def running(template: dict[str, Any], name: str, phase: str = "Running") -> dict[str, Any]:
    """A pod of `template` in namespace `ml`, as the API server would list it once it has an IP."""
    metadata = template["metadata"] | {"name": name, "namespace": "ml"}
    return {"metadata": metadata, "spec": template["spec"], "status": {"podIP": "10.244.0.9", "phase": phase}}


def scraped(
    jobs: list[dict[str, Any]], pods: dict[str, dict[str, Any]], phase: str = "Running"
) -> list[tuple[str, str, str, str]]:
    """(job, pod, port, run) of every target the pod jobs keep."""
    out = []
    for job in jobs:
        if job["kubernetes_sd_configs"][0]["role"] != "pod":
            continue
        for name, template in pods.items():
            for group in pod_targets(running(template, name, phase)):
                target = group["labels"] | {"__address__": group["targets"][0], "job": job["job_name"]}
                labels = relabel(job["relabel_configs"], target)
                if labels is not None:
                    out.append((labels["job"], labels["pod"], labels["endpoint"], labels["run"]))
    return out


def operator_pods() -> dict[str, dict[str, Any]]:
    """The pods of a run as the operator asks for them: a stage's Master, the Ray head and worker.
    KubeRay also adds a `metrics` port (Ray's agent, 8080) to each Ray container that lacks one."""
    spec = parse_spec(yaml.safe_load((REPO / "manifests" / "examples" / "tiny-cpu.yaml").read_text())["spec"])
    run = RunRef(name="tiny", namespace="ml", uid="0")
    job = pytorchjob_for_stage(run, spec, stage_plan(spec)[1], attempt=1)
    cluster = rayservice_for_run(run, spec, "s3://nanorun/runs/tiny/sft")["spec"]["rayClusterConfig"]
    pods = {
        "tiny-pretrain-1-master-0": job["spec"]["pytorchReplicaSpecs"]["Master"]["template"],
        "tiny-chat-head": cluster["headGroupSpec"]["template"],
        "tiny-chat-worker": cluster["workerGroupSpecs"][0]["template"],
    }
    for name in ("tiny-chat-head", "tiny-chat-worker"):
        ports = pods[name]["spec"]["containers"][0]["ports"]
        if not any(p["name"] == "metrics" for p in ports):
            ports.append({"name": "metrics", "containerPort": 8080})
    return pods


def test_promtool_accepts_the_scrape_config_of_the_chart_monitors(monitors, tmp_path: Path) -> None:
    # as the end-to-end test runs it: Debian's Prometheus discovers through HTTP SD
    config = through_http_sd(prometheus_config(monitors, "/kubeconfig"), "http://127.0.0.1:9")
    out = check_config(config, tmp_path / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(sd["url"] for job in config["scrape_configs"] for sd in job["http_sd_configs"]) == [
        f"http://127.0.0.1:9/endpoints?namespaces={RELEASE_NS}",
        "http://127.0.0.1:9/pod?namespaces=",
        "http://127.0.0.1:9/pod?namespaces=",
    ]


def test_one_job_per_monitor_endpoint_with_its_discovery_role_and_namespaces(monitors) -> None:
    jobs = {j["job_name"]: j for j in scrape_config(monitors, "/kubeconfig")}
    assert sorted(jobs) == [
        f"podMonitor/{RELEASE_NS}/nanorun-runs/0",
        f"podMonitor/{RELEASE_NS}/nanorun-runs/1",
        f"serviceMonitor/{RELEASE_NS}/nanorun/0",
    ]
    operator = jobs[f"serviceMonitor/{RELEASE_NS}/nanorun/0"]
    assert operator["kubernetes_sd_configs"] == [
        {"role": "endpoints", "kubeconfig_file": "/kubeconfig", "namespaces": {"names": [RELEASE_NS]}}
    ]
    assert (operator["scrape_interval"], operator["honor_labels"]) == ("30s", True)
    runs = jobs[f"podMonitor/{RELEASE_NS}/nanorun-runs/0"]
    assert runs["kubernetes_sd_configs"] == [
        {"role": "pod", "kubeconfig_file": "/kubeconfig"}
    ]  # any namespace
    assert (runs["scrape_interval"], runs["scrape_timeout"], runs["metrics_path"]) == (
        "15s",
        "10s",
        "/metrics",
    )


def test_the_operator_job_keeps_the_operator_services_metrics_port(monitors, render: Render) -> None:
    objects = render(namespace=RELEASE_NS)
    (service,) = [o for o in objects if o["kind"] == "Service"]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    pods = {"nanorun-abc": running(deployment["spec"]["template"], "nanorun-abc")}
    (job,) = [j for j in scrape_config(monitors, "/k") if j["job_name"].startswith("serviceMonitor/")]
    endpoints = {
        "metadata": {"name": service["metadata"]["name"], "namespace": RELEASE_NS},
        "subsets": [
            {
                "addresses": [{"ip": "10.244.0.7", "targetRef": {"kind": "Pod", "name": "nanorun-abc"}}],
                "ports": [{"name": "metrics", "port": 9090}, {"name": "healthz", "port": 8080}],
            }
        ],
    }

    def kept(svc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        out = []
        for group in endpoints_targets(endpoints, svc, pods):
            labels = relabel(
                job["relabel_configs"],
                group["labels"] | {"__address__": group["targets"][0], "job": job["job_name"]},
            )
            if labels is not None:
                out.append((labels["__address__"], labels["job"], labels["pod"], labels["endpoint"]))
        return out

    assert kept(service) == [("10.244.0.7:9090", "nanorun", "nanorun-abc", "metrics")]  # not healthz
    other = {
        "metadata": service["metadata"]
        | {"labels": service["metadata"]["labels"] | {"app.kubernetes.io/instance": "another"}}
    }
    assert kept(other) == []  # another release's operator


def test_pod_jobs_scrape_the_trainer_and_each_ray_worker_and_not_rays_own_metrics(monitors) -> None:
    # the pod's nanorun.io/run label becomes the series' `run`
    assert sorted(scraped(scrape_config(monitors, "/k"), operator_pods())) == [
        (f"{RELEASE_NS}/nanorun-runs", "tiny-chat-worker", "serve-metrics", "tiny"),
        (f"{RELEASE_NS}/nanorun-runs", "tiny-pretrain-1-master-0", "metrics", "tiny"),
    ]


def test_pods_that_ended_are_not_scraped(monitors) -> None:
    jobs, pods = scrape_config(monitors, "/k"), operator_pods()
    assert scraped(jobs, pods, phase="Succeeded") == [] and scraped(jobs, pods, phase="Failed") == []


@pytest.mark.parametrize(
    ("selector", "labels", "kept"),
    [
        ({"matchLabels": {"app": "a"}}, {"app": "a"}, True),
        ({"matchLabels": {"app": "a"}}, {"app": "b"}, False),
        ({"matchLabels": {"app": ""}}, {}, False),  # an empty value is not a missing label
        (
            {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["x", "y"]}]},
            {"tier": "y"},
            True,
        ),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["x"]}]}, {"tier": "x"}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["x"]}]}, {}, True),
        (
            {"matchExpressions": [{"key": "nanorun.io/run", "operator": "Exists"}]},
            {"nanorun.io/run": ""},
            True,
        ),
        (
            {"matchExpressions": [{"key": "nanorun.io/run", "operator": "DoesNotExist"}]},
            {"nanorun.io/run": "r"},
            False,
        ),
    ],
)
def test_selector_rules_match_as_kubernetes_label_selectors_do(selector, labels, kept) -> None:
    target = {f"__meta_kubernetes_pod_label_{label_name(k)}": v for k, v in labels.items()}
    target |= {f"__meta_kubernetes_pod_labelpresent_{label_name(k)}": "true" for k in labels}
    assert (relabel(selector_rules(selector, "pod"), target) is not None) is kept


def test_a_monitor_without_a_namespace_selector_watches_its_own_namespace() -> None:
    monitor = {
        "kind": "PodMonitor",
        "metadata": {"name": "m", "namespace": "team-a"},
        "spec": {"selector": {}, "podMetricsEndpoints": [{"port": "metrics"}]},
    }
    (job,) = scrape_config([monitor], "/k")
    assert job["kubernetes_sd_configs"][0]["namespaces"] == {"names": ["team-a"]}
    assert (job["metrics_path"], job["honor_labels"]) == ("/metrics", False) and "scrape_interval" not in job
