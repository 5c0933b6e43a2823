"""The test control plane is a real Kubernetes API server: core objects, CRD semantics (structural
schema, status subresource, finalizers, optimistic concurrency), watches, RBAC and service-account
tokens all behave as on a cluster. Run: .venv/bin/pytest tests/kube -q
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tests.kube import binaries

pytestmark = pytest.mark.kube

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


def pytorchjob(name: str, replicas: object = 1) -> dict:
    """A PyTorchJob as an API object only: `runPolicy.managedBy` hands it to another controller
    (MultiKueue's name), so the training-operator running in the cluster leaves it and its status alone."""
    container = {
        "name": "pytorch",
        "image": "nanorun-trainer:test",
        "command": ["python", "-m", "nanorun.trainer.base_train"],
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": replicas,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": {"containers": [container]}},
                }
            },
            "runPolicy": {"managedBy": "kueue.x-k8s.io/multikueue"},
        },
    }


@pytest.fixture
def jobs(kube) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube.api_client())


@pytest.fixture
def core(kube) -> client.CoreV1Api:
    return client.CoreV1Api(kube.api_client())


def test_core_objects_round_trip(core, kube_namespace):
    ns = kube_namespace
    assert core.read_namespace(ns).status.phase == "Active"
    core.create_namespaced_config_map(ns, {"metadata": {"name": "settings"}, "data": {"depth": "20"}})
    core.create_namespaced_secret(
        ns, {"metadata": {"name": "s3-creds"}, "stringData": {"AWS_ACCESS_KEY_ID": "key"}}
    )
    core.create_namespaced_service_account(ns, {"metadata": {"name": "trainer"}})
    core.create_namespaced_event(
        ns,
        {
            "metadata": {"name": "run.started"},
            "type": "Normal",
            "reason": "StageStarted",
            "message": "pretrain",
            "involvedObject": {"kind": "ConfigMap", "namespace": ns, "name": "settings", "apiVersion": "v1"},
        },
    )

    assert core.read_namespaced_config_map("settings", ns).data == {"depth": "20"}
    # stringData is write-only: the server stores it base64-encoded under data.
    assert core.read_namespaced_secret("s3-creds", ns).data == {"AWS_ACCESS_KEY_ID": "a2V5"}
    assert core.read_namespaced_service_account("trainer", ns).metadata.uid
    [event] = core.list_namespaced_event(ns).items
    assert (event.reason, event.involved_object.name) == ("StageStarted", "settings")


def test_every_crd_is_established(kube):
    files = [arg for path in binaries.crd_files() for arg in ("-f", str(path))]
    names = kube.kubectl("get", *files, "-o", "name").stdout.split()
    assert {
        "customresourcedefinition.apiextensions.k8s.io/pytorchjobs.kubeflow.org",
        "customresourcedefinition.apiextensions.k8s.io/rayservices.ray.io",
    } <= set(names)
    for name in names:
        established = kube.kubectl(
            "get", name, "-o", 'jsonpath={.status.conditions[?(@.type=="Established")].status}'
        )
        assert established.stdout == "True", name


def test_custom_object_round_trips(jobs, kube_namespace):
    created = jobs.create_namespaced_custom_object(
        GROUP, VERSION, kube_namespace, PLURAL, pytorchjob("d20-pretrain-0")
    )
    read = jobs.get_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, "d20-pretrain-0")
    sent = pytorchjob("x")["spec"]
    assert read["spec"]["pytorchReplicaSpecs"] == sent["pytorchReplicaSpecs"]
    # The schema's defaults fill in what was left out (runPolicy.suspend: false); nothing else changes.
    assert read["spec"]["runPolicy"] == {**sent["runPolicy"], "suspend": False}
    assert read["metadata"]["uid"] == created["metadata"]["uid"]
    names = [
        o["metadata"]["name"]
        for o in jobs.list_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL)["items"]
    ]
    assert names == ["d20-pretrain-0"]


def test_structural_schema_rejects_invalid_object_with_server_message(jobs, kube_namespace):
    # An LLMRun: no admission webhook sees it first (Kueue's webhooks take every PyTorchJob and
    # answer a mistyped one with their own decoding error), so the schema's own message comes back.
    from nanorun.operator.api import GROUP as NANORUN
    from nanorun.operator.api import PLURAL as LLMRUNS
    from nanorun.operator.api import VERSION as V1ALPHA1

    bad = {
        "apiVersion": f"{NANORUN}/{V1ALPHA1}",
        "kind": "LLMRun",
        "metadata": {"name": "bad"},
        "spec": {"storage": {"uri": "s3://b/r"}, "model": {"depth": "twenty"}},
    }
    with pytest.raises(ApiException) as err:
        jobs.create_namespaced_custom_object(NANORUN, V1ALPHA1, kube_namespace, LLMRUNS, bad)
    assert err.value.status == 422
    status = json.loads(err.value.body)
    assert status["reason"] == "Invalid"
    assert "spec.model.depth in body must be of type integer" in status["message"]


def test_status_subresource_separates_spec_and_status(jobs, kube_namespace):
    ns = kube_namespace
    jobs.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pytorchjob("split"))
    conditions = [{"type": "Running", "status": "True", "reason": "PyTorchJobRunning"}]

    # Writing through the main resource drops status changes...
    jobs.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "split", {"status": {"conditions": conditions}}
    )
    assert "status" not in jobs.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "split")
    # ...and writing through /status drops spec changes.
    jobs.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "split",
        {
            "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 3}}},
            "status": {"conditions": conditions},
        },
    )
    job = jobs.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "split")
    assert job["status"]["conditions"][0]["type"] == "Running"
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1


def test_finalizer_holds_deletion_until_removed(jobs, kube_namespace):
    ns = kube_namespace
    body = pytorchjob("held")
    body["metadata"]["finalizers"] = ["nanorun.io/cleanup"]
    jobs.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

    jobs.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "held")
    job = jobs.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "held")
    assert job["metadata"]["deletionTimestamp"]

    jobs.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "held", {"metadata": {"finalizers": None}}
    )
    with pytest.raises(ApiException) as err:
        jobs.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "held")
    assert err.value.status == 404


def test_watch_delivers_each_change_with_its_resource_version(core, kube_namespace):
    ns = kube_namespace
    start = core.list_namespaced_config_map(ns).metadata.resource_version
    core.create_namespaced_config_map(ns, {"metadata": {"name": "w"}, "data": {"step": "1"}})
    core.patch_namespaced_config_map(
        "w", ns, {"data": {"step": "2"}}, _content_type="application/merge-patch+json"
    )
    core.delete_namespaced_config_map("w", ns)

    seen = []
    stream = watch.Watch()
    for event in stream.stream(
        core.list_namespaced_config_map, ns, resource_version=start, timeout_seconds=10
    ):
        if event["object"].metadata.name == "w":
            seen.append((event["type"], int(event["object"].metadata.resource_version)))
        if len(seen) == 3:
            stream.stop()
    assert [kind for kind, _ in seen] == ["ADDED", "MODIFIED", "DELETED"]
    versions = [rv for _, rv in seen]
    assert versions == sorted(versions) and len(set(versions)) == 3 and versions[0] > int(start)


def test_stale_update_is_a_conflict(core, kube_namespace):
    ns = kube_namespace
    first = core.create_namespaced_config_map(ns, {"metadata": {"name": "cc"}, "data": {"v": "1"}})
    second = core.read_namespaced_config_map("cc", ns)
    second.data = {"v": "2"}
    core.replace_namespaced_config_map("cc", ns, second)

    first.data = {"v": "stale"}
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_config_map("cc", ns, first)
    assert err.value.status == 409
    assert core.read_namespaced_config_map("cc", ns).data == {"v": "2"}


@pytest.fixture
def bound_service_account(kube, kube_namespace):
    """ServiceAccount `runner` bound (in its namespace) to a ClusterRole that may manage
    PyTorchJobs and read ConfigMaps, and nothing else."""
    ns = kube_namespace
    role = f"pytorchjob-runner-{ns}"
    kube.apply_server_side(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": "runner", "namespace": ns},
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRole",
                    "metadata": {"name": role},
                    "rules": [
                        {
                            "apiGroups": ["kubeflow.org"],
                            "resources": ["pytorchjobs"],
                            "verbs": ["get", "list", "watch", "create"],
                        },
                        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]},
                    ],
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": "runner", "namespace": ns},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                    "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": ns}],
                },
            ]
        )
    )
    yield f"system:serviceaccount:{ns}:runner"
    kube.kubectl("delete", "clusterrole", role, check=False)


@pytest.mark.parametrize(
    ("verb", "resource", "allowed"),
    [
        ("create", "pytorchjobs.kubeflow.org", True),
        ("watch", "pytorchjobs.kubeflow.org", True),
        ("delete", "pytorchjobs.kubeflow.org", False),
        ("list", "configmaps", True),
        ("get", "secrets", False),
        ("create", "rayservices.ray.io", False),
    ],
)
def test_rbac_grants_exactly_the_bound_verbs(
    kube, kube_namespace, bound_service_account, verb, resource, allowed
):
    out = kube.kubectl(
        "auth", "can-i", verb, resource, "-n", kube_namespace, f"--as={bound_service_account}", check=False
    )
    assert out.stdout.strip() == ("yes" if allowed else "no")
    assert out.returncode == (0 if allowed else 1)


def test_rbac_binding_does_not_reach_other_namespaces(kube, bound_service_account):
    out = kube.kubectl(
        "auth", "can-i", "list", "configmaps", "-n", "default", f"--as={bound_service_account}", check=False
    )
    assert (out.stdout.strip(), out.returncode) == ("no", 1)


def test_service_account_token_authenticates_and_rbac_enforces(kube, kube_namespace, bound_service_account):
    # TokenRequest is signed with the service-account signing key; the server then verifies it.
    token = kube.kubectl("create", "token", "runner", "-n", kube_namespace).stdout.strip()
    ctx = ssl.create_default_context(cafile=kube.api_client().configuration.ssl_ca_cert)

    def get(path: str) -> int:
        request = urllib.request.Request(f"{kube.server}{path}", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    assert get(f"/api/v1/namespaces/{kube_namespace}/configmaps") == 200
    assert get(f"/api/v1/namespaces/{kube_namespace}/secrets") == 403
