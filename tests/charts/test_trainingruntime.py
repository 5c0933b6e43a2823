"""The chart's ClusterTrainingRuntime for Kubeflow Trainer v2, rendered with helm (no cluster): off
by default, and when on, the runtime nanorun's TrainJobs name, with the container, rank variables'
policy and metrics port those TrainJobs and the PodMonitor rely on. test_trainjob_kube.py runs it on
a real Trainer v2 controller."""

from __future__ import annotations

from nanorun.operator.api import parse_spec
from nanorun.operator.children import trainjob
from nanorun.operator.reconcile.plan import stage_plan
from nanorun.operator.run_ref import RunRef

from tests.charts.conftest import Render, find, only


def test_no_runtime_unless_asked_for(render: Render) -> None:
    assert find(render(), "ClusterTrainingRuntime") == []


def test_the_runtime_is_the_one_a_default_trainjob_references(render: Render) -> None:
    objects = render(sets=["trainer.runtime.enabled=true", "trainer.runtime.priorityClassName=training"])
    runtime = only(objects, "ClusterTrainingRuntime")
    spec = parse_spec(
        {"storage": {"uri": "s3://b/r"}, "compute": {"launcher": "TrainJob"}, "serving": {"enabled": False}}
    )
    job = trainjob.trainjob_for_stage(RunRef("r", "ns", "u"), spec, stage_plan(spec)[1], attempt=1)
    ref = job["spec"]["runtimeRef"]
    assert (runtime["apiVersion"], runtime["kind"], runtime["metadata"]["name"]) == (
        f"{ref['apiGroup']}/v1alpha1",
        ref["kind"],
        ref["name"],
    )
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}  # the torch plugin: PET_* for torchrun
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == trainjob.REPLICATED_JOB
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert node["template"]["spec"]["backoffLimit"] == 0  # a failed pod ends the attempt; nanorun retries
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["priorityClassName"] == "training"
    assert pod["terminationGracePeriodSeconds"] == spec.compute.termination_grace_period_seconds
    (container,) = pod["containers"]
    assert container["name"] == trainjob.CONTAINER_NAME
    podmonitor_port = "metrics"  # values.yaml podMonitor.trainerPort
    assert container["ports"] == [{"name": podmonitor_port, "containerPort": spec.metrics_port}]
