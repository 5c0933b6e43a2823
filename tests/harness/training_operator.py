"""Plays the Kubeflow training operator (and the kubelet) against the real test API server.

The test API server has no controllers, so nothing would ever run a PyTorchJob. `TrainingOperator`
watches the PyTorchJobs of one namespace and moves each through the conditions the real training
operator writes (Created → Running → Succeeded | Failed, Suspended while `runPolicy.suspend`),
on the status subresource. What "running" means is pluggable:

- `FakeRunner` (operator tests): writes the stage contract's progress.json and done.json into the
  run's storage (a moto S3 server) over a few steps, and fails the attempts a test asks it to.
- `ProcessRunner` (end-to-end test): runs the job's container command as local processes, one per
  replica, with the environment a PyTorchJob injects (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK,
  PET_*, PYTHONUNBUFFERED, and the container env with secretKeyRef values read from the Secret),
  and takes the outcome from the exit codes.

    with TrainingOperator(api_client, namespace, FakeRunner(fail={("base_train", 1): "OOMKilled"})):
        ...  # create an LLMRun; the operator's jobs run and finish
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nanorun.trainer import storage
from nanorun.trainer.progress import Done, Progress, write_done, write_progress

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_dir_of(job: dict[str, Any]) -> str:
    command = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    return command[command.index("--run-dir") + 1]


def stage_of(job: dict[str, Any]) -> str:
    return job["metadata"]["labels"]["nanorun.io/stage"]


def attempt_of(job: dict[str, Any]) -> int:
    return int(job["metadata"]["labels"]["nanorun.io/attempt"])


@dataclass
class JobControl:
    """What a runner may ask while it runs: is the job suspended now, or being torn down."""

    name: str
    suspended: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)

    def wait_while_suspended(self) -> None:
        while self.suspended.is_set() and not self.stopping.is_set():
            time.sleep(0.05)


class Runner(Protocol):
    def run(self, job: dict[str, Any], control: JobControl) -> tuple[bool, str, str]:
        """Run the job; return (succeeded, reason, message)."""


@dataclass
class FakeRunner:
    """Pretends to train: `steps` steps of `step_seconds`, progress.json each step, done.json at the
    end with a checkpoint output. `fail` maps (stage module, attempt) to the failure reason."""

    steps: int = 3
    step_seconds: float = 0.05
    fail: dict[tuple[str, int], str] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)  # job names, in the order they started

    def run(self, job: dict[str, Any], control: JobControl) -> tuple[bool, str, str]:
        run_dir, stage, attempt = run_dir_of(job), stage_of(job), attempt_of(job)
        self.started.append(job["metadata"]["name"])
        for step in range(1, self.steps + 1):
            control.wait_while_suspended()
            if control.stopping.is_set():
                return False, "PyTorchJobFailed", "stopped"
            time.sleep(self.step_seconds)
            write_progress(run_dir, Progress(stage=stage, step=step, total_steps=self.steps, loss=4.0 / step,
                                             val_bpb=1.5 / step, tokens_per_sec=1000.0 * step, mfu=0.4,
                                             eta_seconds=(self.steps - step) * self.step_seconds))
        if (stage, attempt) in self.fail:
            return False, "PyTorchJobFailed", f"pytorch-master-0 exited: {self.fail[(stage, attempt)]}"
        checkpoint = storage.join(run_dir, stage, "checkpoints", f"step_{self.steps:06d}")
        write_done(run_dir, Done(stage=stage, seconds=self.steps * self.step_seconds,
                                 metrics={"loss": 4.0 / self.steps, "val_bpb": 1.5 / self.steps},
                                 outputs={"checkpoint": checkpoint}))
        return True, "PyTorchJobSucceeded", f"PyTorchJob {job['metadata']['name']} is successfully completed."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ProcessRunner:
    """Runs each replica's container command as a local process, with PyTorchJob's injected env."""

    api_client: Any
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def _secret_value(self, namespace: str, name: str, key: str) -> str:
        from kubernetes import client

        secret = client.CoreV1Api(self.api_client).read_namespaced_secret(name, namespace)
        return base64.b64decode(secret.data[key]).decode()

    def container_env(self, namespace: str, container: dict[str, Any]) -> dict[str, str]:
        env = {}
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = str(var["value"])
            elif "secretKeyRef" in var.get("valueFrom", {}):
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self._secret_value(namespace, ref["name"], ref["key"])
        return env

    def replica_envs(self, job: dict[str, Any]) -> list[dict[str, str]]:
        """The env of each pod, Master first, as the training operator injects it."""
        spec = job["spec"]
        replicas = spec["pytorchReplicaSpecs"]
        nodes = 1 + (replicas.get("Worker", {}).get("replicas", 0) or 0)
        nproc = spec.get("nprocPerNode", "1")
        port = str(_free_port())
        envs = []
        for rank in range(nodes):
            world = nodes * int(nproc) if str(nproc).isdigit() else 1
            envs.append({
                "PYTHONUNBUFFERED": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world), "RANK": str(rank),
                "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port, "PET_NNODES": str(nodes),
                "PET_NODE_RANK": str(rank), "PET_NPROC_PER_NODE": str(nproc),
            })
        return envs

    def command(self, container: dict[str, Any]) -> list[str]:
        cmd = list(container["command"]) + list(container.get("args", []))
        if cmd[0] == "torchrun":  # the venv's torchrun, reading PET_* as a pod's would
            return [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
        if cmd[0] in ("python", "python3"):
            return [sys.executable, *cmd[1:]]
        return cmd

    def run(self, job: dict[str, Any], control: JobControl) -> tuple[bool, str, str]:
        namespace = job["metadata"]["namespace"]
        container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        base_env = {**os.environ, **self.extra_env, **self.container_env(namespace, container)}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        while True:
            control.wait_while_suspended()
            procs = []
            for rank, env in enumerate(self.replica_envs(job)):
                log = open(self.log_dir / f"{job['metadata']['name']}-{rank}.log", "ab")  # noqa: SIM115
                procs.append((subprocess.Popen(self.command(container), env={**base_env, **env}, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True), log))
            while any(p.poll() is None for p, _ in procs):
                if control.suspended.is_set() or control.stopping.is_set():
                    for p, _ in procs:  # preemption: SIGTERM, the stage checkpoints and exits
                        if p.poll() is None:
                            os.killpg(p.pid, signal.SIGTERM)
                    for p, _ in procs:
                        p.wait()
                    break
                time.sleep(0.1)
            for _, log in procs:
                log.close()
            if control.stopping.is_set():
                return False, "PyTorchJobFailed", "stopped"
            if control.suspended.is_set():
                continue  # resumed later: start the pods again
            codes = [p.returncode for p, _ in procs]
            if all(c == 0 for c in codes):
                return True, "PyTorchJobSucceeded", f"PyTorchJob {job['metadata']['name']} is successfully completed."
            bad = next(i for i, c in enumerate(codes) if c != 0)
            role = "master" if bad == 0 else f"worker-{bad - 1}"
            return False, "PyTorchJobFailed", f"pytorch-{role} exited with code {codes[bad]}"


class TrainingOperator:
    """Watches one namespace's PyTorchJobs and runs each one once, in its own thread."""

    def __init__(self, api_client: Any, namespace: str, runner: Runner, poll_seconds: float = 0.1) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.runner = runner
        self.poll_seconds = poll_seconds
        self.controls: dict[str, JobControl] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="training-operator", daemon=True)
        self._workers: list[threading.Thread] = []

    def __enter__(self) -> TrainingOperator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for control in self.controls.values():
            control.stopping.set()
        self._thread.join(timeout=10)
        for worker in self._workers:
            worker.join(timeout=10)

    def _set_conditions(self, name: str, *updates: tuple[str, str, str, str], **extra: Any) -> None:
        job = self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        conditions = list((job.get("status") or {}).get("conditions") or [])
        for type_, status, reason, message in updates:
            conditions = [c for c in conditions if c["type"] != type_]
            conditions.append({"type": type_, "status": status, "reason": reason, "message": message,
                               "lastUpdateTime": _now(), "lastTransitionTime": _now()})
        self.api.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, name, {"status": {"conditions": conditions, **extra}})

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)["items"]
                for job in jobs:
                    self._observe(job)
            except Exception as err:  # the API server went away at the end of a session
                if not self._stop.is_set():
                    self.errors.append(err)
            self._stop.wait(self.poll_seconds)

    def _observe(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        suspended = bool(job["spec"].get("runPolicy", {}).get("suspend"))
        control = self.controls.get(name)
        if control is None:
            if (job.get("status") or {}).get("conditions"):
                return  # handled by an earlier harness
            control = self.controls[name] = JobControl(name)
            if suspended:
                control.suspended.set()
            worker = threading.Thread(target=self._run, args=(job, control), name=f"job-{name}", daemon=True)
            self._workers.append(worker)
            worker.start()
            return
        if suspended and not control.suspended.is_set():
            control.suspended.set()
            self._set_conditions(name, ("Suspended", "True", "PyTorchJobSuspended", f"PyTorchJob {name} is suspended."),
                                 ("Running", "False", "PyTorchJobSuspended", f"PyTorchJob {name} is suspended."))
        elif not suspended and control.suspended.is_set():
            control.suspended.clear()
            self._set_conditions(name, ("Suspended", "False", "PyTorchJobResumed", f"PyTorchJob {name} is resumed."),
                                 ("Running", "True", "PyTorchJobRunning", f"PyTorchJob {name} is running."))

    def _run(self, job: dict[str, Any], control: JobControl) -> None:
        name = job["metadata"]["name"]
        try:
            self._set_conditions(name, ("Created", "True", "PyTorchJobCreated", f"PyTorchJob {name} is created."),
                                 startTime=_now())
            if control.suspended.is_set():
                self._set_conditions(name, ("Suspended", "True", "PyTorchJobSuspended", f"PyTorchJob {name} is suspended."))
            else:
                self._set_conditions(name, ("Running", "True", "PyTorchJobRunning", f"PyTorchJob {name} is running."))
            ok, reason, message = self.runner.run(job, control)
            if control.stopping.is_set():
                return
            final = "Succeeded" if ok else "Failed"
            self._set_conditions(name, ("Running", "False", reason, message), (final, "True", reason, message),
                                 completionTime=_now())
        except Exception as err:
            if not control.stopping.is_set():
                self.errors.append(err)
