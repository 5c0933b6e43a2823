"""Fixtures for operator tests against the real test API server: the operator as a real process
(`nanorun operator`, so a test can kill it), the training-operator harness, and small functions to
create LLMRuns and wait for their status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from nanorun.operator.api import GROUP, PLURAL, VERSION

from tests.fixtures.s3 import free_port
from tests.harness.training_operator import FakeRunner, TrainingOperator


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
        env = {**self.kube_env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
               "NANORUN_ERROR_BACKOFF_SECONDS": "0.5", "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanorun.operator.cli", "operator", "-n", self.namespace,
             "--liveness-port", str(self.liveness_port), "--metrics-port", str(self.metrics_port),
             "--resync-seconds", "0.5"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
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


@pytest.fixture
def operator_process(kube, kube_namespace, s3_server, tmp_path) -> Iterator[OperatorProcess]:
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


@pytest.fixture
def fake_runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def training_operator(kube, kube_namespace, fake_runner) -> Iterator[TrainingOperator]:
    with TrainingOperator(kube.api_client(), kube_namespace, fake_runner) as harness:
        yield harness
    assert harness.errors == []


def llmrun(name: str, run_dir: str, enabled: tuple[str, ...] = ("tokenizer", "pretrain"), **spec: Any) -> dict[str, Any]:
    """A small LLMRun manifest with only the `enabled` stages on and quick retries."""
    keys = ("tokenizer", "pretrain", "baseEval", "midtrain", "sft", "rl", "eval", "report")
    body = {
        "image": "nanorun-trainer:test",
        "storage": {"uri": run_dir},
        "model": {"depth": 2, "maxSeqLen": 64},
        "tokenizer": {"vocabSize": 512, "maxChars": 10000},
        "compute": {"gpusPerNode": 0},
        "stages": {k: {"enabled": k in enabled} for k in keys},
        "serving": {"gpusPerReplica": 0},
        "retry": {"maxAttempts": 2, "backoffSeconds": 0},
    }
    for key, value in spec.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMRun", "metadata": {"name": name}, "spec": body}


def create_llmrun(api, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)


def get_llmrun(api, namespace: str, name: str) -> dict[str, Any]:
    return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, operator: OperatorProcess | None = None) -> Any:
    """Poll `check` until it returns something truthy; fail with the operator's log otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    log = operator.log() if operator else ""
    raise AssertionError(f"timed out waiting for {what}; last: {yaml.safe_dump(last)[:3000]}\noperator log:\n{log}")


def list_jobs(api, namespace: str) -> list[dict[str, Any]]:
    return api.list_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs")["items"]


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})
