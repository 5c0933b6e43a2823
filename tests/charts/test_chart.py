"""The helm chart, rendered with helm (no cluster): lint, the operator Deployment's conventions,
flags the operator accepts, RBAC rules equal to the operator's own list, monitors only where the
prometheus-operator API exists and matching the pods the operator creates, the dashboard
ConfigMap, the helm test, and values.schema.json refusing bad values with helm's own error."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from nanorun.operator.api import DEFAULT_IMAGE, parse_spec
from nanorun.operator.api.tenancy import Policy
from nanorun.operator.children.pytorchjob import pytorchjob_for_stage
from nanorun.operator.children.rayservice import rayservice_for_run
from nanorun.operator.main import parse_args
from nanorun.operator.rbac import OPERATOR_RBAC_RULES
from nanorun.operator.reconcile.plan import stage_plan
from nanorun.operator.run_ref import RunRef

from tests.charts.conftest import (
    CHART,
    CI_VALUES,
    MONITORING_API,
    REPO,
    Render,
    find,
    only,
    run_helm,
    template_args,
)
from tools import generate

PRODUCTION = CHART / "ci" / "production-values.yaml"
NAMESPACED = CHART / "ci" / "namespaced-values.yaml"
MINIMAL = CHART / "ci" / "minimal-values.yaml"


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {args}"
    return values[0]


def test_chart_metadata_names_api_v2_a_kube_version_and_the_project_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["type"] == "application"
    assert chart["kubeVersion"].startswith(">=1.28")  # CEL rules in the LLMRun CRD
    assert chart["appVersion"] == version("nanorun")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["tag"] == ""  # the operator image follows appVersion
    assert DEFAULT_IMAGE.endswith(f":{chart['appVersion']}")  # and the trainer image the same release


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_chart_lints_strictly(helm_bin: str, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART), "--kube-version", "1.36.3"]
    if values:
        args += ["--values", str(values)]
    out = run_helm(helm_bin, *args, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_operator_runs_as_one_recreated_non_root_replica_with_a_liveness_probe(render: Render) -> None:
    objects = render()
    deployment = only(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    c = container(objects)
    assert c["command"] == ["nanorun", "operator"]
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # read-only root: the only writable path is an emptyDir on /tmp
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/tmp"]
    probe = c["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert probe["path"] == "/healthz"
    assert ports[probe["port"]] == int(flag(c["args"], "--liveness-port"))
    assert "readinessProbe" not in c  # kopf's advice: liveness only
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert pod["serviceAccountName"] == only(objects, "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_operator_flags_are_ones_nanorun_operator_accepts(render: Render, values: Path | None) -> None:
    objects = render(values=[values] if values else [])
    c = container(objects)
    args = parse_args(c["args"])  # argparse exits on an unknown flag
    settings = yaml.safe_load(values.read_text()) if values else {}
    assert args.namespace == settings.get("operator", {}).get("watchNamespaces", [])
    service = only(objects, "Service")
    metrics_port = {p["name"]: p["containerPort"] for p in c["ports"]}[
        service["spec"]["ports"][0]["targetPort"]
    ]
    assert args.metrics_port == metrics_port


def test_s3_credentials_come_from_the_referenced_secret(render: Render) -> None:
    c = container(render(values=[PRODUCTION]))
    assert c["envFrom"] == [{"secretRef": {"name": "nanorun-s3"}}]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["AWS_ENDPOINT_URL"] == "https://minio.storage.svc.cluster.local:9000"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["TZ"] == "UTC"
    default = container(render())
    assert "envFrom" not in default
    assert not {e["name"] for e in default["env"]} & {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"}


def test_rbac_files_are_generated_from_the_operator_rules() -> None:
    files = generate.generated_files()
    for path in (generate.CHART_RBAC_PATH, generate.MANIFEST_ROLE_PATH):
        assert path.read_text() == files[path], f"{path} is stale: run `python -m tools.generate --write`"


def test_cluster_role_has_exactly_the_operator_rules(render: Render) -> None:
    objects = render()
    role = only(objects, "ClusterRole")
    assert role["rules"] == OPERATOR_RBAC_RULES
    binding = only(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = only(objects, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["name"], "namespace": "nanorun-system"}
    ]
    assert not find(objects, "Role") and not find(objects, "RoleBinding")


def test_watched_namespaces_get_role_bindings_and_only_cluster_reads_stay_cluster_wide(
    render: Render,
) -> None:
    objects = render(values=[NAMESPACED])
    roles = {r["metadata"]["name"]: r["rules"] for r in find(objects, "ClusterRole")}
    assert sorted(rule for rules in roles.values() for rule in map(json.dumps, rules)) == sorted(
        map(json.dumps, OPERATOR_RBAC_RULES)
    )
    cluster_binding = only(objects, "ClusterRoleBinding")
    cluster_rules = roles[cluster_binding["roleRef"]["name"]]
    assert {r for rule in cluster_rules for r in rule["resources"]} == {
        "namespaces",
        "customresourcedefinitions",
    }
    bindings = find(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        namespaced = roles[binding["roleRef"]["name"]]
        assert {r for rule in namespaced for r in rule["resources"]} == {
            "llmruns",
            "llmruns/status",
            "llmsweeps",
            "llmsweeps/status",
            "pytorchjobs",
            "trainjobs",
            "rayservices",
            "workloads",
            "jobs",
            "events",
            "pods",
            "pods/log",
            "networkpolicies",
        }


def test_bring_your_own_service_account_renders_no_rbac(render: Render) -> None:
    objects = render(values=[MINIMAL])
    assert not find(objects, "ServiceAccount") and not find(objects, "ClusterRole")
    assert not find(objects, "ClusterRoleBinding") and not find(objects, "ConfigMap")
    assert (
        only(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-operators"
    )


def test_monitors_render_only_where_the_prometheus_operator_api_exists(render: Render) -> None:
    without = render()
    assert not find(without, "ServiceMonitor") and not find(without, "PodMonitor")
    with_api = render(api_versions=[MONITORING_API])
    assert len(find(with_api, "ServiceMonitor")) == 1 and len(find(with_api, "PodMonitor")) == 1
    assert all(o["apiVersion"] == MONITORING_API for o in with_api if o["kind"].endswith("Monitor"))
    disabled = render(values=[MINIMAL], api_versions=[MONITORING_API])
    assert not find(disabled, "ServiceMonitor") and not find(disabled, "PodMonitor")


def test_service_monitor_scrapes_the_operator_service(render: Render) -> None:
    objects = render(values=[PRODUCTION], api_versions=[MONITORING_API])
    monitor, service = only(objects, "ServiceMonitor"), only(objects, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["nanorun-system"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "1m"
    assert endpoint["honorLabels"] is True  # llmrun_stage_info's namespace label is the run's


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "Exists", expr
        if expr["key"] not in labels:
            return False
    return selector.get("matchLabels", {}).items() <= labels.items()


def operator_pods() -> dict[str, dict[str, Any]]:
    """Pod templates the operator creates for the tiny example: a trainer and the Ray head/worker."""
    doc = yaml.safe_load((REPO / "manifests" / "examples" / "tiny-cpu.yaml").read_text())
    spec = parse_spec(doc["spec"])
    run = RunRef(name="tiny", namespace="ml", uid="0")
    job = pytorchjob_for_stage(run, spec, stage_plan(spec)[1], attempt=1)
    pods = {"trainer": job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]}
    cluster = rayservice_for_run(run, spec, "s3://nanorun/runs/tiny/sft")["spec"]["rayClusterConfig"]
    pods["ray-head"] = cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        pods[f"ray-{group['groupName']}"] = group["template"]
    return pods


def test_pod_monitor_scrapes_trainer_and_serving_pods_the_operator_creates(render: Render) -> None:
    objects = render(values=[PRODUCTION], api_versions=[MONITORING_API])
    monitor = only(objects, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml-training", "ml-serving"]}
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    pods = operator_pods()
    for name, template in pods.items():
        assert matches(monitor["spec"]["selector"], template["metadata"]["labels"]), (
            f"{name} pods not selected"
        )
    trainer_ports = {p["name"] for c in pods["trainer"]["spec"]["containers"] for p in c.get("ports", [])}
    head_ports = {p["name"] for c in pods["ray-head"]["spec"]["containers"] for p in c.get("ports", [])}
    worker_ports = {p["name"] for c in pods["ray-chat"]["spec"]["containers"] for p in c.get("ports", [])}
    assert "metrics" in endpoints and "metrics" in trainer_ports  # llm_train_* on --metrics-port
    # every replica's own /metrics on its worker pod; not the head's proxy, which picks any replica
    assert "serve-metrics" in endpoints and "serve-metrics" in worker_ports
    assert "serve" not in endpoints and not endpoints.keys() & head_ports - {"metrics"}
    for endpoint in endpoints.values():
        assert endpoint["path"] == "/metrics"
        assert {"sourceLabels": ["__meta_kubernetes_pod_label_nanorun_io_run"], "targetLabel": "run"} in (
            endpoint["relabelings"]
        )


def test_dashboard_configmap_carries_the_dashboard_for_the_grafana_sidecar(render: Render) -> None:
    objects = render(values=[PRODUCTION])
    (configmap,) = find(objects, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "nanorun"}
    dashboard = json.loads(configmap["data"]["nanorun.json"])
    assert dashboard == json.loads((CHART / "files" / "dashboards" / "nanorun.json").read_text())
    assert len(configmap["data"]["nanorun.json"]) < 1024 * 1024  # ConfigMap size limit


def test_helm_test_pod_scrapes_the_operator_service(render: Render) -> None:
    objects = render()
    pods = find(objects, "Pod")
    assert len(pods) == 1
    pod = pods[0]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    service = only(objects, "Service")
    script = pod["spec"]["containers"][0]["command"][-1]
    assert (
        f"http://{service['metadata']['name']}.nanorun-system.svc:{service['spec']['ports'][0]['port']}/metrics"
        in (script)
    )
    assert pod["spec"]["containers"][0]["image"] == container(objects)["image"]
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_chart_ships_the_generated_llmrun_and_llmsweep_crds() -> None:
    crds = sorted(p.name for p in (CHART / "crds").iterdir())
    assert crds == ["nanorun.io_llmruns.yaml", "nanorun.io_llmsweeps.yaml"]
    for crd in crds:
        assert (CHART / "crds" / crd).read_text() == (REPO / "manifests" / "crd" / crd).read_text()


@pytest.mark.parametrize(
    ("setting", "offending"),
    [
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("operator.metricsPort=70000", "metricsPort"),
        ("operator.livenessPort=http", "livenessPort"),
        ("operator.replicas=2", "replicas"),
        ("operator.watchNamespaces={Team_A}", "watchNamespaces"),
        ("operator.storage.endpoint=minio:9000", "endpoint"),
        ("serviceMonitor.interval=often", "interval"),
        ("podMonitor.additionalLabels.release=null", "release"),
        ("service.type=Ingress", "type"),
        ("grafana.dashboard.enabled=yes", "enabled"),
        ("operator.networkPolicy.enabled=sometimes", "enabled"),
        ("operator.networkPolicy.chatFrom[0].namespace=ingress", "namespace"),
    ],
)
def test_values_schema_rejects_bad_values(helm_bin: str, setting: str, offending: str) -> None:
    out = run_helm(helm_bin, *template_args(sets=[setting]), check=False)
    assert out.returncode != 0, f"--set {setting} was accepted"
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
    assert offending in out.stderr, out.stderr


def test_the_policy_configmap_is_the_policy_the_operator_reads(render, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "operator": {
                    "policy": {
                        "storage": {
                            "prefixes": ["s3://runs/{namespace}/", "s3://more/{namespace}"],
                            "namespaces": {"team-a": ["s3://a-archive/runs/"]},
                            "readOnlyPrefixes": ["s3://shared/data"],
                        },
                        "images": ["ghcr.io/nanorun/", "registry.example.com/team/"],
                        "priorityClasses": ["training-low"],
                        "trainingRuntimes": ["nanorun-torch"],
                        "nodeLabels": ["nanorun.io/pool={namespace}", "nvidia.com/gpu.product"],
                        "tolerations": ["nvidia.com/gpu"],
                    }
                }
            }
        )
    )
    objects = render(values=[values])
    (configmap,) = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-policy")
    ]
    policy = Policy.from_data(configmap["data"])
    assert policy.writable("team-a") == ("s3://runs/team-a", "s3://more/team-a", "s3://a-archive/runs")
    assert policy.readable("team-b") == ("s3://runs/team-b", "s3://more/team-b", "s3://shared/data")
    assert policy.images == ("ghcr.io/nanorun/", "registry.example.com/team/")  # prefixes kept as written
    assert (policy.priority_classes, policy.training_runtimes) == (("training-low",), ("nanorun-torch",))
    assert policy.node_labels == ("nanorun.io/pool={namespace}", "nvidia.com/gpu.product")
    assert policy.tolerations == ("nvidia.com/gpu",)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    op = container(objects)
    assert "--policy=/etc/nanorun/policy" in op["args"]
    mount = next(m for m in op["volumeMounts"] if m["mountPath"] == "/etc/nanorun/policy")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    kinds = {o["kind"] for o in objects}
    assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= kinds
    # Without a policy: no ConfigMap, no admission policy, no flag.
    plain = render()
    assert not {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} & {o["kind"] for o in plain}
    assert "--policy=/etc/nanorun/policy" not in container(plain)["args"]


def test_the_operator_gets_the_network_policy_settings_it_renders_policies_from(render, tmp_path):
    from nanorun.operator.children.network import NETWORK_POLICY_ENV, NetworkSettings

    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"operator": {"networkPolicy": {"chatFrom": [peer]}}}))
    env = {e["name"]: e.get("value") for e in container(render(values=[values]))["env"]}
    settings = NetworkSettings.from_data(json.loads(env[NETWORK_POLICY_ENV]))
    assert settings.enabled and settings.chat_from == (peer,)
    assert settings.kuberay_namespace == "default"
    assert settings.metrics_from == (
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    )
    # The plain manifests' operator has the chart's defaults.
    plain = yaml.safe_load_all((Path(__file__).parents[2] / "manifests/operator/deployment.yaml").read_text())
    [deployment] = [d for d in plain if d and d["kind"] == "Deployment"]
    [plain_env] = [
        e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == NETWORK_POLICY_ENV
    ]
    default = {e["name"]: e.get("value") for e in container(render())["env"]}[NETWORK_POLICY_ENV]
    assert json.loads(plain_env) == json.loads(default)
    off = {
        e["name"]: e.get("value")
        for e in container(render(sets=["operator.networkPolicy.enabled=false"]))["env"]
    }
    assert not NetworkSettings.from_data(json.loads(off[NETWORK_POLICY_ENV])).enabled
