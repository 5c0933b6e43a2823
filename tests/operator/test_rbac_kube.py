"""The operator works under a ServiceAccount bound to exactly OPERATOR_RBAC_RULES (what the helm
chart grants): a run with a retry, serving, a serving change and a cleanup-on-delete, and not one
request refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from nanorun.operator.api import GROUP, PLURAL, VERSION
from nanorun.operator.rbac import OPERATOR_RBAC_RULES
from nanorun.trainer import storage

from tests.operator.conftest import OperatorProcess, create_llmrun, llmrun, wait_for

pytestmark = pytest.mark.kube


def service_account_kubeconfig(kube, namespace: str, tmp_path) -> str:
    role = f"nanorun-operator-{namespace}"
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nanorun-operator", "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": role},
         "rules": OPERATOR_RBAC_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": role},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
         "subjects": [{"kind": "ServiceAccount", "name": "nanorun-operator", "namespace": namespace}]},
    ]
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))
    token = kube.kubectl("create", "token", "nanorun-operator", "-n", namespace, "--duration=1h").stdout.strip()
    config = yaml.safe_load(Path(kube.kubeconfig).read_text())
    config["users"] = [{"name": "operator", "user": {"token": token}}]
    for ctx in config["contexts"]:
        ctx["context"]["user"] = "operator"
    path = tmp_path / "operator-kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_operator_needs_nothing_beyond_its_rbac_rules(kube, kube_namespace, s3_server, s3_run_dir, custom_api,
                                                          training_operator, tmp_path):
    ns = kube_namespace
    env = {**kube.env, "KUBECONFIG": service_account_kubeconfig(kube, ns, tmp_path)}
    operator = OperatorProcess(ns, env, tmp_path / "operator.log")
    operator.start()
    try:
        training_operator.runner.fail[("tok_train", 1)] = "evicted"
        create_llmrun(custom_api, ns, llmrun("rbac", s3_run_dir, storage={"cleanupOnDelete": True}))
        wait_for("Succeeded", lambda: (custom_api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "rbac")
                                       .get("status") or {}).get("phase") == "Succeeded", operator=operator)
        custom_api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "rbac", {"spec": {"serving": {"maxReplicas": 2}}})
        wait_for("the RayService patched", lambda: "max_replicas: 2" in custom_api.get_namespaced_custom_object(
            "ray.io", "v1", ns, "rayservices", "rbac-chat")["spec"]["serveConfigV2"], operator=operator)
        custom_api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "rbac")
        wait_for("the run deleted", lambda: not custom_api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"],
                 operator=operator)
        assert storage.list_files(s3_run_dir) == []
        log = operator.log()
        assert "403" not in log and "Forbidden" not in log and "forbidden" not in log, log
    finally:
        operator.stop()
