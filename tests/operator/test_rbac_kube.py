"""The operator works under a ServiceAccount bound to exactly OPERATOR_RBAC_RULES (what the helm
chart grants): a run with a retry (its jobs run by the training-operator on the fake-stage image),
its NetworkPolicies, serving, a serving change and a cleanup-on-delete, and not one request
refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from nanorun.operator.api import GROUP, PLURAL, VERSION
from nanorun.operator.children.network import NETWORK_POLICY_ENV
from nanorun.operator.rbac import OPERATOR_RBAC_RULES
from nanorun.pipeline import storage

from tests.operator.conftest import OperatorProcess, create_llmrun, llmrun, wait_for

pytestmark = pytest.mark.kube


def service_account_kubeconfig(kube, namespace: str, tmp_path) -> str:
    role = f"nanorun-operator-{namespace}"
    objects = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "nanorun-operator", "namespace": namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": OPERATOR_RBAC_RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": role},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "nanorun-operator", "namespace": namespace}],
        },
    ]
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))
    token = kube.kubectl(
        "create", "token", "nanorun-operator", "-n", namespace, "--duration=1h"
    ).stdout.strip()
    config = yaml.safe_load(Path(kube.kubeconfig).read_text())
    config["users"] = [{"name": "operator", "user": {"token": token}}]
    for ctx in config["contexts"]:
        ctx["context"]["user"] = "operator"
    path = tmp_path / "operator-kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_operator_needs_nothing_beyond_its_rbac_rules(
    kube, kube_namespace, cluster_s3, custom_api, tmp_path
):
    ns = kube_namespace
    run_dir = cluster_s3.run_dir()
    env = {
        **kube.env,
        "KUBECONFIG": service_account_kubeconfig(kube, ns, tmp_path),
        NETWORK_POLICY_ENV: json.dumps({"enabled": True, "kuberayNamespace": "default"}),
    }
    operator = OperatorProcess(ns, env, tmp_path / "operator.log")
    operator.start()
    try:
        # The tokenizer's first attempt fails: the operator reads the failed pod's log.
        create_llmrun(
            custom_api,
            ns,
            llmrun(
                "rbac",
                run_dir,
                storage={**cluster_s3.access, "cleanupOnDelete": True},
                stage_args={"tokenizer": ["--fake-fail-attempts", "1"]},
            ),
        )
        wait_for(
            "Succeeded",
            lambda: (
                (
                    custom_api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "rbac").get("status")
                    or {}
                ).get("phase")
                == "Succeeded"
            ),
            180,
            operator,
        )
        policies = json.loads(kube.kubectl("get", "networkpolicies", "-n", ns, "-o", "json").stdout)["items"]
        assert sorted(p["metadata"]["name"] for p in policies) == ["rbac-chat", "rbac-train"]
        assert all(p["metadata"]["ownerReferences"][0]["name"] == "rbac" for p in policies)
        custom_api.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "rbac", {"spec": {"serving": {"maxReplicas": 2}}}
        )
        wait_for(
            "the RayService patched",
            lambda: (
                "max_replicas: 2"
                in custom_api.get_namespaced_custom_object("ray.io", "v1", ns, "rayservices", "rbac-chat")[
                    "spec"
                ]["serveConfigV2"]
            ),
            operator=operator,
        )
        custom_api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "rbac")
        wait_for(
            "the run deleted",
            lambda: not custom_api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"],
            operator=operator,
        )
        assert storage.list_files(run_dir) == []
        log = operator.log()
        assert "403" not in log and "Forbidden" not in log and "forbidden" not in log, log
    finally:
        operator.stop()
