"""How the operator copes with many LLMRuns created at once.

    python bench/operator_scale.py                 # N = 200, then 1000
    python bench/operator_scale.py --runs 50

Starts the test cluster's control plane without the pod network or the training-operator (so no
PyTorchJob runs: only the operator's side is measured), then for each
N: a fresh namespace and a fresh `nanorun operator -n NS` process, N LLMRuns created at once from 16
client threads, and a watch on PyTorchJobs. Per run, latency = when its first PyTorchJob was seen
minus when its create call returned. Prints one JSON line per N: seconds until every run had its
first job, p50/p99 latency, the operator's peak RSS (VmHWM) and the create rate. Nothing runs the
jobs: this measures the operator's side only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after the standard library: the repo has an `operator/` folder

from kubernetes import client, config, watch  # noqa: E402
from nanorun.operator.api import GROUP, PLURAL, VERSION  # noqa: E402

from tests.kube.binaries import crd_files  # noqa: E402
from tests.kube.cluster import Cluster  # noqa: E402
from tests.kube.controllers import install_crds  # noqa: E402
from tests.kube.host import free_port  # noqa: E402

ALL_STAGES = ("tokenizer", "pretrain", "baseEval", "midtrain", "sft", "rl", "eval", "report")


def manifest(name: str, run_dir: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMRun",
        "metadata": {"name": name},
        "spec": {
            "storage": {"uri": run_dir},
            "compute": {"gpusPerNode": 0},
            "stages": {k: {"enabled": k in ("pretrain", "sft")} for k in ALL_STAGES},
            "serving": {"allowUnauthenticated": True},
        },
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_operator(namespace: str, env: dict[str, str], log: Path, verbose: bool) -> subprocess.Popen:
    liveness = free_port()
    argv = [
        sys.executable,
        "-m",
        "nanorun.cli.main",
        "operator",
        "-n",
        namespace,
        "--liveness-port",
        str(liveness),
        "--metrics-port",
        "0",
    ] + (["--verbose"] if verbose else [])
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=1):
                return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"operator not live; see {log}")


def measure(n: int, api_client, env: dict[str, str], workdir: Path, logs: Path, verbose: bool) -> dict:
    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    ns = f"scale-{n}-{int(time.time())}"
    core.create_namespace({"metadata": {"name": ns}})
    operator = start_operator(ns, env, logs / f"operator-{n}.log", verbose)
    created: dict[str, float] = {}
    first_job: dict[str, float] = {}
    done = threading.Event()

    def watch_jobs() -> None:
        deadline = time.monotonic() + 600
        while len(first_job) < n and time.monotonic() < deadline:
            try:  # list, then watch from there; a dropped or expired watch starts over
                listed = custom.list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs")
                for job in listed["items"]:
                    first_job.setdefault(job["metadata"]["labels"]["nanorun.io/run"], time.monotonic())
                w = watch.Watch()
                for event in w.stream(
                    custom.list_namespaced_custom_object,
                    "kubeflow.org",
                    "v1",
                    ns,
                    "pytorchjobs",
                    resource_version=listed["metadata"]["resourceVersion"],
                    timeout_seconds=60,
                ):
                    labels = event["object"].get("metadata", {}).get("labels", {})
                    if "nanorun.io/run" in labels:
                        first_job.setdefault(labels["nanorun.io/run"], time.monotonic())
                    if len(first_job) >= n:
                        w.stop()
            except Exception as err:
                print(f"watch restarted: {err}", file=sys.stderr)
        done.set()

    watcher = threading.Thread(target=watch_jobs, daemon=True)
    watcher.start()
    time.sleep(1.0)  # the watch is open before the first create

    def create(i: int) -> None:
        name = f"run-{i:05d}"
        custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, manifest(name, str(workdir / name))
        )
        created[name] = time.monotonic()

    cpu0 = cpu_seconds(operator.pid)
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, range(n)))
    create_seconds = time.monotonic() - t0
    done.wait(timeout=600)
    latencies = sorted(first_job[r] - created[r] for r in created if r in first_job)
    listed = len(custom.list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs")["items"])
    result = {
        "bench": "operator_scale",
        "runs": n,
        "runs_with_first_job": len(latencies),
        "jobs_at_end": listed,
        "seconds_until_all_have_a_job": round(max(first_job.values()) - t0, 2) if first_job else None,
        "p50_seconds": round(statistics.median(latencies), 3) if latencies else None,
        "p99_seconds": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)
        if latencies
        else None,
        "create_rate_per_second": round(n / create_seconds, 1),
        "operator_peak_rss_mb": round(peak_rss_mb(operator.pid), 1),
        "operator_cpu_seconds": round(cpu_seconds(operator.pid) - cpu0, 1),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "cpus": os.cpu_count(),
    }
    operator.terminate()
    operator.wait(timeout=30)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, action="append", help="N (repeatable); default 200 and 1000")
    parser.add_argument("--logs", type=Path, default=None, help="keep the operator logs in this folder")
    parser.add_argument("--verbose", action="store_true", help="run the operator with debug logging")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nanorun-scale-") as tmp:
        workdir = Path(tmp)
        # The control plane only: no nodes' pod network, no training-operator (nothing runs the jobs).
        plane = Cluster(workdir / "kube", pods=False, controllers=False)
        plane.start()
        try:
            env = plane.env()
            install_crds(crd_files(), env)
            api_client = config.new_client_from_config(config_file=str(plane.kubeconfig_path))
            api_client.configuration.connection_pool_maxsize = 32
            for n in args.runs or [200, 1000]:
                logs = args.logs or workdir
                logs.mkdir(parents=True, exist_ok=True)
                print(json.dumps(measure(n, api_client, env, workdir, logs, args.verbose)), flush=True)
        finally:
            plane.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
