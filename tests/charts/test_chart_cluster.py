"""The chart and the plain manifests against the real test API server (tests/fixtures/kube.py):
server-side dry runs of every rendering, `helm install` and `helm uninstall`, what the operator's
ServiceAccount may and may not do (`kubectl auth can-i`), and the example LLMRuns validated by the
LLMRun CRD. The API server has no prometheus-operator CRDs, so these render without the monitoring
API; tests/charts/test_chart.py checks the monitors."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from nanorun.operator.main import parse_args
from nanorun.operator.rbac import OPERATOR_RBAC_RULES

from tests.charts.conftest import CHART, CI_VALUES, REPO, Render, find, run_helm, template_args
from tests.fixtures.kube import KubeEnv

pytestmark = pytest.mark.kube

EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))
WATCHED = ["team-a", "team-b"]  # ci/namespaced-values.yaml


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    service_account: str  # system:serviceaccount:<ns>:<name>


def ensure_namespaces(kube: KubeEnv, *names: str) -> None:
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names]
    kube.apply_server_side(yaml.safe_dump_all(docs))


def dry_run_apply(kube: KubeEnv, text: str) -> None:
    kube.kubectl(
        "apply", "--dry-run=server", "--server-side", "--field-manager=nanorun-tests", "-f", "-", input=text
    )


def can_i(kube: KubeEnv, who: str, verb: str, resource: str, group: str, namespace: str | None) -> bool:
    """The API server's answer (a SubjectAccessReview) whether the ServiceAccount `who`
    (`system:serviceaccount:<ns>:<name>`) may `verb` a resource (`plural` or `plural/subresource`)
    of an API group. Not `kubectl auth can-i`, which looks the resource up first: this cluster need
    not serve every kind the operator may use (TrainJobs only where Trainer v2 runs)."""
    plural, _, subresource = resource.partition("/")
    sa_namespace = who.split(":")[2]
    attributes = {"verb": verb, "group": group, "resource": plural, "subresource": subresource}
    if namespace:
        attributes["namespace"] = namespace
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": who,
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{sa_namespace}",
                "system:authenticated",
            ],
            "resourceAttributes": attributes,
        },
    }
    out = kube.kubectl("create", "-f", "-", "-o", "json", input=yaml.safe_dump(review))
    return bool(json.loads(out.stdout)["status"].get("allowed"))


def install(kube: KubeEnv, helm: str, namespace: str, *sets: str) -> Release:
    name = f"nr-{uuid.uuid4().hex[:8]}"
    args = ["install", name, str(CHART), "--namespace", namespace, "--kubeconfig", kube.kubeconfig]
    for item in sets:
        args += ["--set", item]
    run_helm(helm, *args)
    return Release(name, namespace, f"system:serviceaccount:{namespace}:{name}-nanorun")


@pytest.fixture(scope="module")
def release(kube: KubeEnv, helm_bin: str) -> Iterator[Release]:
    """The chart installed with its defaults into a namespace of its own."""
    namespace = f"nanorun-system-{uuid.uuid4().hex[:6]}"
    ensure_namespaces(kube, namespace)
    rel = install(kube, helm_bin, namespace)
    yield rel
    run_helm(helm_bin, "uninstall", rel.name, "-n", namespace, "--kubeconfig", kube.kubeconfig, check=False)


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_every_rendering_passes_a_server_side_dry_run(
    kube: KubeEnv, helm_bin: str, kube_namespace: str, values: Path | None
) -> None:
    ensure_namespaces(kube, *WATCHED)
    args = template_args(values=[values] if values else [], namespace=kube_namespace)
    text = run_helm(helm_bin, *args).stdout
    kinds = {doc["kind"] for doc in yaml.safe_load_all(text) if doc}
    assert "Deployment" in kinds
    dry_run_apply(kube, text)


def test_chart_crd_is_accepted_by_the_api_server(kube: KubeEnv, helm_bin: str) -> None:
    crds = [doc for doc in yaml.safe_load_all(run_helm(helm_bin, "show", "crds", str(CHART)).stdout) if doc]
    assert [c["metadata"]["name"] for c in crds] == ["llmruns.nanorun.io", "llmsweeps.nanorun.io"]
    dry_run_apply(kube, yaml.safe_dump_all(crds))


def test_helm_install_creates_the_operator_and_uninstall_removes_it(
    kube: KubeEnv, helm_bin: str, kube_namespace: str
) -> None:
    rel = install(kube, helm_bin, kube_namespace)
    status = run_helm(helm_bin, "status", rel.name, "-n", kube_namespace, "--kubeconfig", kube.kubeconfig)
    assert "STATUS: deployed" in status.stdout
    assert "reconciles LLMRuns in all namespaces" in status.stdout  # NOTES.txt
    fullname = f"{rel.name}-nanorun"
    for kind in ("deployment", "serviceaccount", "service", "configmap"):
        name = f"{fullname}-dashboard" if kind == "configmap" else fullname
        kube.kubectl("get", kind, name, "-n", kube_namespace)
    for kind in ("clusterrole", "clusterrolebinding"):
        kube.kubectl("get", kind, fullname)
    kube.kubectl("get", "crd", "llmruns.nanorun.io")

    run_helm(helm_bin, "uninstall", rel.name, "-n", kube_namespace, "--kubeconfig", kube.kubeconfig)
    for kind, namespace in (
        ("deployment", kube_namespace),
        ("clusterrole", None),
        ("clusterrolebinding", None),
    ):
        args = ["get", kind, fullname] + (["-n", namespace] if namespace else [])
        assert "NotFound" in kube.kubectl(*args, check=False).stderr, f"{kind} survived helm uninstall"
    kube.kubectl("get", "crd", "llmruns.nanorun.io")  # helm never deletes a chart's CRDs


def test_operator_may_do_every_thing_it_uses(kube: KubeEnv, release: Release, kube_namespace: str) -> None:
    refused = []
    for rule in OPERATOR_RBAC_RULES:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    # namespaced resources in a namespace the operator was not installed in
                    if not can_i(kube, release.service_account, verb, resource, group, kube_namespace):
                        refused.append(f"{verb} {resource}.{group}")
    assert not refused, f"the operator's ServiceAccount is refused: {refused}"


@pytest.mark.parametrize(
    ("verb", "resource", "group"),
    [
        ("get", "secrets", ""),
        ("list", "secrets", ""),
        ("delete", "secrets", ""),
        ("create", "pods", ""),
        ("delete", "pods", ""),
        ("create", "pods/exec", ""),
        ("delete", "llmruns", "nanorun.io"),
        ("update", "llmruns", "nanorun.io"),
        ("delete", "pytorchjobs", "kubeflow.org"),
        ("update", "trainjobs", "trainer.kubeflow.org"),
        ("create", "clustertrainingruntimes", "trainer.kubeflow.org"),
        ("create", "trainingruntimes", "trainer.kubeflow.org"),
        ("create", "deployments", "apps"),
        ("create", "customresourcedefinitions", "apiextensions.k8s.io"),
        ("delete", "namespaces", ""),
        ("create", "clusterrolebindings", "rbac.authorization.k8s.io"),
        ("impersonate", "serviceaccounts", ""),
    ],
)
def test_operator_may_not_do_anything_else(
    kube: KubeEnv, release: Release, kube_namespace: str, verb: str, resource: str, group: str
) -> None:
    for namespace in (release.namespace, kube_namespace):
        assert not can_i(kube, release.service_account, verb, resource, group, namespace), (
            f"the operator may {verb} {resource} in {namespace}"
        )


def test_namespaced_install_reaches_only_the_watched_namespaces(
    kube: KubeEnv, helm_bin: str, kube_namespace: str
) -> None:
    watched, other = f"{kube_namespace}-w"[:63], f"{kube_namespace}-o"[:63]
    ensure_namespaces(kube, watched, other)
    rel = install(kube, helm_bin, kube_namespace, f"operator.watchNamespaces={{{watched}}}")
    try:
        who = rel.service_account
        assert can_i(kube, who, "create", "pytorchjobs", "kubeflow.org", watched)
        assert can_i(kube, who, "patch", "llmruns/status", "nanorun.io", watched)
        assert not can_i(kube, who, "create", "pytorchjobs", "kubeflow.org", other)
        assert not can_i(kube, who, "list", "llmruns", "nanorun.io", other)
        assert not can_i(kube, who, "create", "rayservices", "ray.io", rel.namespace)
        assert can_i(kube, who, "watch", "namespaces", "", None)
        assert can_i(kube, who, "list", "customresourcedefinitions", "apiextensions.k8s.io", None)
    finally:
        run_helm(
            helm_bin,
            "uninstall",
            rel.name,
            "-n",
            kube_namespace,
            "--kubeconfig",
            kube.kubeconfig,
            check=False,
        )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_llmrun_is_valid_for_the_crd(kube: KubeEnv, kube_namespace: str, example: Path) -> None:
    kube.accepts(kube_namespace, example)


def test_crd_refuses_an_example_broken_on_purpose(kube: KubeEnv, kube_namespace: str) -> None:
    # The positive checks above mean something only if the API server does validate LLMRuns.
    doc = yaml.safe_load((REPO / "manifests" / "examples" / "speedrun-d20.yaml").read_text())
    doc["spec"]["serving"]["minReplicas"] = 9
    out = kube.kubectl(
        "create", "--dry-run=server", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(doc), check=False
    )
    assert out.returncode != 0 and "minReplicas must not exceed" in out.stderr, out.stderr


def test_kustomize_manifests_pass_a_server_side_dry_run_and_match_the_chart(
    kube: KubeEnv, render: Render
) -> None:
    text = kube.kubectl("kustomize", str(REPO / "manifests")).stdout
    objects = [doc for doc in yaml.safe_load_all(text) if doc]
    ensure_namespaces(kube, "nanorun-system")
    dry_run_apply(kube, text)
    (role,) = find(objects, "ClusterRole")
    assert role["rules"] == OPERATOR_RBAC_RULES
    (deployment,) = find(objects, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    parse_args(container["args"])  # exits on a flag `nanorun operator` does not know
    (chart_deployment,) = find(render(), "Deployment")
    chart_container = chart_deployment["spec"]["template"]["spec"]["containers"][0]
    for key in ("command", "args", "securityContext", "livenessProbe"):
        assert container[key] == chart_container[key], f"manifests and chart disagree on the operator's {key}"
    assert (
        deployment["spec"]["template"]["spec"]["securityContext"]
        == (chart_deployment["spec"]["template"]["spec"]["securityContext"])
    )
