"""The stage plan and the pure manifest builders (PyTorchJob, RayService): no cluster needed."""

from __future__ import annotations

import re

import yaml
from nanorun.operator.api import parse_spec
from nanorun.operator.children.pytorchjob import job_name, pytorchjob_for_stage
from nanorun.operator.children.rayservice import rayservice_for_run, served_checkpoints, service_url
from nanorun.operator.children.trainjob import trainjob_for_stage
from nanorun.operator.reconcile.plan import stage_plan
from nanorun.operator.run_ref import RunRef
from nanorun.serving import SERVE_API_KEYS_DIR, SERVE_IMPORT_PATH

RUN = RunRef(name="speedrun", namespace="team-a", uid="1234-uid")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
KEYS = {"apiKeysSecret": "chat-keys"}  # serving needs its API keys (or the explicit opt-out)


def spec_of(**overrides):
    serving = {**KEYS, **overrides.pop("serving", {})}
    return parse_spec(
        {
            "storage": {
                "uri": "s3://bucket/runs/speedrun",
                "credentialsSecret": "s3-creds",
                "endpoint": "http://minio:9000",
            },
            "serving": serving,
            **overrides,
        }
    )


def planned(spec, key):
    return next(s for s in stage_plan(spec) if s.key == key)


def test_plan_lists_enabled_stages_in_pipeline_order_with_their_modules():
    spec = spec_of(stages={"rl": {"enabled": False}})
    plan = stage_plan(spec)
    assert [(s.key, s.module) for s in plan] == [
        ("tokenizer", "tok_train"),
        ("pretrain", "base_train"),
        ("baseEval", "base_eval"),
        ("midtrain", "mid_train"),
        ("sft", "chat_sft"),
        ("eval", "chat_eval"),
        ("report", "report"),
    ]
    assert [s.key for s in plan if not s.distributed] == ["tokenizer", "report"]


def test_plan_maps_spec_fields_to_nanochat_flags():
    spec = spec_of(
        data={"pretrain": "s3://bucket/shards"},
        model={"depth": 12, "maxSeqLen": 512, "windowPattern": "SL"},
        tokenizer={"vocabSize": 4096, "maxChars": 1000, "docCap": 50},
        stages={
            "pretrain": {
                "numIterations": 30,
                "deviceBatchSize": 4,
                "targetParamDataRatio": 8,
                "extraArgs": ["--warmup-steps", "2"],
            },
            "sft": {"numIterations": 5},
        },
    )
    assert planned(spec, "tokenizer").args == [
        "--data",
        "s3://bucket/shards",
        "--vocab-size",
        "4096",
        "--max-chars",
        "1000",
        "--doc-cap",
        "50",
    ]
    args = planned(spec, "pretrain").args
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags == {
        "--data": "s3://bucket/shards",
        "--depth": "12",
        "--max-seq-len": "512",
        "--window-pattern": "SL",
        "--device-batch-size": "4",
        "--num-iterations": "30",
        "--target-param-data-ratio": "8.0",
        "--warmup-steps": "2",
    }
    assert args[-2:] == ["--warmup-steps", "2"]  # extraArgs last, so they win
    assert planned(spec, "sft").args == ["--num-iterations", "5"]
    assert planned(spec, "report").args == []


def test_job_names_are_deterministic_dns_labels_even_for_long_runs():
    assert job_name("speedrun", "pretrain", 2) == "speedrun-pretrain-2"
    assert job_name("speedrun", "baseEval", 1) == "speedrun-base-eval-1"  # the key in kebab case
    long = "a" * 200
    name = job_name(long, "eval", 10)
    assert len(name) <= 63 and DNS_1035.match(name) and name.endswith("-eval-10")
    assert name == job_name(long, "eval", 10) != job_name("a" * 199 + "b", "eval", 10)


def test_pytorchjob_has_master_workers_gpus_and_the_stage_command():
    spec = spec_of(
        compute={
            "nodes": 3,
            "gpusPerNode": 8,
            "cpu": "32",
            "memory": "256Gi",
            "shmSize": "16Gi",
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "affinity": {"nodeAffinity": {}},
            "priorityClassName": "training",
            "resources": {"limits": {"rdma/ib": 1}},
        }
    )
    job = pytorchjob_for_stage(RUN, spec, planned(spec, "pretrain"), attempt=1)
    meta, body = job["metadata"], job["spec"]
    assert (job["apiVersion"], job["kind"], meta["name"]) == (
        "kubeflow.org/v1",
        "PyTorchJob",
        "speedrun-pretrain-1",
    )
    assert meta["labels"]["nanorun.io/run"] == "speedrun" and meta["labels"]["nanorun.io/stage"] == "pretrain"
    assert meta["labels"]["nanorun.io/attempt"] == "1"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "nanorun.io/v1alpha1",
            "kind": "LLMRun",
            "name": "speedrun",
            "uid": "1234-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    replicas = body["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert body["nprocPerNode"] == "8"
    pod = replicas["Worker"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["name"] == "pytorch"
    assert c["command"][:3] == ["torchrun", "-m", "nanorun.trainer.base_train"]
    assert c["command"][-4:] == ["--run-dir", "s3://bucket/runs/speedrun", "--metrics-port", "9400"]
    assert {"name": "metrics", "containerPort": 9400} in c["ports"]
    assert c["resources"]["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": 8, "rdma/ib": 1}
    assert c["resources"]["requests"] == {"cpu": "32", "memory": "256Gi"}
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert (
        env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000" and env["NANORUN_RUN"]["value"] == "speedrun"
    )
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "training"
    assert pod["tolerations"][0] == {"key": "gpu", "operator": "Exists"} and pod["affinity"] == {
        "nodeAffinity": {}
    }
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert body["runPolicy"] == {
        "backoffLimit": 0,
        "cleanPodPolicy": "Running",
        "ttlSecondsAfterFinished": 86400,
        "suspend": False,
    }


def test_single_process_stages_run_python_on_one_pod_without_gpus():
    spec = spec_of(compute={"nodes": 4, "gpusPerNode": 8})
    job = pytorchjob_for_stage(RUN, spec, planned(spec, "tokenizer"), attempt=3)
    assert job["metadata"]["name"] == "speedrun-tokenizer-3"
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"} and job["spec"]["nprocPerNode"] == "1"
    c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert c["command"][:3] == ["python", "-m", "nanorun.trainer.tok_train"]
    assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})


def test_kueue_queue_labels_the_job_and_starts_it_suspended():
    spec = spec_of(compute={"queue": "gpu-queue"})
    job = pytorchjob_for_stage(RUN, spec, planned(spec, "pretrain"), attempt=1)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["runPolicy"]["suspend"] is True
    assert (
        "kueue.x-k8s.io/queue-name"
        not in pytorchjob_for_stage(RUN, spec_of(), planned(spec_of(), "pretrain"), 1)["metadata"]["labels"]
    )


def test_no_credentials_secret_means_no_secret_env():
    spec = parse_spec({"storage": {"uri": "s3://b/r"}, "serving": KEYS})
    c = pytorchjob_for_stage(RUN, spec, planned(spec, "pretrain"), 1)["spec"]["pytorchReplicaSpecs"][
        "Master"
    ]["template"]["spec"]["containers"][0]
    assert [e["name"] for e in c["env"]] == [
        "NANORUN_RUN",
        "NANORUN_STAGE",
        "NANORUN_ATTEMPT",
        "NANORUN_CONFIG_ID",
        "NANORUN_HEARTBEAT_SECONDS",
        "NANORUN_COLLECTIVE_TIMEOUT_SECONDS",
        "NANORUN_STALL_TIMEOUT_SECONDS",
    ]
    env = {e["name"]: e["value"] for e in c["env"]}
    # No stallTimeoutSeconds: ranks dump their stacks within the shortest stall the operator calls.
    assert (env["NANORUN_STALL_TIMEOUT_SECONDS"], env["NANORUN_COLLECTIVE_TIMEOUT_SECONDS"]) == (
        "600",
        "1800",
    )


def test_rayservice_serves_the_checkpoint_through_user_config():
    spec = spec_of(
        serving={
            "minReplicas": 2,
            "maxReplicas": 6,
            "gpusPerReplica": 1,
            "targetOngoingRequests": 8,
            "memoryPerReplica": "32Gi",
            "headMemory": "8Gi",
            "nodeSelector": {"pool": "serve"},
        },
        compute={"nodeSelector": {"gpu": "h100"}, "memory": "900Gi", "cpu": "96"},
    )
    ckpt = "s3://bucket/runs/speedrun/sft/checkpoints/step_000700"
    svc = rayservice_for_run(RUN, spec, ckpt)
    assert (svc["apiVersion"], svc["kind"], svc["metadata"]["name"]) == (
        "ray.io/v1",
        "RayService",
        "speedrun-chat",
    )
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "1234-uid"
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == SERVE_IMPORT_PATH
    assert app["args"] == {
        "checkpoint": ckpt,
        "api_keys_file": SERVE_API_KEYS_DIR,
        "max_request_bytes": 1048576,
        "rate_limit_per_minute": 120,
    }
    (dep,) = app["deployments"]
    assert dep["user_config"] == {"checkpoint": ckpt}
    assert dep["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 8.0}
    assert dep["ray_actor_options"]["num_gpus"] == 1.0
    (group,) = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 6)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Serving's own resources and placement; nothing of spec.compute (training's) leaks in.
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"] == {
        "cpu": "1",
        "memory": "32Gi",
        "nvidia.com/gpu": 1,
    }
    assert (
        worker["containers"][0]["image"] == "ghcr.io/nanorun/nanorun-serving:0.1.0"
    )  # the Ray image by default
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert head["rayStartParams"]["num-cpus"] == "0"  # replicas run on the workers
    assert worker["nodeSelector"] == head["template"]["spec"]["nodeSelector"] == {"pool": "serve"}
    assert served_checkpoints(svc) == (ckpt, ckpt)
    assert service_url("speedrun", "team-a") == "http://speedrun-chat-serve-svc.team-a.svc:8000"


def test_the_api_keys_secret_is_mounted_read_only_where_the_replicas_run():
    spec = spec_of(serving={"apiKeysSecret": "chat-keys", "maxRequestBytes": 4096, "rateLimitPerMinute": 30})
    svc = rayservice_for_run(RUN, spec, "s3://b/c")
    cluster = svc["spec"]["rayClusterConfig"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    (volume,) = worker["volumes"]
    assert volume["secret"] == {"secretName": "chat-keys"}
    (container,) = worker["containers"]
    (mount,) = container["volumeMounts"]
    assert mount == {"name": volume["name"], "mountPath": SERVE_API_KEYS_DIR, "readOnly": True}
    assert "subPath" not in mount  # a subPath mount would never see the Secret change
    assert "chat-keys" not in str(container["env"])  # a volume, never environment variables
    head = cluster["headGroupSpec"]["template"]["spec"]  # runs no replica, reads no key
    assert "volumes" not in head and "volumeMounts" not in head["containers"][0]
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["api_keys_file"] == SERVE_API_KEYS_DIR and "allow_unauthenticated" not in app["args"]
    assert (app["args"]["max_request_bytes"], app["args"]["rate_limit_per_minute"]) == (4096, 30)


def test_unauthenticated_serving_mounts_nothing_and_says_so():
    spec = spec_of(serving={"apiKeysSecret": "", "allowUnauthenticated": True})
    svc = rayservice_for_run(RUN, spec, "s3://b/c")
    worker = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "volumes" not in worker and "volumeMounts" not in worker["containers"][0]
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["allow_unauthenticated"] is True and "api_keys_file" not in app["args"]


def test_a_new_checkpoint_changes_only_user_config():
    spec = spec_of()
    first = rayservice_for_run(RUN, spec, "s3://b/sft/step_1")
    rolled = rayservice_for_run(RUN, spec, "s3://b/rl/step_9", args_checkpoint="s3://b/sft/step_1")
    a = yaml.safe_load(first["spec"]["serveConfigV2"])
    b = yaml.safe_load(rolled["spec"]["serveConfigV2"])
    b_dep = b["applications"][0]["deployments"][0]
    assert b_dep.pop("user_config") == {"checkpoint": "s3://b/rl/step_9"}
    a["applications"][0]["deployments"][0].pop("user_config")
    assert a == b
    assert first["spec"]["rayClusterConfig"] == rolled["spec"]["rayClusterConfig"]


def test_cpu_serving_requests_no_gpus():
    spec = spec_of(serving={"gpusPerReplica": 0})
    svc = rayservice_for_run(RUN, spec, "s3://b/c")
    worker = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    assert (
        "num_gpus"
        not in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["deployments"][0][
            "ray_actor_options"
        ]
    )


def test_training_pods_get_the_grace_period_the_spec_asks_and_know_their_attempt_and_config():
    spec = parse_spec(
        {"storage": {"uri": "s3://b/r"}, "compute": {"terminationGracePeriodSeconds": 300}, "serving": KEYS}
    )
    job = pytorchjob_for_stage(RUN, spec, planned(spec, "pretrain"), 3, config_id="0123456789abcdef")
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["NANORUN_ATTEMPT"] == "3" and env["NANORUN_CONFIG_ID"] == "0123456789abcdef"
    assert job["metadata"]["labels"]["nanorun.io/config"] == "0123456789abcdef"
    default = pytorchjob_for_stage(
        RUN, parse_spec({"storage": {"uri": "s3://b/r"}, "serving": KEYS}), planned(spec, "pretrain"), 1
    )
    assert (
        default["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["terminationGracePeriodSeconds"]
        == 120
    )


def test_a_replica_of_a_fraction_of_a_cpu_gets_a_pod_of_that_fraction():
    run = RunRef(name="chat", namespace="ns", uid="u")
    for cpus, quantity in ((0.5, "500m"), (2, "2"), (0, "100m")):
        svc = rayservice_for_run(
            run, spec_of(serving={"cpusPerReplica": cpus, "gpusPerReplica": 0}), "s3://b/c"
        )
        (group,) = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == quantity
        (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
        assert app["deployments"][0]["ray_actor_options"]["num_cpus"] == cpus


def test_extra_args_cannot_move_a_stages_run_dir_or_metrics_port():
    """An abbreviation passes the admission rule (argparse would take `--run-d` for `--run-dir`), but
    the operator's flags come last and argparse keeps a flag's last value."""
    from nanorun.trainer.base_train import build_parser

    spec = spec_of(
        stages={"pretrain": {"extraArgs": ["--run-d", "s3://other-team/runs/x", "--metrics-p", "1"]}}
    )
    command = pytorchjob_for_stage(RUN, spec, planned(spec, "pretrain"), attempt=1)["spec"][
        "pytorchReplicaSpecs"
    ]["Master"]["template"]["spec"]["containers"][0]["command"]
    args = build_parser().parse_args(command[command.index("nanorun.trainer.base_train") + 1 :])
    assert (args.run_dir, args.metrics_port) == ("s3://bucket/runs/speedrun", 9400)


def test_every_pod_nanorun_creates_runs_under_the_restricted_pod_security_profile():
    spec = spec_of(compute={"nodes": 2, "gpusPerNode": 8})
    job = pytorchjob_for_stage(RUN, spec, planned(spec, "pretrain"), attempt=1)
    service = rayservice_for_run(RUN, spec, "s3://bucket/runs/speedrun/sft/checkpoints/step_000001")
    cluster = service["spec"]["rayClusterConfig"]
    pods = {
        "master": job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"],
        "worker": job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"],
        "ray-head": cluster["headGroupSpec"]["template"]["spec"],
        "ray-worker": cluster["workerGroupSpecs"][0]["template"]["spec"],
    }
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, name
        if name in ("master", "worker"):  # and the training-operator's init container with them
            assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
                10001,
                10001,
            )
        # Only the Ray head, whose autoscaler sidecar scales the workers, gets an API token.
        assert pod["automountServiceAccountToken"] is (name == "ray-head"), name
    assert cluster["autoscalerOptions"]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def test_the_cleanup_job_deletes_with_the_runs_own_credentials_in_its_namespace():
    from nanorun.operator.children.cleanup import cleanup_job

    spec = spec_of(storage={"uri": "s3://bucket/runs/speedrun", "credentialsSecret": "team-creds"})
    job = cleanup_job(RUN, spec)
    assert (job["metadata"]["namespace"], job["metadata"]["name"]) == ("team-a", "speedrun-cleanup")
    assert job["metadata"]["ownerReferences"][0]["uid"] == "1234-uid"
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == spec.image
    assert c["command"] == ["nanorun", "delete-run", "s3://bucket/runs/speedrun"]
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
    assert secrets == {"team-creds"}  # the run's, not the operator's
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True


def test_stage_pods_leave_a_lost_node_soon_and_beat_as_the_spec_says():
    """A node that stops reporting gets NoExecute taints; the stage's pods tolerate them only
    compute.nodeLostTolerationSeconds (Kubernetes would give 300 s), unless compute.tolerations has
    its own for a key. The pods learn how often to beat and how long a collective may block."""
    spec = parse_spec(
        {
            "storage": {"uri": "s3://b/r"},
            "compute": {
                "nodeLostTolerationSeconds": 20,
                "tolerations": [
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 900}
                ],
            },
            "retry": {"stallTimeoutSeconds": 1200, "heartbeatSeconds": 5},
            "serving": KEYS,
        }
    )
    for job in (
        pytorchjob_for_stage(RUN, spec, planned(spec, "pretrain"), attempt=1),
        trainjob_for_stage(RUN, spec, planned(spec, "pretrain"), attempt=1),
    ):
        patch = job["spec"].get("runtimePatches", [{}])[0].get("trainingRuntimeSpec", {})
        pod = (
            job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
            if job["kind"] == "PyTorchJob"
            else patch["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        )
        assert pod["tolerations"] == [
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 900},
            {
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 20,
            },
        ]
        container = (
            job["spec"]["trainer"]
            if job["kind"] == "TrainJob"
            else job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        )
        env = {e["name"]: e.get("value") for e in container["env"]}
        # The collective outlasts the stall timeout: the operator's stall, with its evidence, comes first.
        assert env["NANORUN_HEARTBEAT_SECONDS"] == "5" and env["NANORUN_COLLECTIVE_TIMEOUT_SECONDS"] == "2400"
