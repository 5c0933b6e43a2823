"""Fixtures for operator tests against the real test cluster: the operator as a real process
(`nanorun operator`, so a test can kill it), an S3 server in the test's namespace, and small
functions to create LLMRuns and wait for their status.

The LLMRuns `llmrun` makes run the fake-stage test image (tests/kube/images/Dockerfile):
the real training-operator runs their PyTorchJobs' pods, which keep the stage contract in seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from nanorun.operator.api import GROUP, PLURAL, VERSION
from nanorun.pipeline.stages import KEYS
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.kube import deploy_s3, poll_pauses
from tests.fixtures.s3 import free_port
from tests.images.containers import image_ref
from tests.kube.cluster import GPU_TOLERATIONS

FAKE_STAGE_IMAGE = image_ref("fake-stage")
# KubeRay really makes the RayCluster of a RayService. Its pods get an image the cluster's registry
# does not hold, so they wait in ImagePullBackOff instead of starting Ray on this small machine; a
# RayService that turns Ready is the end-to-end test's.
ABSENT_SERVING_IMAGE = "ghcr.io/nanorun/nanorun-serving-absent:test"


class OperatorProcess:
    """`nanorun operator -n NS` as a subprocess, with its log kept for failure messages."""

    def __init__(self, namespace: str, kube_env: dict[str, str], log_path: Path) -> None:
        self.namespace = namespace
        self.kube_env = kube_env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.liveness_port = self.metrics_port = 0

    def start(self) -> None:
        self.liveness_port, self.metrics_port = free_port(), free_port()
        env = {
            **self.kube_env,
            **{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
            "NANORUN_ERROR_BACKOFF_SECONDS": "0.5",
            "PYTHONUNBUFFERED": "1",
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nanorun.cli.main",
                "operator",
                "-n",
                self.namespace,
                "--liveness-port",
                str(self.liveness_port),
                "--metrics-port",
                str(self.metrics_port),
                "--resync-seconds",
                "0.5",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"operator not live after 60 s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a node dying under the operator pod."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def reconciles(self) -> float:
        """How many reconciles the operator has finished, of every run and with every result."""
        return sum(
            sample.value
            for family in text_string_to_metric_families(self.metrics())
            for sample in family.samples
            if sample.name == "llmrun_reconciles_total"
        )

    def look_again(self, times: int, check: Callable[[], None] = lambda: None, timeout: float = 60) -> None:
        """Wait until the operator has finished `times` more reconciles than it has now, calling
        `check` (assertions) after each: to show that something does not happen, the test waits
        for the operator to have looked, instead of for some seconds to pass."""
        start = self.reconciles()
        deadline = time.monotonic() + timeout
        seen = start
        while seen < start + times:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{seen - start:.0f} of {times} reconciles in {timeout} s:\n{self.log()}"
                )
            time.sleep(0.1)
            now = self.reconciles()
            if now > seen:
                check()
            seen = now


@dataclass
class ClusterS3:
    """The S3 server `deploy_s3` runs in the test's namespace, with its bucket `nanorun`."""

    endpoint: str  # http://<ClusterIP>:9000: this machine (the operator, the test) and the pods reach it
    bucket: str = "nanorun"

    def run_dir(self, name: str = "test") -> str:
        return f"s3://{self.bucket}/runs/{name}"

    @property
    def access(self) -> dict[str, str]:
        """An LLMRun's spec.storage fields that give its pods this server (the Secret is deploy_s3's)."""
        return {"endpoint": self.endpoint, "credentialsSecret": "s3-creds"}


@pytest.fixture
def cluster_s3(kube_pods, kube_namespace, monkeypatch) -> ClusterS3:
    """S3 in the test's namespace; this process (and the operator it starts) uses it too. The
    Service's ClusterIP rather than its DNS name: this machine reaches Services through the
    cluster's route but does not resolve cluster names."""
    deploy_s3(kube_pods, kube_namespace)
    s3 = ClusterS3(f"http://{kube_pods.service_ip(kube_namespace, 's3')}:9000")
    for key, value in {
        "AWS_ENDPOINT_URL": s3.endpoint,
        "AWS_ENDPOINT_URL_S3": s3.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture
def operator_process(kube, kube_namespace, cluster_s3, tmp_path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(kube_namespace, kube.env, tmp_path / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def custom_api(kube):
    from kubernetes import client

    return client.CustomObjectsApi(kube.api_client())


def llmrun(
    name: str,
    run_dir: str,
    enabled: tuple[str, ...] = ("tokenizer", "pretrain"),
    stage_args: dict[str, list[str]] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A small LLMRun manifest on the fake-stage image with only the `enabled` stages on and quick
    retries; `stage_args` gives stages extraArgs (the fake stage's flags: --fake-steps, ...)."""
    body = {
        "image": FAKE_STAGE_IMAGE,
        "storage": {"uri": run_dir},
        "model": {"depth": 2, "maxSeqLen": 64},
        "tokenizer": {"vocabSize": 512, "maxChars": 10000},
        # Either node: the GPU node's taint is tolerated, as GPU jobs (Kueue's tests) need. PyTorchJob,
        # which `auto` would not choose on a cluster that runs Trainer v2 too.
        "compute": {"gpusPerNode": 0, "tolerations": GPU_TOLERATIONS, "launcher": "PyTorchJob"},
        "stages": {k: {"enabled": k in enabled} for k in KEYS},
        # No API keys: its pods never start here (the image is absent), so nothing is exposed.
        "serving": {"gpusPerReplica": 0, "image": ABSENT_SERVING_IMAGE, "allowUnauthenticated": True},
        "retry": {"maxAttempts": 2, "backoffSeconds": 0},
    }
    for key, args in (stage_args or {}).items():
        body["stages"][key]["extraArgs"] = args
    for key, value in spec.items():
        body[key] = (
            {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
        )
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMRun", "metadata": {"name": name}, "spec": body}


def create_llmrun(api, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)


def get_llmrun(api, namespace: str, name: str) -> dict[str, Any]:
    return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = 60, operator: OperatorProcess | None = None
) -> Any:
    """Poll `check` until it returns something truthy; fail with the operator's log otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    pauses = poll_pauses(0.2)
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(next(pauses))
    log = operator.log() if operator else ""
    raise AssertionError(
        f"timed out waiting for {what}; last: {yaml.safe_dump(last)[:3000]}\noperator log:\n{log}"
    )


def list_jobs(api, namespace: str) -> list[dict[str, Any]]:
    return api.list_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs")["items"]


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})
