"""The training-operator harness's process runner: a PyTorchJob's command runs as local processes
with the environment the Kubeflow training operator injects, and the exit codes set the conditions."""

from __future__ import annotations

import base64
import json

import pytest
from kubernetes import client

from tests.harness.training_operator import ProcessRunner, TrainingOperator
from tests.operator.conftest import condition, wait_for

pytestmark = pytest.mark.kube

REPORT = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1] + os.environ['RANK'], 'w')); sys.exit(int(sys.argv[2]))"


def pytorchjob(name: str, out: str, exit_code: int) -> dict:
    container = {"name": "pytorch", "image": "unused", "command": ["python", "-c", REPORT, out, str(exit_code)],
                 "env": [{"name": "NANORUN_RUN", "value": "r"},
                         {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "secret"}}}]}
    template = {"spec": {"containers": [container], "restartPolicy": "Never"}}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "labels": {"nanorun.io/run": "r", "nanorun.io/stage": "s", "nanorun.io/attempt": "1"}},
            "spec": {"nprocPerNode": "2", "pytorchReplicaSpecs": {
                "Master": {"replicas": 1, "template": template}, "Worker": {"replicas": 1, "template": template}}}}


def test_process_runner_injects_pytorchjob_env_and_reports_exit_codes(kube, kube_namespace, custom_api, tmp_path):
    ns = kube_namespace
    api_client = kube.api_client()
    client.CoreV1Api(api_client).create_namespaced_secret(ns, {"metadata": {"name": "creds"},
                                                               "data": {"secret": base64.b64encode(b"s3cr3t").decode()}})
    runner = ProcessRunner(api_client, tmp_path / "logs")
    with TrainingOperator(api_client, ns, runner) as harness:
        for name, code in (("good", 0), ("bad", 3)):
            custom_api.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs",
                                                       pytorchjob(name, str(tmp_path / f"{name}-env-"), code))

        def finished(name):
            job = custom_api.get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", name)
            return job if condition(job, "Succeeded") or condition(job, "Failed") else None
        good = wait_for("good to finish", lambda: finished("good"))
        bad = wait_for("bad to finish", lambda: finished("bad"))
    assert harness.errors == []
    assert condition(good, "Succeeded")["status"] == "True" and condition(good, "Created")["status"] == "True"
    failed = condition(bad, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "PyTorchJobFailed"
    assert failed["message"] == "pytorch-master exited with code 3"
    envs = [json.loads((tmp_path / f"good-env-{rank}").read_text()) for rank in (0, 1)]
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["PET_NODE_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == "4" and env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "2"
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] and env["MASTER_PORT"] == env["PET_MASTER_PORT"]
        assert env["PYTHONUNBUFFERED"] == "1" and env["NANORUN_RUN"] == "r"
        assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
