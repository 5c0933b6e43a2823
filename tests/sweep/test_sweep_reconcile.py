"""The sweep's pure reconcile: the tokenizer run first, then every point at once, the points' numbers
and counts in the status, the report job when every point has ended, retries of the report, and
nothing created for a spec the operator cannot act on."""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

import kopf
from nanorun.operator.names import LABEL_RUN, LABEL_SWEEP, SUSPENDED_BY_SWEEP
from nanorun.operator.run_ref import RunRef
from nanorun.operator.sweep.handlers import llmruns_by_sweep
from nanorun.operator.sweep.reconcile import reconcile_sweep, suspension_patch
from nanorun.pipeline.progress import Done

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SWEEP = RunRef("scaling", "team", "uid-1")
SPEC: dict[str, Any] = {
    "template": {
        "storage": {"uri": "s3://b/scaling"},
        "compute": {"gpusPerNode": 8},
        "retry": {"maxAttempts": 2},
    },
    "depths": [10, 12, 14],
    "flopBudgets": [1e18],
}
POINTS = ["scaling-d10-f1e18", "scaling-d12-f1e18", "scaling-d14-f1e18"]
BPB = {"d10-f1e18": 0.95, "d12-f1e18": 0.91, "d14-f1e18": 0.93}


def body(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "scaling", "generation": 1}, "spec": spec or SPEC, "status": status or {}}


def run(name: str, phase: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": phase}}


def job(attempt: int, phase: str | None) -> dict[str, Any]:
    conditions = [{"type": phase, "status": "True"}] if phase else []
    return {
        "metadata": {"name": f"scaling-report-{attempt}", "labels": {"nanorun.io/attempt": str(attempt)}},
        "status": {"conditions": conditions},
    }


class Files:
    """Points' done.json files; counts the reads."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, str]] = []

    def __call__(self, run_dir: str, stage: str) -> Done | None:
        self.reads.append((run_dir, stage))
        folder = run_dir.rsplit("/", 1)[1]
        bpb = BPB[folder]
        if stage == "pretrain":
            metrics = {
                "scaling_params": 100_000_000,
                "tokens": 1_600_000_000,
                "flops": 1e18,
                "val_bpb": bpb + 0.01,
            }
            return Done(stage=stage, seconds=3000.0, metrics=metrics)
        return Done(stage=stage, seconds=600.0, metrics={"val_bpb": bpb, "core": 0.2})


def decide(b: dict[str, Any], runs: list[dict[str, Any]] = (), jobs: list[dict[str, Any]] = (), files=None):
    return reconcile_sweep(SWEEP, b, list(runs), list(jobs), files or Files(), NOW)


def test_a_new_sweep_trains_its_tokenizer_first():
    d = decide(body())
    [tok] = d.create_runs
    assert tok["metadata"]["name"] == "scaling-tokenizer"
    assert tok["metadata"]["labels"][LABEL_SWEEP] == "scaling"
    owner = tok["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("LLMSweep", "scaling", "uid-1")
    assert tok["spec"]["stages"]["pretrain"]["enabled"] is False
    assert d.status["phase"] == "Running" and d.status["total"] == 3 and d.status["done"] == 0


def test_once_the_tokenizer_has_succeeded_every_point_is_created_at_once():
    d = decide(body(), [run("scaling-tokenizer", "Succeeded")])
    assert [r["metadata"]["name"] for r in d.create_runs] == POINTS
    spec = d.create_runs[1]["spec"]
    assert spec["model"]["depth"] == 12 and spec["stages"]["pretrain"]["targetFlops"] == 1e18
    assert spec["tokenizer"]["from"] == "s3://b/scaling/tokenizer"
    assert spec["storage"]["uri"] == "s3://b/scaling/d12-f1e18"
    assert [p.name for p in d.manifest] == POINTS and d.manifest[0].gpus == 8


def test_a_tokenizer_from_another_run_starts_the_points_at_once():
    spec = copy.deepcopy(SPEC)
    spec["template"]["tokenizer"] = {"from": "s3://b/runs/speedrun"}
    d = decide(body(spec))
    assert [r["metadata"]["name"] for r in d.create_runs] == POINTS
    assert d.create_runs[0]["spec"]["tokenizer"]["from"] == "s3://b/runs/speedrun"


def test_points_are_counted_and_the_best_finished_one_named():
    runs = [
        run("scaling-tokenizer", "Succeeded"),
        run(POINTS[0], "Succeeded"),
        run(POINTS[1], "Succeeded"),
        run(POINTS[2], "Running"),
    ]
    d = decide(body(), runs)
    assert d.create_runs == [] and d.create_jobs == []  # existing and finished points are never redone
    s = d.status
    assert (s["done"], s["running"], s["total"]) == (2, 1, 3)
    assert s["best"] == POINTS[1] and s["bestBpb"] == 0.91  # base eval's bpb, the lowest so far
    first = s["points"][0]
    assert (first["params"], first["tokens"], first["flops"], first["core"], first["seconds"]) == (
        100_000_000,
        1_600_000_000,
        1e18,
        0.2,
        3600.0,
    )
    assert s["points"][2]["phase"] == "Running" and "valBpb" not in s["points"][2]


def test_a_finished_points_numbers_are_read_once():
    runs = [
        run("scaling-tokenizer", "Succeeded"),
        *(run(p, "Succeeded") for p in POINTS[:2]),
        run(POINTS[2], "Running"),
    ]
    first = decide(body(), runs)
    files = Files()
    again = decide(body(status=first.status), runs, files=files)
    assert files.reads == [] and again.status["points"] == first.status["points"]


def test_when_every_point_has_ended_the_report_job_runs_then_the_sweep_succeeds():
    runs = [run("scaling-tokenizer", "Succeeded"), *(run(p, "Succeeded") for p in POINTS)]
    d = decide(body(), runs)
    [report] = d.create_jobs
    command = report["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert command[:4] == ["python", "-m", "nanorun.trainer.sweep_report", "--run-dir"]
    assert command[4] == "s3://b/scaling"
    assert report["metadata"]["ownerReferences"][0]["kind"] == "LLMSweep"
    assert (
        LABEL_RUN not in report["metadata"]["labels"]
        and report["metadata"]["labels"][LABEL_SWEEP] == "scaling"
    )
    assert d.status["phase"] == "Running"
    done = decide(body(status=d.status), runs, [job(1, "Succeeded")])
    assert done.status["phase"] == "Succeeded" and done.create_jobs == []
    assert done.status["report"] == "s3://b/scaling/report/report.md"
    assert any(e.reason == "SweepSucceeded" for e in done.events)


def test_a_failed_report_is_retried_up_to_max_attempts_then_the_sweep_fails():
    runs = [run("scaling-tokenizer", "Succeeded"), *(run(p, "Succeeded") for p in POINTS)]
    retry = decide(body(), runs, [job(1, "Failed")])
    assert [j["metadata"]["name"] for j in retry.create_jobs] == ["scaling-report-2"]
    final = decide(body(status=retry.status), runs, [job(1, "Failed"), job(2, "Failed")])
    assert final.create_jobs == [] and final.status["phase"] == "Failed"


def test_a_failed_point_still_gets_a_report_but_fails_the_sweep():
    runs = [
        run("scaling-tokenizer", "Succeeded"),
        run(POINTS[0], "Failed"),
        *(run(p, "Succeeded") for p in POINTS[1:]),
    ]
    d = decide(body(), runs, [job(1, "Succeeded")])
    assert d.status["phase"] == "Failed" and d.status["report"]
    assert POINTS[0] in next(c for c in d.status["conditions"] if c["type"] == "Degraded")["message"]


def test_a_failed_tokenizer_fails_the_sweep_and_starts_no_point():
    d = decide(body(), [run("scaling-tokenizer", "Failed")])
    assert d.create_runs == [] and d.status["phase"] == "Failed"


def test_an_invalid_spec_creates_nothing_and_says_why():
    spec = copy.deepcopy(SPEC)
    spec["tokensPerParam"] = 20
    d = decide(body(spec))
    assert d.create_runs == [] and d.create_jobs == []
    [degraded] = [c for c in d.status["conditions"] if c["type"] == "Degraded"]
    assert degraded["reason"] == "InvalidSpec" and "spec.tokensPerParam" in degraded["message"]


def test_the_report_runs_as_the_kind_of_job_the_points_ran_as():
    points = [
        {**run(p, "Succeeded"), "status": {"phase": "Succeeded", "launcher": "TrainJob"}} for p in POINTS
    ]
    runs = [run("scaling-tokenizer", "Succeeded"), *points]
    [report] = decide(body(), runs).create_jobs
    assert report["kind"] == "TrainJob"
    assert report["metadata"]["ownerReferences"][0]["kind"] == "LLMSweep"
    assert f'"{LABEL_RUN}":' not in json.dumps(report)  # no LLMRun follows it: no such label anywhere
    assert report["metadata"]["labels"][LABEL_SWEEP] == "scaling"
    assert "nanorun.trainer.sweep_report" in json.dumps(report)
    complete = {**report, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert decide(body(), runs, [complete]).status["phase"] == "Succeeded"

    spec = copy.deepcopy(SPEC)
    spec["template"]["compute"]["launcher"] = "PyTorchJob"  # the template's choice wins
    [report] = decide(body(spec), runs).create_jobs
    assert report["kind"] == "PyTorchJob"


def suspended(spec: dict[str, Any] = SPEC, on: bool = True) -> dict[str, Any]:
    return {**copy.deepcopy(spec), "suspend": on}


def child(name: str, phase: str, suspend: bool = False, ours: bool = False) -> dict[str, Any]:
    r = run(name, phase)
    r["spec"] = {"suspend": suspend}
    if ours:
        r["metadata"]["annotations"] = {SUSPENDED_BY_SWEEP: "true"}
    return r


def test_suspending_a_sweep_suspends_its_unfinished_runs_and_marks_them():
    runs = [
        child("scaling-tokenizer", "Succeeded"),
        child(POINTS[0], "Succeeded"),
        child(POINTS[1], "Running"),
        child(POINTS[2], "Queued"),
    ]
    d = decide(body(suspended(), {"phase": "Running"}), runs)
    patch = {"metadata": {"annotations": {SUSPENDED_BY_SWEEP: "true"}}, "spec": {"suspend": True}}
    assert d.patch_runs == [(POINTS[1], patch), (POINTS[2], patch)]  # finished runs are left alone
    assert d.status["phase"] == "Suspended" and d.status["running"] == 2  # until their runs say so
    assert "2 of 3 points unfinished" in {c["type"]: c for c in d.status["conditions"]}["Ready"]["message"]
    assert [e.reason for e in d.events] == ["SweepSuspended"]
    # Once suspended, nothing more to patch, no event again, and the suspended points are not running.
    runs = [
        runs[0],
        runs[1],
        child(POINTS[1], "Suspended", True, True),
        child(POINTS[2], "Suspended", True, True),
    ]
    again = decide(body(suspended(), d.status), runs)
    assert again.patch_runs == [] and again.events == [] and again.status["running"] == 0


def test_a_suspended_sweep_creates_its_children_suspended_and_holds_back_the_report():
    d = decide(body(suspended()))
    [tok] = d.create_runs
    assert tok["spec"]["suspend"] is True and tok["metadata"]["annotations"] == {SUSPENDED_BY_SWEEP: "true"}
    d = decide(body(suspended()), [child("scaling-tokenizer", "Succeeded")])
    assert [r["spec"]["suspend"] for r in d.create_runs] == [True] * 3
    ended = [child("scaling-tokenizer", "Succeeded")] + [child(p, "Succeeded") for p in POINTS]
    d = decide(body(suspended()), ended)
    assert d.create_jobs == [] and d.status["phase"] == "Suspended"
    d = decide(body(suspended(on=False), d.status), ended)
    assert [j["metadata"]["name"] for j in d.create_jobs] == ["scaling-report-1"]
    assert [e.reason for e in d.events] == ["SweepResumed"]


def test_resuming_a_sweep_resumes_only_the_runs_it_suspended():
    runs = [
        child("scaling-tokenizer", "Succeeded"),
        child(POINTS[0], "Suspended", suspend=True, ours=True),
        child(POINTS[1], "Suspended", suspend=True),  # a user suspended this point on its own
        child(POINTS[2], "Running"),
    ]
    d = decide(body(suspended(on=False), {"phase": "Suspended"}), runs)
    assert d.patch_runs == [
        (POINTS[0], {"metadata": {"annotations": {SUSPENDED_BY_SWEEP: None}}, "spec": {"suspend": False}})
    ]
    assert d.status["phase"] == "Running"
    assert [e.reason for e in d.events] == ["SweepResumed"]


def test_the_index_of_child_runs_keeps_what_suspending_and_resuming_read():
    """The operator's index of a sweep's runs (operator/sweep/handlers.py) holds a slim copy of each run: it
    must keep spec.suspend and the sweep's annotation, or a resumed sweep would never resume them."""
    body = kopf.Body(
        {
            "metadata": {
                "name": POINTS[0],
                "labels": {LABEL_SWEEP: "scaling"},
                "annotations": {SUSPENDED_BY_SWEEP: "true", "kopf.zalando.org/last-handled": "{...}"},
            },
            "spec": {"suspend": True, "model": {"depth": 10}},
            "status": {"phase": "Suspended"},
        }
    )
    [(key, indexed)] = llmruns_by_sweep(namespace="team", labels=body.metadata.labels, body=body).items()
    assert key == ("team", "scaling")
    assert indexed["spec"] == {"suspend": True}
    assert indexed["metadata"]["annotations"] == {SUSPENDED_BY_SWEEP: "true"}
    assert suspension_patch(indexed, False) == {
        "metadata": {"annotations": {SUSPENDED_BY_SWEEP: None}},
        "spec": {"suspend": False},
    }
