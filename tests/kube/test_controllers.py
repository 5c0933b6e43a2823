"""The Kubeflow training-operator and KubeRay run in the test cluster, as pods from their upstream
install manifests (built from their Go modules), and act on what they are given: a PyTorchJob gets
its pods and Services, and its processes rendezvous through the MASTER_ADDR/MASTER_PORT/WORLD_SIZE/
RANK the training-operator injects; a RayService gets its RayCluster, whose pods run the serving
image's `ray start` and serve the chat. Nothing here sets a status.
Run: .venv/bin/pytest tests/kube/test_controllers.py -q   (needs root for the pod network)
"""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from tests.fixtures.kube import api_keys_secret, deploy_s3, upload_dir, wait_until
from tests.images.containers import image_ref
from tests.kube.cluster import GPU_LABELS, GPU_TOLERATIONS, REPO

pytestmark = [pytest.mark.kube, pytest.mark.slow]

# Python with the nanorun package, a few hundred MB: enough for the pods that only print and connect.
PYTHON = image_ref("operator")


def wait_for(what, predicate, timeout: float = 120.0):
    return wait_until(what, predicate, timeout, interval=0.5)


def condition(obj: dict, kind: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


# Each pod logs its environment as one JSON line; then the worker connects to MASTER_ADDR:MASTER_PORT,
# where the master listens, as torchrun's static rendezvous does. (The master waits for it: the
# worker's init container waits until the master's name resolves, which it does only while the
# master runs.)
PRINT_ENV = textwrap.dedent("""
    import json, os, socket, time
    print("env", json.dumps(dict(os.environ)), flush=True)
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ["RANK"] == "0":
        with socket.create_server(("", port)) as server:
            server.accept()[0].close()
    else:
        for _ in range(120):
            try:
                socket.create_connection((addr, port), timeout=5).close()
                break
            except OSError:
                time.sleep(0.5)
    print("met", flush=True)
""")


def test_nanoruns_pytorchjob_gets_the_env_torchrun_needs_on_each_node(kube_pods, kube_namespace):
    """A stage's PyTorchJob as nanorun's operator builds it for two nodes of two GPUs (Master and
    Worker, nprocPerNode 2, the S3 credentials from a Secret), its command swapped for one that
    prints the environment: the training-operator injects what torchrun's static rendezvous reads
    (PET_*) and the MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK of each pod, and the node resolves the
    secretKeyRef values."""
    from nanorun.operator.api import parse_spec
    from nanorun.operator.children.pytorchjob import RENDEZVOUS_PORT, pytorchjob_for_stage
    from nanorun.operator.reconcile.plan import stage_plan
    from nanorun.operator.run_ref import RunRef

    ns = kube_namespace
    kube_pods.apply(
        ns,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-creds"},
            "stringData": {"AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "s3cr3t"},
        },
    )
    spec = parse_spec(
        {
            "image": PYTHON,
            "compute": {"nodes": 2, "gpusPerNode": 2, "tolerations": GPU_TOLERATIONS},
            "serving": {"enabled": False},
            "storage": {
                "uri": "s3://nanorun/runs/env",
                "endpoint": "http://s3:9000",
                "credentialsSecret": "s3-creds",
            },
        }
    )
    pretrain = next(s for s in stage_plan(spec) if s.key == "pretrain")
    job = pytorchjob_for_stage(
        RunRef(name="env", namespace=ns, uid="00000000-0000-0000-0000-000000000003"),
        spec,
        pretrain,
        attempt=1,
    )
    job["metadata"].pop("ownerReferences")  # the owner is not in this test
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        replica["template"]["spec"]["containers"][0]["command"] = ["python", "-c", PRINT_ENV]
    # The job succeeds with its master; the worker, still running then, would be deleted (Running).
    job["spec"]["runPolicy"]["cleanPodPolicy"] = "None"
    name = job["metadata"]["name"]
    kube_pods.apply(ns, job)

    pods = (f"{name}-master-0", f"{name}-worker-0")
    phases = wait_for(
        lambda: [
            kube_pods.kubectl(
                "get", "pod", pod, "-n", ns, "-o", "jsonpath={.status.phase}", check=False
            ).stdout
            for pod in pods
        ],
        lambda p: all(phase in ("Succeeded", "Failed") for phase in p),
        timeout=180,
    )
    logs = [kube_pods.kubectl("logs", pod, "-n", ns, "-c", "pytorch").stdout for pod in pods]
    assert phases == ["Succeeded", "Succeeded"], logs
    done = wait_for(
        lambda: kube_pods.get(ns, "pytorchjob", name),
        lambda j: condition(j, "Succeeded").get("status") == "True",
        timeout=60,
    )
    assert done["status"]["replicaStatuses"]["Worker"].get("succeeded") == 1
    assert all(log.rstrip().endswith("met") for log in logs), logs
    envs = [
        json.loads(next(line for line in log.splitlines() if line.startswith("env "))[4:]) for log in logs
    ]
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["PET_NODE_RANK"] == str(rank)
        assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "2"
        assert env["WORLD_SIZE"] == "4"
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == f"{name}-master-0"
        assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == str(RENDEZVOUS_PORT)
        assert env["PYTHONUNBUFFERED"] == "1"
        assert (
            env["NANORUN_RUN"] == "env"
            and env["NANORUN_STAGE"] == "pretrain"
            and env["NANORUN_ATTEMPT"] == "1"
        )
        assert env["AWS_ENDPOINT_URL"] == "http://s3:9000"
        assert env["AWS_ACCESS_KEY_ID"] == "key-id" and env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"


EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml")) + [REPO / "examples" / "tiny.yaml"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_job_nanorun_builds_passes_the_training_operators_admission(kube_pods, kube_namespace, example):
    """Every stage's PyTorchJob of every example LLMRun, and its RayService, as nanorun's operator
    builds them, pass a server-side dry run: the CRD schemas and the training-operator's validating
    webhook (failurePolicy Fail) accept them."""
    from nanorun.operator.api import parse_spec
    from nanorun.operator.children.pytorchjob import pytorchjob_for_stage
    from nanorun.operator.children.rayservice import rayservice_for_run
    from nanorun.operator.reconcile.plan import stage_plan
    from nanorun.operator.run_ref import RunRef

    body = yaml.safe_load(example.read_text())
    spec = parse_spec(body["spec"])
    run = RunRef(
        name=body["metadata"]["name"], namespace=kube_namespace, uid="00000000-0000-0000-0000-000000000001"
    )
    objects = [pytorchjob_for_stage(run, spec, stage, attempt=1) for stage in stage_plan(spec)]
    if spec.serving.enabled:
        objects.append(rayservice_for_run(run, spec, "s3://bucket/runs/x/sft/checkpoints"))
    for obj in objects:
        obj["metadata"].pop("ownerReferences", None)  # the owner is not in this dry run
        out = kube_pods.kubectl(
            "apply",
            "--dry-run=server",
            "-n",
            kube_namespace,
            "-f",
            "-",
            input=yaml.safe_dump(obj),
            check=False,
        )
        assert out.returncode == 0, f"{obj['kind']} {obj['metadata']['name']}: {out.stderr}"
    # The webhook is in the path: a PyTorchJob it must refuse (two Master replicas) is refused.
    bad = yaml.safe_load(yaml.safe_dump(objects[0]))
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    out = kube_pods.kubectl(
        "apply", "--dry-run=server", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(bad), check=False
    )
    assert out.returncode != 0 and "validator.pytorchjob.training-operator.kubeflow.org" in out.stderr, (
        out.stderr
    )


def test_nanoruns_rayservice_serves_chat_through_kuberay(kube_pods, kube_namespace, tiny_chat_run):
    """The RayService nanorun's operator builds for a finished run, with the run's NetworkPolicies
    (enforced by kube-network-policies): KubeRay creates the RayCluster (head, a worker, the in-tree
    autoscaler) with Ray's token authentication, deploys the Serve application from serveConfigV2
    through the dashboard, and reports it ready; the model loads from S3 over the cluster network and
    the `openai` client chats through the Service KubeRay made, from this machine, the chat source
    the policy allows. A pod of another namespace reaches neither Ray's ports (6379, 8265, 10001)
    nor the chat port, and this machine not Ray's; Ray's dashboard refuses a request without the
    token."""
    import openai
    from nanorun.operator.api import parse_spec
    from nanorun.operator.children.network import NetworkSettings, network_policies
    from nanorun.operator.children.rayservice import rayservice_for_run, rayservice_name
    from nanorun.operator.run_ref import RunRef

    ns = kube_namespace
    endpoint = deploy_s3(kube_pods, ns)
    upload_dir(kube_pods, ns, tiny_chat_run, "runs/chat")
    key = "sk-nanorun-kube-" + "4" * 32
    kube_pods.apply(ns, api_keys_secret("chat-keys", key))
    spec = parse_spec(
        {
            "image": image_ref("trainer"),
            "storage": {
                "uri": "s3://nanorun/runs/chat",
                "endpoint": endpoint,
                "credentialsSecret": "s3-creds",
            },
            "compute": {"nodes": 1, "gpusPerNode": 0, "cpu": "1"},
            "serving": {
                "enabled": True,
                "minReplicas": 1,
                "maxReplicas": 1,
                "gpusPerReplica": 0,
                # The head and the replica on the GPU node's 2 CPUs, where the image is pulled.
                "cpusPerReplica": 0.5,
                "headCpu": "500m",
                "nodeSelector": GPU_LABELS,
                "tolerations": GPU_TOLERATIONS,
                "image": image_ref("serving"),
                "apiKeysSecret": "chat-keys",
            },
        }
    )
    run = RunRef(name="chat", namespace=ns, uid="00000000-0000-0000-0000-000000000002")
    service = rayservice_for_run(run, spec, "s3://nanorun/runs/chat/sft")
    # The chat from this machine (as from an ingress outside the cluster's pods); KubeRay runs in
    # `default` (tests/kube/controllers.py).
    here = {"ipBlock": {"cidr": f"{kube_pods.cluster.network.host_ip}/32"}}
    settings = NetworkSettings(enabled=True, chat_from=(here,), kuberay_namespace="default")
    for obj in (*network_policies(run, spec, settings), service):
        obj["metadata"].pop("ownerReferences")  # the owner is not in this test
        kube_pods.apply(ns, obj)
    name = rayservice_name(run.name)

    ready = wait_for(
        lambda: kube_pods.get(ns, "rayservice", name),
        lambda s: condition(s, "Ready").get("status") == "True",
        timeout=600,
    )
    clusters = kube_pods.kubectl("get", "rayclusters", "-n", ns, "-o", "name").stdout.split()
    assert len(clusters) == 1
    assert ready["status"]["activeServiceStatus"]["applicationStatuses"]["chat"]["status"] == "RUNNING"
    serve_ip = kube_pods.kubectl(
        "get", "service", f"{name}-serve-svc", "-n", ns, "-o", "jsonpath={.spec.clusterIP}"
    ).stdout
    client = openai.OpenAI(base_url=f"http://{serve_ip}:8000/v1", api_key=key, timeout=60)

    def chat():
        # KubeRay labels the pods that serve (ray.io/serve) once their proxies are up, and kube-proxy
        # programs the Service's endpoints a moment later: until then the Service refuses.
        try:
            return (
                client.chat.completions.create(
                    model="nanorun", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
                )
                .choices[0]
                .message.content
            )
        except openai.APIConnectionError as err:
            return repr(err)

    reply = wait_for(chat, lambda r: not r.startswith("APIConnectionError"), timeout=120)
    assert reply
    chunks = list(
        client.chat.completions.create(
            model="nanorun", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True
        )
    )
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    # The key came from the Secret mounted on the worker pod: without it the API refuses.
    stranger = openai.OpenAI(base_url=f"http://{serve_ip}:8000/v1", api_key="sk-" + "0" * 32, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()

    # Network: team B's pod, on the other node, against the head's ports and the chat.
    head = kube_pods.kubectl(
        "get", "pods", "-n", ns, "-l", "ray.io/node-type=head", "-o", "jsonpath={.items[0].status.podIP}"
    ).stdout
    s3_ip = kube_pods.kubectl("get", "service", "s3", "-n", ns, "-o", "jsonpath={.spec.clusterIP}").stdout
    team_b = f"{ns[:50]}-b"
    kube_pods.kubectl("create", "namespace", team_b)
    kube_pods.kubectl("label", "namespace", team_b, "pod-security.kubernetes.io/enforce=restricted")
    try:
        kube_pods.apply(team_b, prober_pod())
        kube_pods.kubectl("wait", "pod/prober", "-n", team_b, "--for=condition=Ready", "--timeout=120s")
        targets = [(head, 6379), (head, 8265), (head, 10001), (head, 8000), (serve_ip, 8000), (s3_ip, 9000)]
        verdicts = kube_pods.cluster.workdir / "kube-network-policies.log"
        assert probe(kube_pods, team_b, targets) == {
            (head, 6379): "closed",
            (head, 8265): "closed",
            (head, 10001): "closed",
            (head, 8000): "closed",
            (serve_ip, 8000): "closed",
            (s3_ip, 9000): "open",  # the pod's network works: S3 is no run's pod
        }, verdicts.read_text()[-3000:]
    finally:
        kube_pods.kubectl("delete", "namespace", team_b, "--wait=false", check=False)
    # This machine may chat, not reach Ray's ports.
    for port, reachable in ((8000, True), (8265, False), (6379, False)):
        assert tcp_open(head, port) == reachable, port
    # Ray's token authentication: the dashboard's Jobs API answers only with the token, which
    # KubeRay put into the Ray containers from its Secret.
    codes = kube_pods.kubectl(
        "exec",
        "-n",
        ns,
        head_pod(kube_pods, ns),
        "-c",
        "ray-head",
        "--",
        "python",
        "-c",
        DASHBOARD_WITH_AND_WITHOUT_TOKEN,
    ).stdout.split()
    assert codes[0] in ("401", "403") and codes[1] == "200", codes


DASHBOARD_WITH_AND_WITHOUT_TOKEN = textwrap.dedent("""
    import os, urllib.error, urllib.request
    def status(headers):
        request = urllib.request.Request("http://127.0.0.1:8265/api/jobs/", headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as err:
            return err.code
    bearer = "Bearer " + os.environ["RAY_AUTH_TOKEN"]
    # KubeRay's dashboard client sends the token as x-ray-authorization
    print(status({}), status({"Authorization": bearer, "x-ray-authorization": bearer}))
""")


def head_pod(kube, ns: str) -> str:
    return (
        "pod/"
        + kube.kubectl(
            "get", "pods", "-n", ns, "-l", "ray.io/node-type=head", "-o", "jsonpath={.items[0].metadata.name}"
        ).stdout
    )


def prober_pod() -> dict:
    """A busybox pod under the `restricted` profile, on a system node (it tolerates no GPU taint)."""
    from nanorun.operator.children.security import restrict

    pod = {"containers": [{"name": "probe", "image": "busybox:1.36", "command": ["sleep", "3600"]}]}
    pod["terminationGracePeriodSeconds"] = 0
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "prober"},
        "spec": restrict(pod, user={"runAsUser": 65534, "runAsGroup": 65534}),
    }


def probe(kube, namespace: str, targets: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """TCP connects from the prober pod: "open" when the connection is made (nc then waits for the
    peer until `timeout` ends it), "closed" when it fails within nc's 3 s connect timeout (a
    NetworkPolicy drops the SYN)."""
    script = "; ".join(
        f"timeout 6 nc -w 3 {ip} {port} </dev/null >/dev/null 2>&1; echo {ip} {port} $?"
        for ip, port in targets
    )
    out = kube.kubectl("exec", "-n", namespace, "prober", "--", "sh", "-c", script).stdout
    codes = {(ip, int(port)): code for ip, port, code in (line.split() for line in out.splitlines())}
    return {target: "closed" if codes[target] == "1" else "open" for target in targets}


def tcp_open(ip: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((ip, port), timeout=3).close()
        return True
    except OSError:
        return False
