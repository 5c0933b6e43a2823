"""An LLMSweep on the test cluster, with the operator as a real process and the real controllers:
the Kubeflow training-operator runs the points' PyTorchJobs on the cluster's nodes (the fake-stage
image keeps the stage contract on an S3 server in the test's namespace). The points run at once, a
point whose pod is deleted mid-stage resumes as a new attempt while the others go on, suspending
the sweep stops its points' pods and resuming finishes them, and deleting the sweep takes its
children with it. The API server refuses the bad sweeps `nanorun run` refuses,
with the same message. Nothing here sets a controller's status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from nanorun.operator.api import GROUP, PLURAL, VERSION, SpecError
from nanorun.operator.sweep.api import KIND, parse_sweep_spec
from nanorun.operator.sweep.api import PLURAL as SWEEPS
from nanorun.pipeline import storage

from tests.operator.conftest import get_llmrun, list_jobs, llmrun, wait_for
from tests.sweep.test_sweep_spec import REFUSED

pytestmark = pytest.mark.kube
TIMEOUT = 240
REPO = Path(__file__).resolve().parents[2]
POINTS = ["ladder-d2-f1e9", "ladder-d3-f1e9", "ladder-d2-f2e9", "ladder-d3-f2e9"]


def sweep_manifest(run_dir: str, access: dict) -> dict:
    template = llmrun("template", run_dir, enabled=("pretrain",), storage=access, serving={"enabled": False})[
        "spec"
    ]
    # Slow enough that the points overlap and a pod can be deleted mid-stage.
    template["stages"]["pretrain"] = {"extraArgs": ["--fake-steps", "40", "--fake-step-seconds", "0.25"]}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": "ladder"},
        "spec": {"template": template, "depths": [2, 3], "flopBudgets": [1e9, 2e9]},
    }


def get_sweep(api, ns: str) -> dict:
    return api.get_namespaced_custom_object(GROUP, VERSION, ns, SWEEPS, "ladder")


def children(api, ns: str) -> list[str]:
    runs = api.list_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, label_selector="nanorun.io/sweep=ladder"
    )
    return sorted(r["metadata"]["name"] for r in runs["items"])


def running_pretrain_pods(kube, ns: str) -> dict[str, str]:
    """point → its running pretrain pod."""
    out = kube.kubectl("get", "pods", "-n", ns, "-l", "training.kubeflow.org/job-name", "-o", "json").stdout
    pods = {}
    for pod in json.loads(out)["items"]:
        labels = pod["metadata"]["labels"]
        pretrain = labels.get("nanorun.io/stage") == "pretrain"
        if pretrain and labels.get("nanorun.io/run") in POINTS and pod["status"].get("phase") == "Running":
            pods[labels["nanorun.io/run"]] = pod["metadata"]["name"]
    return pods


def test_points_run_at_once_a_killed_point_resumes_and_deleting_the_sweep_collects_them(
    kube, kube_namespace, cluster_s3, custom_api, operator_process
):
    ns = kube_namespace
    custom_api.create_namespaced_custom_object(
        GROUP, VERSION, ns, SWEEPS, sweep_manifest(cluster_s3.run_dir("ladder"), cluster_s3.access)
    )
    # The tokenizer run first, then every point at once: their pretraining pods run side by side.
    running = wait_for(
        "two points pretraining at the same time",
        lambda: (lambda pods: pods if len(pods) >= 2 else None)(running_pretrain_pods(kube, ns)),
        TIMEOUT,
        operator_process,
    )
    assert children(custom_api, ns) == sorted(["ladder-tokenizer", *POINTS])
    sweep = get_sweep(custom_api, ns)["status"]
    assert sweep["total"] == 4 and sweep["running"] >= 2

    # Delete one point's pod mid-stage (what an eviction does): that point gets a new attempt. Mid-stage
    # is once the stage has said it started (its SIGTERM handler is in place by then); a pod deleted
    # while Python still imports leaves no trace of why it stopped once it is gone.
    killed, pod = sorted(running.items())[0]
    wait_for(
        "the stage started in the pod",
        lambda: "fake stage pretrain: attempt 1" in kube.kubectl("logs", "-n", ns, pod, check=False).stdout,
        TIMEOUT,
        operator_process,
    )
    kube.kubectl("delete", "pod", "-n", ns, pod, "--wait=false")

    def all_done():
        s = (get_sweep(custom_api, ns).get("status")) or {}
        return s if s.get("done") == 4 else None

    status = wait_for("every point Succeeded", all_done, TIMEOUT, operator_process)
    pretrain = {
        p: next(s for s in get_llmrun(custom_api, ns, p)["status"]["stages"] if s["name"] == "pretrain")
        for p in POINTS
    }
    assert pretrain[killed]["attempts"] == 2 and pretrain[killed]["preemptions"] == 1
    assert all(pretrain[p]["attempts"] == 1 for p in POINTS if p != killed)
    assert {p["name"] for p in status["points"]} == set(POINTS)
    assert all(p["phase"] == "Succeeded" for p in status["points"])
    best = min(status["points"], key=lambda p: p["valBpb"])["name"]
    assert status["best"] == best
    header, row = kube.kubectl("get", "llmsweep", "ladder", "-n", ns).stdout.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "PHASE", "DONE", "RUNNING", "TOTAL", "BEST"]
    assert row.split()[2:6] == ["4", "0", "4", best]
    # The dashboard's sweep selector: each point's series carry the sweep, the sweep lists them.
    text = operator_process.metrics()
    for point in POINTS:
        assert f'phase="Succeeded",run="{point}",stage="baseEval",sweep="ladder"}} 1.0' in text, point
        assert (
            f'llmsweep_point_info{{namespace="{ns}",phase="Succeeded",run="{point}",sweep="ladder"}} 1.0'
            in text
        )
    # Every point ended: the report job (owned by the sweep) is created.
    report = wait_for(
        "the report job",
        lambda: [
            j
            for j in list_jobs(custom_api, ns)
            if j["metadata"]["labels"].get("nanorun.io/sweep") == "ladder"
        ],
        TIMEOUT,
        operator_process,
    )
    assert report[0]["metadata"]["ownerReferences"][0]["kind"] == KIND
    # The report job (the fake stage's one-process job) succeeds, and with it the sweep.
    final = wait_for(
        "the sweep Succeeded with its report",
        lambda: (s := get_sweep(custom_api, ns).get("status") or {}).get("phase") == "Succeeded" and s,
        TIMEOUT,
        operator_process,
    )
    assert final["report"].endswith("/report/report.md") and final["reportAttempts"] == 1
    assert (
        kube.kubectl("get", "llmsweep", "ladder", "-n", ns).stdout.splitlines()[1].split()[1] == "Succeeded"
    )

    custom_api.delete_namespaced_custom_object(GROUP, VERSION, ns, SWEEPS, "ladder")
    wait_for(
        "the points, their jobs and the report job collected",
        lambda: not children(custom_api, ns) and not list_jobs(custom_api, ns),
        TIMEOUT,
        operator_process,
    )


def test_suspending_a_sweep_stops_its_points_pods_and_resuming_finishes_them(
    kube, kube_namespace, cluster_s3, custom_api, operator_process
):
    ns = kube_namespace
    manifest = sweep_manifest(cluster_s3.run_dir("ladder"), cluster_s3.access)
    manifest["spec"]["flopBudgets"] = [1e9]  # two points
    points = ["ladder-d2-f1e9", "ladder-d3-f1e9"]
    progress = {
        p: storage.join(cluster_s3.run_dir("ladder"), p.split("-", 1)[1], "pretrain", "progress.json")
        for p in points
    }
    custom_api.create_namespaced_custom_object(GROUP, VERSION, ns, SWEEPS, manifest)
    wait_for(
        "both points past their third step",
        lambda: all(storage.exists(f) and storage.read_json(f)["step"] >= 3 for f in progress.values()),
        TIMEOUT,
        operator_process,
    )
    custom_api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, SWEEPS, "ladder", {"spec": {"suspend": True}}
    )
    wait_for(
        "the sweep and both points Suspended, their pods gone",
        lambda: (
            get_sweep(custom_api, ns).get("status", {}).get("phase") == "Suspended"
            and all(
                get_llmrun(custom_api, ns, p).get("status", {}).get("phase") == "Suspended" for p in points
            )
            and not running_pretrain_pods(kube, ns)
        ),
        TIMEOUT,
        operator_process,
    )
    saved = {}
    for point in points:
        run = get_llmrun(custom_api, ns, point)
        assert run["spec"]["suspend"] is True
        assert run["metadata"]["annotations"]["nanorun.io/suspended-by-sweep"] == "true"
        saved[point] = storage.read_json(progress[point])
        assert saved[point]["stopped"] == "preempted" and 3 <= saved[point]["step"] < 40
    assert (
        kube.kubectl("get", "llmsweep", "ladder", "-n", ns).stdout.splitlines()[1].split()[1] == "Suspended"
    )

    custom_api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, SWEEPS, "ladder", {"spec": {"suspend": False}}
    )
    final = wait_for(
        "the sweep Succeeded",
        lambda: (s := get_sweep(custom_api, ns).get("status") or {}).get("phase") == "Succeeded" and s,
        TIMEOUT,
        operator_process,
    )
    assert final["done"] == 2
    for point in points:
        run = get_llmrun(custom_api, ns, point)
        assert run["spec"]["suspend"] is False
        assert "nanorun.io/suspended-by-sweep" not in (run["metadata"].get("annotations") or {})
        # Resumed at once, the training-operator may count the SIGTERM'd pod against the suspended
        # job's backoff limit; then the next attempt resumes instead: a preemption, never a failure.
        pretrain = next(s for s in run["status"]["stages"] if s["name"] == "pretrain")
        assert pretrain.get("failures", 0) == 0 and pretrain["attempts"] in (1, 2), pretrain
        log = kube.kubectl("logs", f"{pretrain['job']}-master-0", "-n", ns, "-c", "pytorch").stdout
        assert f"step {saved[point]['step'] + 1}/40" in log and "step 1/40" not in log, log
    events = kube.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=ladder").stdout
    assert "SweepSuspended" in events and "SweepResumed" in events


@pytest.mark.parametrize("data, field, message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_the_api_server_refuses_a_bad_sweep_with_the_message_nanorun_run_gives(
    kube, tmp_path, data, field, message
):
    path = tmp_path / "bad.yaml"
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "bad"}, "spec": data}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as refused:
        parse_sweep_spec(data)
    [local] = str(refused.value).splitlines()
    server = kube.kubectl("create", "--dry-run=server", "-n", "default", "-f", str(path), check=False)
    assert server.returncode != 0, server.stdout
    assert field in server.stderr and local.removeprefix(f"{field}: ") in server.stderr, server.stderr


def test_the_api_server_accepts_the_example_sweeps(kube):
    for example in ("sweep-tiny.yaml", "sweep-d10-d20.yaml"):
        kube.accepts("default", REPO / "examples" / example)
