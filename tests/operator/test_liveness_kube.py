"""A run that never hangs, on the test cluster: a stage whose ranks stop progressing is Stalled and
resumed from its checkpoint, a long compile is not a stall, and the operator rides out restarts of
the API server and etcd. The fake stage (tests/kube/images/fake-stage) beats per rank and waits for
the other rank after each step, as ranks wait in a collective."""

from __future__ import annotations

import re

import pytest
from kubernetes import client
from nanorun.pipeline import liveness, storage
from nanorun.pipeline.progress import read_progress

from tests.fixtures.kube import deploy_faulty_s3
from tests.operator.conftest import condition, create_llmrun, get_llmrun, list_jobs, llmrun, wait_for
from tests.operator.test_operator_kube import TIMEOUT, phase_is

pytestmark = [pytest.mark.kube, pytest.mark.slow]


def pretrain_record(api, ns: str, name: str) -> dict:
    stages = (get_llmrun(api, ns, name).get("status") or {}).get("stages") or []
    return next((s for s in stages if s["name"] == "pretrain"), {})


def test_a_frozen_rank_and_a_rank_stuck_on_storage_are_stalls_resumed_but_a_long_compile_is_not(
    kube, kube_namespace, cluster_s3, custom_api, operator_process
):
    ns, run_dir = kube_namespace, cluster_s3.run_dir("stall")
    # The stage's storage is a proxy in front of the S3 server that never answers one read: rank 0's
    # read of its next input in attempt 2. Its connection stays open, so botocore waits out its 60 s
    # read timeout and tries again; the stall timeout must act first.
    inputs = storage.join(run_dir, "pretrain", "inputs", "rank-00000")
    storage.write_text(inputs, "the next shard")
    held = f"GET /{cluster_s3.bucket}/{inputs.split('/', 3)[3]}"
    proxy = deploy_faulty_s3(kube, ns, holds=[held])
    fake = [
        *("--fake-steps", "10", "--fake-step-seconds", "1"),
        # Attempt 1 compiles longer than the stall timeout; attempt 2's rank 0 reads its input
        # before step 8 (the read the proxy holds) while its heartbeat thread beats on.
        *("--fake-compile-seconds", "20", "--fake-compile-attempts", "1"),
        *("--fake-read-attempts", "2", "--fake-read-rank", "0", "--fake-read-at-step", "8"),
    ]
    manifest = llmrun(
        "stall",
        run_dir,
        enabled=("pretrain",),
        storage={**cluster_s3.access, "endpoint": proxy},
        serving={"enabled": False},
        stage_args={"pretrain": fake},
        compute={"nodes": 2, "terminationGracePeriodSeconds": 2},
        retry={"stallTimeoutSeconds": 12, "heartbeatSeconds": 2},
    )
    create_llmrun(custom_api, ns, manifest)

    def beats(attempt: int) -> list[liveness.Heartbeat]:
        return liveness.read_heartbeats(run_dir, "pretrain", attempt)

    wait_for(
        "both ranks compiling", lambda: {b.phase for b in beats(1)} == {"compiling"} and len(beats(1)) == 2
    )
    wait_for(
        "rank 1 at step 2",
        lambda: any(b.rank == 1 and b.step >= 2 for b in beats(1)),
        TIMEOUT,
        operator_process,
    )
    # 20 s of compiling, 12 s of stall timeout: not a stall, still attempt 1.
    record = pretrain_record(custom_api, ns, "stall")
    assert (record["attempts"], record.get("stalls", 0)) == (1, 0), record
    assert not condition(get_llmrun(custom_api, ns, "stall"), "Stalled")

    # SIGSTOP rank 1 (the Worker's process): its beats stop, rank 0 waits for it after its next step.
    worker = kube.get(ns, "pod", "stall-pretrain-1-worker-0")
    kube.cluster.kubelet(worker["spec"]["nodeName"]).signal_container(
        worker["status"]["containerStatuses"][0]["containerID"], "SIGSTOP"
    )
    wait_for(
        "the first stall",
        lambda: pretrain_record(custom_api, ns, "stall").get("stalls") == 1,
        90,
        operator_process,
    )
    record = pretrain_record(custom_api, ns, "stall")
    assert record["stalledAttempt"] == 1 and record["attempts"] >= 2
    assert "rank 1 (stuck)" in record["lastStall"] and "pod stall-pretrain-1-worker-0" in record["lastStall"]
    stalled = condition(get_llmrun(custom_api, ns, "stall"), "Stalled")
    assert "stage pretrain stalled at step" in stalled["message"] and "rank 1 (stuck)" in stalled["message"]
    events = client.CoreV1Api(kube.api_client()).list_namespaced_event(
        ns, field_selector="reason=StageStalled"
    )
    assert any("rank 1 (stuck)" in e.message for e in events.items)
    # Attempt 2 resumed from the checkpoint attempt 1 left, not from the start.
    resumed = wait_for(
        "attempt 2 stepping",
        lambda: (p := read_progress(run_dir, "pretrain")) is not None and p.attempt == 2 and p,
        TIMEOUT,
        operator_process,
    )
    assert resumed.extra["resumed_from"] >= 2

    run = wait_for("Succeeded", phase_is(custom_api, ns, "stall", "Succeeded"), TIMEOUT, operator_process)
    record = next(s for s in run["status"]["stages"] if s["name"] == "pretrain")
    assert (record["attempts"], record["stalls"], record["failures"], record["preemptions"]) == (3, 2, 0, 0)
    # The second stall: rank 0 alive (it kept beating) but stuck in the held read before step 8, at a
    # step past the first.
    assert f"holding {held}" in kube.kubectl("logs", "deployment/s3-faulty", "-n", ns).stdout
    assert record["stalledAttempt"] == 2 and record["stalledStep"] == 8
    beat_ago = re.search(r"rank 0 \(stuck\): last heartbeat \S+ \((\d+) s ago\)", record["lastStall"])
    assert beat_ago and int(beat_ago.group(1)) < 12, record["lastStall"]
    assert read_progress(run_dir, "pretrain").extra["resumed_from"] >= 7
    assert condition(run, "Stalled")["status"] == "False"
    metrics = operator_process.metrics()
    assert 'llmrun_attempts_ended_total{outcome="stalled",stage="pretrain"} 2.0' in metrics


# The namespaces of the cluster's controllers (tests/kube/controllers.py); KubeRay's runs in `default`.
CONTROLLER_NAMESPACES = ("kubeflow", "kubeflow-system", "jobset-system", "kueue-system")


def controller_restarts(kube) -> dict[str, int]:
    """Each controller container's restart count, by pod/container."""
    pods = client.CoreV1Api(kube.api_client()).list_pod_for_all_namespaces().items
    return {
        f"{pod.metadata.name}/{status.name}": status.restart_count
        for pod in pods
        if pod.metadata.namespace in CONTROLLER_NAMESPACES
        or pod.metadata.name.startswith("kuberay-operator-")
        for status in pod.status.container_statuses or []
    }


def test_the_operator_rides_out_api_server_and_etcd_restarts_with_one_job_per_attempt(
    kube, kube_namespace, cluster_s3, custom_api, operator_process
):
    # The cluster's controllers run without leader election: the restarts do not restart them.
    restarts_before = controller_restarts(kube)
    ns, run_dir = kube_namespace, cluster_s3.run_dir("restarts")
    slow = ["--fake-steps", "30", "--fake-step-seconds", "0.5"]
    manifest = llmrun(
        "restarts",
        run_dir,
        enabled=("tokenizer", "pretrain"),
        storage=cluster_s3.access,
        serving={"enabled": False},
        stage_args={"tokenizer": slow, "pretrain": slow},
    )
    create_llmrun(custom_api, ns, manifest)
    progress = lambda stage: lambda: read_progress(run_dir, stage)  # noqa: E731
    wait_for("the tokenizer stepping", progress("tokenizer"), TIMEOUT, operator_process)
    kube.cluster.restart("kube-apiserver")
    wait_for("pretraining stepping", progress("pretrain"), TIMEOUT, operator_process)
    kube.cluster.restart("etcd")
    kube.cluster.restart("kube-apiserver")

    run = wait_for("Succeeded", phase_is(custom_api, ns, "restarts", "Succeeded"), TIMEOUT, operator_process)
    assert sorted(j["metadata"]["name"] for j in list_jobs(custom_api, ns)) == [
        "restarts-pretrain-1",
        "restarts-tokenizer-1",
    ]
    assert [
        (s["name"], s["attempts"], s.get("failures", 0), s.get("preemptions", 0))
        for s in run["status"]["stages"]
    ] == [
        ("tokenizer", 1, 0, 0),
        ("pretrain", 1, 0, 0),
    ]
    assert operator_process.proc.poll() is None, operator_process.log()
    assert controller_restarts(kube) == restarts_before


def test_a_lost_node_evicts_the_stage_which_resumes_on_the_node_left_as_a_preemption(
    kube, kube_namespace, cluster_s3, custom_api, operator_process
):
    # The GPU node: the cluster's controllers and the S3 server do not tolerate its taint, so they
    # run on the other node and outlive this one.
    lost = kube.cluster.gpu_node
    ns, run_dir = kube_namespace, cluster_s3.run_dir("lost")
    on_lost = {"key": "kubernetes.io/hostname", "operator": "In", "values": [lost]}
    manifest = llmrun(
        "lost",
        run_dir,
        enabled=("pretrain",),
        storage=cluster_s3.access,
        serving={"enabled": False},
        stage_args={"pretrain": ["--fake-steps", "30", "--fake-step-seconds", "0.5"]},
        compute={
            "nodeLostTolerationSeconds": 5,
            "terminationGracePeriodSeconds": 2,
            # The first attempt goes to the node that is lost; the next one can only go elsewhere.
            "affinity": {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "preference": {"matchExpressions": [on_lost]}}
                    ]
                }
            },
        },
        # The default stall timeout (600 s): the node's loss must end the attempt as a preemption.
        retry={"heartbeatSeconds": 2},
    )
    create_llmrun(custom_api, ns, manifest)
    wait_for(
        "pretraining at step 2",
        lambda: (p := read_progress(run_dir, "pretrain")) is not None and p.step >= 2,
        TIMEOUT,
        operator_process,
    )
    assert kube.get(ns, "pod", "lost-pretrain-1-master-0")["spec"]["nodeName"] == lost
    kube.cluster.stop_node(lost)
    try:
        run = wait_for("Succeeded", phase_is(custom_api, ns, "lost", "Succeeded"), 300, operator_process)
        record = next(s for s in run["status"]["stages"] if s["name"] == "pretrain")
        assert (record["attempts"], record["preemptions"], record["failures"], record.get("stalls", 0)) == (
            2,
            1,
            0,
            0,
        )
        assert kube.get(ns, "pod", "lost-pretrain-2-master-0")["spec"]["nodeName"] != lost
        assert read_progress(run_dir, "pretrain").extra["resumed_from"] >= 2
        events = client.CoreV1Api(kube.api_client()).list_namespaced_event(
            ns, field_selector="reason=StagePreempted"
        )
        assert any("DeletionByTaintManager" in e.message for e in events.items), [
            e.message for e in events.items
        ]
    finally:
        kube.cluster.start_node(lost)
