"""The end-to-end path once more with Kubeflow Trainer v2, which the session cluster runs with JobSet
beside the training-operator (tests/fixtures/kube.py): the chart's operator
pod, `compute.launcher: auto` choosing TrainJob, Trainer v2 rendering each stage's TrainJob with
the chart's ClusterTrainingRuntime into a JobSet whose pods' torchrun agents meet through the PET_*
environment its torch plugin injects, storage on an S3 server pod, and Trainer's status server
receiving each attempt's progress. Serving is the PyTorchJob run's. Shorter than test_pipeline_kube.py (the PyTorchJob run): tokenizer,
pretraining and SFT, each distributed stage on two pods, in a namespace where the API server
enforces Pod Security Admission's `restricted` profile.

1. `helm install` of the chart; the operator runs as its Deployment's pod.
2. Pretraining's rank-0 pod is deleted after the first checkpoint: the trainer checkpoints on
   SIGTERM, the TrainJob fails, and the operator starts attempt 2 (a new TrainJob) from that
   checkpoint without counting a failure. Both attempts report their progress to Trainer's status
   server, which writes it into each TrainJob's `status.trainerStatus`.

Run: .venv/bin/pytest tests/e2e/test_pipeline_trainjob_kube.py -s   (needs root for the pod network)
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from nanorun.pipeline import storage
from nanorun.pipeline.progress import read_done
from nanorun.trainer.data.dataset import resolve_shards
from nanorun.trainer.training import checkpoint

from tests.e2e.pipeline import (
    SAVE_EVERY,
    delete_pod_reading_its_log,
    e2e_llmrun,
    llmrun_reader,
    record,
)
from tests.fixtures.kube import deploy_s3, wait_until
from tests.kube.cluster import REPO

pytestmark = [pytest.mark.slow, pytest.mark.kube]

NAME = "e2t"
BUCKET = "nanorun"
RUN_DIR = f"s3://{BUCKET}/runs/{NAME}"
DATA = f"s3://{BUCKET}/data/bundled"
STAGES = ("tokenizer", "pretrain", "sft")
CHART = REPO / "charts" / "nanorun"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def test_an_llmrun_on_trainjobs_pretrains_on_two_nodes_survives_preemption_and_reports_to_trainer(
    kube_pods, restricted_namespace, monkeypatch
):
    ns, kube, times = restricted_namespace, kube_pods, {}
    t0 = time.monotonic()

    def mark(what: str) -> None:
        times[what] = round(time.monotonic() - t0, 1)

    def get(kind: str, name: str) -> dict:
        out = kube.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def items(kind: str, selector: str = "") -> list[dict]:
        args = ["get", kind, "-n", ns, "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(kube.kubectl(*args).stdout)["items"]

    def logs(pod: str) -> str:
        return kube.kubectl("logs", pod, "-n", ns, "-c", "node", check=False).stdout

    run = llmrun_reader(kube, ns, NAME)

    def phase() -> str:
        status = run().get("status") or {}
        assert status.get("phase") != "Failed", status
        return status.get("phase", "")

    endpoint = deploy_s3(kube, ns, BUCKET)
    ip = kube.service_ip(ns, "s3")
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{ip}:9000",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    for shard in resolve_shards("bundled"):
        storage.upload_from(shard, storage.join(DATA, Path(shard).name))

    # 1. The operator, as the chart's pod (the cluster has the chart's runtime already).
    sets = [f"operator.watchNamespaces={{{ns}}}", f"operator.storage.endpoint={endpoint}"]
    sets.append("operator.storage.credentialsSecret=s3-creds")
    # This machine chats from outside the pods; the policies' enforcement is
    # tests/kube/test_controllers.py's.
    sets.append("operator.networkPolicy.enabled=false")
    kube.helm(
        "install",
        "nanorun-tj",
        str(CHART),
        "-n",
        ns,
        *[a for v in sets for a in ("--set", v)],
        "--wait",
        "--timeout",
        "180s",
    )
    mark("operator_ready")

    manifest = e2e_llmrun(NAME, RUN_DIR, nodes=2, endpoint=endpoint, credentialsSecret="s3-creds")
    manifest["spec"]["data"]["pretrain"] = DATA
    for key in manifest["spec"]["stages"]:
        manifest["spec"]["stages"][key]["enabled"] = key in STAGES
    # Serving a run is the PyTorchJob run's (test_pipeline_kube.py): the launcher changes nothing there.
    manifest["spec"]["serving"] = {"enabled": False}
    kube.apply(ns, manifest)

    # 2. Preemption: delete pretraining's rank-0 pod once a checkpoint is committed.
    stage_dir = storage.join(RUN_DIR, "pretrain")
    wait_until(lambda: checkpoint.latest_checkpoint(stage_dir), bool, timeout=600, interval=0.5)
    mark("first_checkpoint")
    assert read_done(RUN_DIR, "pretrain") is None, "pretraining finished before it could be preempted"
    (rank0,) = [
        p
        for p in items("pods", "nanorun.io/stage=pretrain,nanorun.io/attempt=1")
        if p["metadata"]["labels"].get(COMPLETION_INDEX) == "0"
    ]
    rank0 = rank0["metadata"]["name"]
    preempted_log = delete_pod_reading_its_log(kube, ns, rank0, "node")
    mark("preempted")
    assert "SIGTERM: will checkpoint" in preempted_log, preempted_log[-3000:]
    assert re.search(r"SIGTERM checkpoint saved in ([0-9.]+) s", preempted_log), preempted_log[-3000:]

    wait_until(phase, lambda p: p == "Succeeded", timeout=900, interval=1)
    mark("pipeline_succeeded")
    status = run()["status"]
    assert status["launcher"] == "TrainJob"
    records = {s["name"]: s for s in status["stages"]}
    assert {k: (r["phase"], r["attempts"]) for k, r in records.items()} == {
        k: ("Succeeded", 2 if k == "pretrain" else 1) for k in STAGES
    }
    assert (records["pretrain"].get("failures", 0), records["pretrain"]["preemptions"]) == (0, 1)
    # One TrainJob per stage attempt and no PyTorchJob, though the training-operator runs too.
    jobs: dict[str, list[dict]] = {}
    for j in items("trainjobs"):
        jobs.setdefault(j["metadata"]["labels"]["nanorun.io/stage"], []).append(j)
    assert sorted((s, len(js)) for s, js in jobs.items()) == [
        ("pretrain", 2),
        ("sft", 1),
        ("tokenizer", 1),
    ]
    assert items("pytorchjobs") == []
    first, second = sorted(jobs["pretrain"], key=lambda j: j["metadata"]["labels"]["nanorun.io/attempt"])
    assert (
        condition(first, "Failed")["status"] == "True" and condition(second, "Complete")["status"] == "True"
    )

    # Attempt 2 resumed from the preemption's checkpoint on two ranks that met through Trainer's PET_*.
    (resumed_pod,) = [
        p
        for p in items("pods", "nanorun.io/stage=pretrain,nanorun.io/attempt=2")
        if p["metadata"]["labels"].get(COMPLETION_INDEX) == "0"
    ]
    resumed_log = logs(resumed_pod["metadata"]["name"])
    resumed = re.search(r"resuming from (\S+) \(step (\d+),", resumed_log)
    assert resumed, resumed_log[-3000:]
    assert resumed.group(1).startswith(f"{stage_dir}/checkpoints/") and int(resumed.group(2)) >= SAVE_EVERY
    assert "pretrain: rank 0/2" in resumed_log
    env = {e["name"]: e.get("value") for e in resumed_pod["spec"]["containers"][0]["env"]}
    assert env["PET_NNODES"] == "2" and env["NANORUN_ATTEMPT"] == "2"  # Trainer's and ours
    final = read_done(RUN_DIR, "sft").outputs["checkpoint"]
    assert status["checkpoint"] == final

    # Each attempt's rank 0 reported to Trainer's status server (its TrainJobStatus gate is on),
    # which wrote status.trainerStatus: attempt 1 short of the end, attempt 2 finished with the
    # numbers of done.json.
    assert "pretrain: reporting progress to Kubeflow Trainer at https://" in resumed_log
    assert 0 < first["status"]["trainerStatus"]["progressPercentage"] < 100, first["status"]
    reported = second["status"]["trainerStatus"]
    values = {m["name"]: m["value"] for m in reported["metrics"]}
    assert reported["progressPercentage"] == 100 and values["attempt"] == "2", reported
    done = read_done(RUN_DIR, "pretrain").metrics
    assert float(values["val_bpb"]) == pytest.approx(done["val_bpb"], rel=1e-5)
    assert int(values["steps"]) == done["steps"] and float(values["loss"]) > 0

    record("e2e-trainjob", {"seconds": times})
