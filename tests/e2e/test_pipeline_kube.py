"""The whole path through Kubernetes, every part real except the kubelet and the Kubeflow training
operator: the test kube-apiserver, the operator as a process (`nanorun operator`), the harness running
each PyTorchJob's container command as local processes with the environment a PyTorchJob injects,
the real stage modules, storage on a moto S3 server, and the chat service started from the
RayService's serveConfigV2 with Ray Serve (`serve run`), chatted with through the `openai` client.

One run of the test-sized LLMRun (tests/e2e/pipeline.py) covers it all: base_train's process is
killed after its first checkpoint, the operator retries the stage, the new attempt resumes from that
checkpoint, and the run reaches Succeeded with every stage's metrics in its status and the report in
storage. Per-stage durations are printed (`pytest -s`) for docs/benchmarks.md.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml
from kubernetes import client
from nanorun.operator.api import GROUP, PLURAL, VERSION
from nanorun.trainer import checkpoint, storage
from nanorun.trainer.progress import read_done

from tests.e2e.pipeline import PRETRAIN_STEPS, SAVE_EVERY, e2e_llmrun
from tests.fixtures.s3 import free_port
from tests.harness.training_operator import ProcessRunner, TrainingOperator
from tests.operator.conftest import OperatorProcess, condition, create_llmrun, get_llmrun, list_jobs, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.kube]

NAME = "e2e"
STAGES = [("tokenizer", "tok_train"), ("pretrain", "base_train"), ("baseEval", "base_eval"),
          ("midtrain", "mid_train"), ("sft", "chat_sft"), ("rl", "chat_rl"), ("eval", "chat_eval"),
          ("report", "report")]
TRAINING = ("pretrain", "midtrain", "sft", "rl")


def make_s3_secret(api_client, namespace: str) -> None:
    data = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    client.CoreV1Api(api_client).create_namespaced_secret(namespace, {
        "metadata": {"name": "s3-creds"}, "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})


def stage_workers(stage: str, run_dir: str) -> list[psutil.Process]:
    """The training processes of a stage (torchrun's workers, not the torchrun launcher)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if f"nanorun.trainer.{stage}" in cmdline and run_dir in cmdline and "torch.distributed.run" not in cmdline:
            found.append(proc)
    return found


def succeeded_or_failed(api, namespace: str):
    def check():
        run = get_llmrun(api, namespace, NAME)
        phase = (run.get("status") or {}).get("phase")
        if phase == "Failed":
            raise AssertionError(f"the run failed: {yaml.safe_dump(run['status'])}")
        return run if phase == "Succeeded" else None
    return check


def ready_run(api, namespace: str):
    run = get_llmrun(api, namespace, NAME)
    return run if condition(run, "Ready").get("status") == "True" else None


class ServeFromRayService:
    """`serve run` of the RayService's serveConfigV2 on a fresh local Ray instance, in its own
    process group (what KubeRay would deploy on the Ray cluster)."""

    def __init__(self, serve_config_v2: str, workdir: Path) -> None:
        self.port = free_port()
        config = yaml.safe_load(serve_config_v2)
        config["http_options"] = {"host": "127.0.0.1", "port": self.port}
        self.config_path = workdir / "serve-config.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "serve.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServeFromRayService:
        serve_cli = Path(sys.executable).parent / "serve"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(serve_cli), "run", str(self.config_path), "--address", "local"],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve run exited {self.proc.returncode}:\n{self.log()}"
            try:
                health = httpx.get(f"{self.url}/healthz", timeout=10).json()
                if health.get("ready"):
                    return health
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise AssertionError(f"the chat service was not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):  # Ray's own processes share the process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def test_an_llmrun_trains_every_stage_through_kubernetes_survives_a_killed_stage_and_chats(
        kube, kube_namespace, s3_server, s3_run_dir, tmp_path):
    ns, api_client = kube_namespace, kube.api_client()
    custom = client.CustomObjectsApi(api_client)
    make_s3_secret(api_client, ns)
    manifest = e2e_llmrun(NAME, s3_run_dir, endpoint=s3_server, credentialsSecret="s3-creds")
    manifest["spec"]["metricsPort"] = free_port()  # not a fixed port another process on this machine may hold
    runner = ProcessRunner(api_client, tmp_path / "jobs", extra_env={"OMP_NUM_THREADS": "1"})
    operator = OperatorProcess(ns, kube.env, tmp_path / "operator.log")
    operator.start()
    started = time.monotonic()
    try:
        with TrainingOperator(api_client, ns, runner) as harness:
            create_llmrun(custom, ns, manifest)

            # Kill base_train's process once it has a committed checkpoint (a node dying, an OOM kill).
            stage_dir = storage.join(s3_run_dir, "base_train")
            wait_for("base_train's first checkpoint", lambda: checkpoint.latest_checkpoint(stage_dir),
                     timeout=300, operator=operator)
            workers = wait_for("base_train's process", lambda: stage_workers("base_train", s3_run_dir),
                               timeout=30, operator=operator)
            assert read_done(s3_run_dir, "base_train") is None, "base_train finished before it could be killed"
            for proc in workers:
                proc.kill()

            run = wait_for("the run to succeed", succeeded_or_failed(custom, ns), timeout=900, operator=operator)
        assert harness.errors == []
        pipeline_seconds = time.monotonic() - started
        status = run["status"]

        # Every stage ran in order and succeeded; pretraining needed a second attempt.
        assert [(s["name"], s["phase"]) for s in status["stages"]] == [(key, "Succeeded") for key, _ in STAGES]
        attempts = {s["name"]: s["attempts"] for s in status["stages"]}
        assert attempts == {key: 2 if key == "pretrain" else 1 for key, _ in STAGES}
        jobs = {j["metadata"]["name"]: j for j in list_jobs(custom, ns)}
        assert condition(jobs["e2e-base-train-1"], "Failed")["status"] == "True"
        assert condition(jobs["e2e-base-train-2"], "Succeeded")["status"] == "True"

        # The second attempt resumed from the first one's checkpoint instead of starting over.
        second = (tmp_path / "jobs" / "e2e-base-train-2-0.log").read_text()
        resumed = re.search(r"resuming from (\S+) \(step (\d+),", second)
        assert resumed, second[-3000:]
        assert resumed.group(1).startswith(f"{stage_dir}/checkpoints/")
        assert int(resumed.group(2)) >= SAVE_EVERY and int(resumed.group(2)) % SAVE_EVERY == 0
        assert "step 000001/" not in second

        # The status shows each stage's metrics, read from the stages' progress and done files in S3.
        by_name = {s["name"]: s for s in status["stages"]}
        for key, _ in STAGES:
            assert by_name[key]["metrics"], key
            assert by_name[key]["durationSeconds"] > 0 and by_name[key]["completionTime"], key
        for key in TRAINING:
            m = by_name[key]["metrics"]
            assert m["step"] == m["totalSteps"] > 0 and m["loss"] is not None, (key, m)
        assert by_name["pretrain"]["metrics"]["totalSteps"] == PRETRAIN_STEPS
        assert by_name["pretrain"]["metrics"]["valBpb"] > 0
        final = read_done(s3_run_dir, "chat_rl").outputs["checkpoint"]
        assert status["checkpoint"] == final

        # The report is in storage.
        report = storage.read_text(storage.join(s3_run_dir, "report", "report.md"))
        assert "base_train" in report and "chat_rl" in report

        # The RayService serves the final checkpoint; deployed from its serveConfigV2, it chats.
        svc = custom.get_namespaced_custom_object("ray.io", "v1", ns, "rayservices", f"{NAME}-chat")
        assert svc["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
        with ServeFromRayService(svc["spec"]["serveConfigV2"], tmp_path) as service:
            health = service.wait_ready()
            assert final in health["checkpoint"]
            chat = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=120)
            reply = chat.chat.completions.create(model="nanorun", max_tokens=16, temperature=0,
                                                 messages=[{"role": "user", "content": "What is 2 plus 3?"}])
            assert isinstance(reply.choices[0].message.content, str)
            assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason in ("stop", "length")

            # Playing KubeRay: the service is up, so the run becomes Ready.
            custom.patch_namespaced_custom_object_status("ray.io", "v1", ns, "rayservices", f"{NAME}-chat", {"status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "",
                                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
            ready = wait_for("Ready", lambda: ready_run(custom, ns), operator=operator)
        assert ready["status"]["serving"]["url"].startswith(f"http://{NAME}-chat-serve-svc.{ns}.svc")

        durations = {s["name"]: round(s["durationSeconds"], 1) for s in status["stages"]}
        print("\ne2e " + json.dumps({"pipeline_seconds": round(pipeline_seconds, 1), "stage_seconds": durations,
                                     "reply": reply.choices[0].message.content}))
        assert custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, NAME)["status"]["phase"] == "Succeeded"
    finally:
        operator.stop()
