"""The whole path through the real controllers, in the test cluster (tests/kube): the chart's
operator pod, the Kubeflow training-operator making each stage's pods and Services, the trainer
processes meeting through the environment it injects, storage on an S3 server running as a pod,
KubeRay making the chat service, and the `openai` client and Chromium talking to it. Every pod runs
in a container on the kubelet nodes: the trainer image trains (on CPU: GPUs are substituted) and the
serving image serves; no status is set by the test. The API server enforces Pod Security
Admission's `restricted` profile on the test's namespace, as on a tenant's namespace.

One run of the test-sized LLMRun (tests/e2e/pipeline.py, every distributed stage on 2 pods):

1. `helm install` of the chart; the operator runs as its Deployment's pod.
2. Pretraining's Master pod is deleted after the first checkpoint: the trainer checkpoints on
   SIGTERM, the job fails, and the operator starts attempt 2 from that checkpoint without counting
   a failure.
3. Meanwhile the operator pod is deleted at three random moments; the run still succeeds with
   exactly one PyTorchJob per stage attempt.
4. KubeRay reports the RayService ready (status.serving.ready follows it), two replicas on two
   worker pods; chat through the Service KubeRay made, plain and streamed, and the web UI in
   Chromium.
5. RL runs again with more steps (a spec change): the stages after it run again, those before it
   do not, and the new checkpoint rolls into the running RayService in place (same RayCluster)
   while a client keeps chatting without a failed request.
6. Deleting the LLMRun garbage-collects every child, and cleanupOnDelete empties its storage.

All along, a real Prometheus (tests/fixtures/prometheus/) scrapes what the chart's ServiceMonitor
and PodMonitor select: the operator, every trainer pod and each chat replica. Before the deletion,
every query of every panel of the chart's Grafana dashboard returns data for the run (evaluated over
the run with the dashboard's variables resolved, as Grafana would; tests/fixtures/grafana.py), but
the queries that need GPUs (dcgm-exporter's, MFU) on this cluster without GPUs.

Prints one JSON line, `e2e {...}`, with the phase and stage times (docs/benchmarks.md).
Run: .venv/bin/pytest tests/e2e -s   (needs root for the pod network)
"""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
from pathlib import Path

import openai
import pytest
import yaml
from nanorun.pipeline import storage
from nanorun.pipeline.progress import read_done
from nanorun.serving import checkpoint_digest
from nanorun.trainer.data.dataset import resolve_shards
from nanorun.trainer.training import checkpoint

from tests.e2e.pipeline import (
    API_KEY,
    PRETRAIN_STEPS,
    SAVE_EVERY,
    delete_pod_reading_its_log,
    e2e_llmrun,
    keys_secret,
    llmrun_reader,
    record,
)
from tests.fixtures import grafana
from tests.fixtures.chat_model import greedy_reply
from tests.fixtures.kube import deploy_s3, wait_until
from tests.fixtures.prometheus import (
    KubernetesDiscovery,
    Prometheus,
    chart_monitors,
    prometheus_config,
    through_http_sd,
)
from tests.images.containers import image_ref
from tests.kube.cluster import REPO

pytestmark = [pytest.mark.slow, pytest.mark.kube]

NAME = "e2e"
BUCKET = "nanorun"
RUN_DIR = f"s3://{BUCKET}/runs/e2e"
DATA = f"s3://{BUCKET}/data/bundled"
STAGES = [  # (key, its job name's part)
    ("tokenizer", "tokenizer"),
    ("pretrain", "pretrain"),
    ("baseEval", "base-eval"),
    ("midtrain", "midtrain"),
    ("sft", "sft"),
    ("rl", "rl"),
    ("eval", "eval"),
    ("report", "report"),
]
TRAINING = ("pretrain", "midtrain", "sft", "rl")
OPERATOR_KILLS = 3
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHART = REPO / "charts" / "nanorun"
DASHBOARD = CHART / "files" / "dashboards" / "nanorun.json"
REPLICAS = 2
SCRAPE_SECONDS = 2  # the monitors' interval for this run (the chart's default is 15 s and 30 s)
SCRAPE_EVERY = [
    f"{m}.{k}={SCRAPE_SECONDS}s"
    for m in ("serviceMonitor", "podMonitor")
    for k in ("interval", "scrapeTimeout")
]
# Panels that can only show data with GPUs: dcgm-exporter's, and MFU (the trainer reports it only
# against a GPU's peak FLOPs). This cluster has none; every other panel must show the run.
NEEDS_GPU = re.compile(r"\b(DCGM_\w+|llm_train_mfu_ratio)\b")


class Cluster:
    """kubectl and the API for one namespace, with the waits this test needs."""

    def __init__(self, kube, ns: str) -> None:
        self.kube, self.ns = kube, ns
        self.run = llmrun_reader(kube, ns, NAME)

    def get(self, kind: str, name: str) -> dict | None:
        out = self.kube.kubectl("get", kind, name, "-n", self.ns, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def items(self, kind: str, selector: str = "") -> list[dict]:
        args = ["get", kind, "-n", self.ns, "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(self.kube.kubectl(*args).stdout)["items"]

    def names(self, kind: str, selector: str = "") -> list[str]:
        return sorted(o["metadata"]["name"] for o in self.items(kind, selector))

    def logs(self, pod: str) -> str:
        return self.kube.kubectl("logs", pod, "-n", self.ns, "-c", "pytorch", check=False).stdout

    def cluster_ip(self, service: str) -> str:
        return self.kube.service_ip(self.ns, service)

    def delete_operator_pod(self) -> None:
        self.kube.kubectl(
            "delete", "pod", "-n", self.ns, "-l", "app.kubernetes.io/name=nanorun", "--wait=false"
        )


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def phase(c: Cluster) -> str:
    status = c.run().get("status") or {}
    if status.get("phase") == "Failed":
        raise AssertionError(f"the run failed:\n{yaml.safe_dump(status)}")
    return status.get("phase", "")


class OperatorKiller(threading.Thread):
    """Deletes the operator pod at random moments of the run (the Deployment makes a new one): a
    few seconds into each of three stages drawn at random, so every kill lands while the pipeline
    runs however fast this machine is."""

    STAGES = ("pretrain", "baseEval", "midtrain", "sft", "rl", "eval")

    def __init__(self, c: Cluster, seed: int) -> None:
        super().__init__(daemon=True)
        rng = random.Random(seed)
        self.c, self.done = c, threading.Event()
        self.plan = [
            (stage, rng.uniform(0, 4))
            for stage in sorted(rng.sample(self.STAGES, OPERATOR_KILLS), key=self.STAGES.index)
        ]
        self.killed_at: list[str] = []

    def run(self) -> None:
        for stage, delay in self.plan:
            while (self.c.run().get("status") or {}).get("stage") != stage:
                if self.done.wait(0.5):
                    return
            if self.done.wait(delay):
                return
            self.c.delete_operator_pod()
            self.killed_at.append(f"{stage}+{delay:.1f}s")


class Chatter(threading.Thread):
    """A client chatting in a loop through the serve Service; every failed request is kept."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)
        self.stop, self.ok, self.failures = threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.client.chat.completions.create(
                    model="nanorun", max_tokens=4, temperature=0, messages=[{"role": "user", "content": "Hi"}]
                )
                self.ok += 1
            except openai.OpenAIError as err:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {err!r}")
            time.sleep(0.2)


def health(url: str) -> dict:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=10).json()
    except (httpx.HTTPError, ValueError) as err:
        return {"error": repr(err)}


def chat_in_chromium(url: str) -> str:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page()
        page.add_init_script(f"localStorage.setItem('nanorun-api-key', {json.dumps(API_KEY)})")
        page.goto(url + "/")
        page.fill("#max-tokens", "8")
        page.dispatch_event("#max-tokens", "change")
        page.fill("#input", "Hello through KubeRay")
        page.press("#input", "Enter")
        page.wait_for_selector(".message.assistant[data-done='1']", timeout=120_000)
        reply = page.inner_text(".message.assistant .content")
        browser.close()
    return reply


def helm_sets(ns: str, endpoint: str = "") -> list[str]:
    """The chart's values for this run's release (`--set` items)."""
    return [
        f"operator.watchNamespaces={{{ns}}}",
        f"operator.storage.endpoint={endpoint}",
        "operator.storage.credentialsSecret=s3-creds",
        # This machine chats and scrapes from outside the pods; the policies' enforcement is
        # tests/kube/test_controllers.py's.
        "operator.networkPolicy.enabled=false",
        *SCRAPE_EVERY,
    ]


@pytest.fixture
def prometheus(kube_pods, kube_namespace, tmp_path):
    """Prometheus scraping what the chart's monitors select for the release this test installs."""
    monitors = chart_monitors(kube_pods, CHART, "nanorun", kube_namespace, *helm_sets(kube_namespace))
    with KubernetesDiscovery(kube_pods.kubeconfig) as discovery:
        config = through_http_sd(prometheus_config(monitors, kube_pods.kubeconfig), discovery.url)
        with Prometheus(config, tmp_path / "prometheus") as prom:
            yield prom


def scraped(prom: Prometheus, start: float, end: float, up: str = "up") -> dict[str, set[str]]:
    """Pods that were targets in [start, end] (`up`), or that answered a scrape (`up == 1`), by
    monitor endpoint."""
    pods: dict[str, set[str]] = {}
    for series in prom.query_range(up, start, end, SCRAPE_SECONDS):
        pods.setdefault(series["metric"].get("endpoint", "?") + " " + series["metric"]["job"], set()).add(
            series["metric"].get("pod", "?")
        )
    return pods


def dashboard_without_data(prom: Prometheus, start: float, end: float) -> tuple[list[str], list[str]]:
    """Evaluates the dashboard for this run over [start, end]: (queries that returned no data,
    queries left out because they need GPUs)."""
    dashboard = grafana.load(DASHBOARD)
    options = grafana.resolve_variables(prom, dashboard, start, end)
    assert NAME in options["run"], f"the run selector does not list {NAME!r}: {options}"
    results = grafana.evaluate_panels(
        prom, dashboard, {"run": [NAME]}, start, end, step=SCRAPE_SECONDS, scrape_interval=SCRAPE_SECONDS
    )
    empty = [
        f"{q.panel}: {q.expr}" for q, data in results.items() if not data and not NEEDS_GPU.search(q.expr)
    ]
    gpu = [f"{q.panel}: {q.expr}" for q in results if NEEDS_GPU.search(q.expr)]
    return empty, gpu


@pytest.mark.timeout(1500)  # about 400 s alone, twice that beside CPU-bound tests
def test_an_llmrun_trains_on_two_nodes_survives_preemption_and_operator_restarts_serves_and_rolls(
    kube_pods, restricted_namespace, prometheus, monkeypatch
):
    ns, kube, times = restricted_namespace, kube_pods, {}
    c = Cluster(kube, ns)
    t0, started = time.monotonic(), time.time()

    def mark(what: str) -> None:
        times[what] = round(time.monotonic() - t0, 1)

    # Storage: an S3 server as a pod; this process reads it through the Service's cluster IP.
    endpoint = deploy_s3(kube, ns, BUCKET)
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{c.cluster_ip('s3')}:9000",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    # The pretraining text is staged in the bucket, as on a cluster without internet access: the
    # bundled corpus, built on this machine (it downloads Debian packages the pods could not reach).
    for shard in resolve_shards("bundled"):
        storage.upload_from(shard, storage.join(DATA, Path(shard).name))

    # 1. The operator, as the chart's pod.
    kube.helm(
        "install",
        "nanorun",
        str(CHART),
        "-n",
        ns,
        *[a for v in helm_sets(ns, endpoint) for a in ("--set", v)],
        "--wait",
        "--timeout",
        "180s",
    )
    mark("operator_ready")
    # Scraped before the run exists, so that the operator's counters are seen rising from 0.
    prometheus.wait_for_targets(
        lambda ts: any(t["labels"].get("job") == "nanorun" and t["health"] == "up" for t in ts)
    )
    mark("operator_scraped")

    manifest = e2e_llmrun(
        NAME, RUN_DIR, nodes=2, endpoint=endpoint, credentialsSecret="s3-creds", cleanupOnDelete=True
    )
    manifest["spec"]["data"]["pretrain"] = DATA
    # The cluster runs Trainer v2 too, where `auto` means TrainJob (test_pipeline_trainjob_kube.py).
    manifest["spec"]["compute"]["launcher"] = "PyTorchJob"
    # Evaluate mid-way too: the pod exits right after the last step's evaluation, often before a scrape.
    manifest["spec"]["stages"]["pretrain"]["evalEvery"] = PRETRAIN_STEPS // 2
    manifest["spec"]["serving"].update(image=image_ref("serving"), minReplicas=REPLICAS, maxReplicas=REPLICAS)
    kube.apply(ns, keys_secret(NAME))
    kube.apply(ns, manifest)
    seed = int(time.time())
    killer = OperatorKiller(c, seed)
    killer.start()

    # 2. Preemption: delete pretraining's Master pod once a checkpoint is committed.
    stage_dir = storage.join(RUN_DIR, "pretrain")
    wait_until(lambda: checkpoint.latest_checkpoint(stage_dir), bool, timeout=420, interval=0.5)
    mark("first_checkpoint")
    master = "e2e-pretrain-1-master-0"
    assert read_done(RUN_DIR, "pretrain") is None, "pretraining finished before it could be preempted"
    preempted_log = delete_pod_reading_its_log(kube, ns, master, "pytorch")
    mark("preempted")
    assert "SIGTERM: will checkpoint" in preempted_log, preempted_log[-3000:]
    saved = re.search(r"SIGTERM checkpoint saved in ([0-9.]+) s", preempted_log)
    assert saved, preempted_log[-3000:]

    wait_until(lambda: phase(c), lambda p: p == "Succeeded", timeout=900, interval=1)
    mark("pipeline_succeeded")
    killer.done.set()
    killer.join()
    assert len(killer.killed_at) == OPERATOR_KILLS, killer.killed_at
    run = c.run()
    status = run["status"]
    assert status["launcher"] == "PyTorchJob"

    # Every stage succeeded; pretraining needed a second attempt that was not a counted failure.
    assert [(s["name"], s["phase"]) for s in status["stages"]] == [(key, "Succeeded") for key, _ in STAGES]
    records = {s["name"]: s for s in status["stages"]}
    assert {k: r["attempts"] for k, r in records.items()} == {
        k: 2 if k == "pretrain" else 1 for k, _ in STAGES
    }
    assert (records["pretrain"].get("failures", 0), records["pretrain"]["preemptions"]) == (0, 1)
    # Exactly one PyTorchJob per stage attempt, though the operator was restarted three times.
    expected = [f"e2e-{dns}-1" for _, dns in STAGES] + ["e2e-pretrain-2"]
    assert c.names("pytorchjobs") == sorted(expected)
    first, second = c.get("pytorchjob", "e2e-pretrain-1"), c.get("pytorchjob", "e2e-pretrain-2")
    assert (
        condition(first, "Failed")["status"] == "True" and condition(second, "Succeeded")["status"] == "True"
    )
    assert second["status"]["replicaStatuses"]["Master"]["succeeded"] == 1
    assert second["status"]["replicaStatuses"]["Worker"]["succeeded"] == 1

    # The second attempt resumed from the preemption's checkpoint, on two ranks that met through
    # the training-operator's environment.
    resumed_log = c.logs("e2e-pretrain-2-master-0")
    resumed = re.search(r"resuming from (\S+) \(step (\d+),", resumed_log)
    assert resumed, resumed_log[-3000:]
    assert resumed.group(1).startswith(f"{stage_dir}/checkpoints/") and int(resumed.group(2)) >= SAVE_EVERY
    assert "pretrain: rank 0/2" in resumed_log  # the Worker's pod may be gone: cleanPodPolicy Running
    pods = c.items("pods", "nanorun.io/stage=pretrain,nanorun.io/attempt=2")
    env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
    assert {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "PET_NNODES"} <= set(
        env
    )  # injected, not ours
    assert env["NANORUN_ATTEMPT"] == "2"

    # Metrics from the stages' files; the report in storage.
    for key in TRAINING:
        m = records[key]["metrics"]
        assert m["step"] == m["totalSteps"] > 0 and m["loss"] is not None, (key, m)
    assert records["pretrain"]["metrics"]["totalSteps"] == PRETRAIN_STEPS
    final = read_done(RUN_DIR, "rl").outputs["checkpoint"]
    assert status["checkpoint"] == final
    assert "\n| rl | " in storage.read_text(storage.join(RUN_DIR, "report", "report.md"))  # its cost row

    # 4. KubeRay makes the chat service; the run is Ready because KubeRay says so.
    ready = wait_until(
        c.run, lambda r: condition(r, "Ready").get("status") == "True", timeout=600, interval=1
    )
    mark("serving_ready")
    assert ready["status"]["serving"]["ready"] is True
    rayservice = c.get("rayservice", f"{NAME}-chat")
    assert condition(rayservice, "Ready")["status"] == "True"
    ray_clusters = c.names("rayclusters")
    assert len(ray_clusters) == 1
    url = f"http://{c.cluster_ip(f'{NAME}-chat-serve-svc')}:8000"
    chat = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def reply() -> str:
        try:
            return (
                chat.chat.completions.create(
                    model="nanorun",
                    max_tokens=12,
                    temperature=0,
                    messages=[{"role": "user", "content": "What is 2 plus 3?"}],
                )
                .choices[0]
                .message.content
            )
        except openai.APIConnectionError as err:  # until kube-proxy has the Service's endpoints
            return f"APIConnectionError {err!r}"

    answer = wait_until(reply, lambda r: not r.startswith("APIConnectionError"), timeout=120, interval=1)
    _, _, expected = greedy_reply(final, [{"role": "user", "content": "What is 2 plus 3?"}], max_tokens=12)
    assert answer == expected  # what the final checkpoint answers, decoded greedily in this process
    chunks = list(
        chat.chat.completions.create(
            model="nanorun", max_tokens=8, stream=True, messages=[{"role": "user", "content": "Hi"}]
        )
    )
    assert any(ch.choices and ch.choices[0].delta.content for ch in chunks)
    assert health(url)["checkpoint_digest"] == checkpoint_digest(final)
    assert chat_in_chromium(url).strip()
    mark("chatted")

    # 5. RL again with more steps: it and the stages after it run again, and the new checkpoint
    # rolls into the running service while a client chats.
    chatter = Chatter(f"{url}/v1")
    chatter.start()
    kube.kubectl(
        "patch",
        "llmrun",
        NAME,
        "-n",
        ns,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"stages": {"rl": {"numIterations": 3}}}}),
    )
    old_id = next(r["configId"] for r in status["stages"] if r["name"] == "rl")

    def rerun_done(run: dict) -> bool:
        rl = next((r for r in (run.get("status") or {}).get("stages", []) if r["name"] == "rl"), {})
        return rl.get("configId") not in (None, old_id) and phase(c) == "Succeeded"

    rerun = wait_until(c.run, rerun_done, timeout=600, interval=1)
    new_final = rerun["status"]["checkpoint"]
    new_id = next(r["configId"] for r in rerun["status"]["stages"] if r["name"] == "rl")
    mark("rerun_succeeded")
    # The replica must have loaded the weights saved under the new config id.
    rolled = wait_until(lambda: health(url), lambda h: h.get("config_id") == new_id, timeout=300, interval=1)
    assert rolled["checkpoint_digest"] == checkpoint_digest(new_final)
    wait_until(c.run, lambda r: condition(r, "Ready").get("status") == "True", timeout=300, interval=1)
    mark("rolled")
    served = chatter.ok
    wait_until(lambda: chatter.ok, lambda n: n >= served + 5, timeout=120, interval=0.2)  # by the new weights
    chatter.stop.set()
    chatter.join()
    assert chatter.failures == [] and chatter.ok > 0, (chatter.ok, chatter.failures[:5])
    assert c.names("rayclusters") == ray_clusters  # in place: the same Ray cluster
    records = {s["name"]: s for s in rerun["status"]["stages"]}
    assert {k: records[k]["attempts"] for k, _ in STAGES} == {
        k: 2 if k in ("rl", "eval", "report") else 1 for k, _ in STAGES
    } | {"pretrain": 2}  # pretraining's second attempt is the preemption's
    assert read_done(RUN_DIR, "rl").metrics["steps"] == 3 and "e2e-rl-2" in c.names("pytorchjobs")

    # Prometheus scraped the operator, the trainers and every chat replica (not Ray's own metrics),
    # and every dashboard panel shows the run.
    now = time.time()
    targets, scrapes = scraped(prometheus, started, now), scraped(prometheus, started, now, "up == 1")
    operator, trainers, replicas = (
        "metrics nanorun",
        f"metrics {ns}/nanorun-runs",
        f"serve-metrics {ns}/nanorun-runs",
    )
    assert set(targets) == set(scrapes) == {operator, trainers, replicas}, targets
    assert len(scrapes[operator]) >= 2, scrapes  # the chart's pod and at least one after a deletion
    assert {"e2e-pretrain-2-master-0", "e2e-pretrain-2-worker-0"} <= scrapes[trainers], scrapes
    ray_workers = c.names("pods", "ray.io/node-type=worker")
    assert sorted(scrapes[replicas]) == sorted(targets[replicas]) == ray_workers, (targets, ray_workers)
    assert len(ray_workers) == REPLICAS
    assert not targets[trainers] & set(c.names("pods", "ray.io/node-type")), (
        targets
    )  # Ray's own `metrics` ports
    empty, gpu_only = dashboard_without_data(prometheus, started, now)
    assert empty == [], "dashboard queries without data for the run:\n" + "\n".join(empty)
    mark("dashboard_checked")

    # 6. Deleting the run: the garbage collector takes every child, the operator the files.
    kube.kubectl("delete", "llmrun", NAME, "-n", ns, "--wait=false")
    wait_until(c.run, lambda r: not r, timeout=120, interval=1)
    for kind in ("pytorchjobs", "rayservices", "rayclusters"):
        wait_until(lambda kind=kind: c.names(kind), lambda n: n == [], timeout=180, interval=1)
    wait_until(lambda: c.names("pods", "nanorun.io/run=e2e"), lambda n: n == [], timeout=180, interval=1)
    wait_until(
        lambda: [s for s in c.names("services") if s.startswith(f"{NAME}-")],
        lambda n: n == [],
        timeout=180,
        interval=1,
    )
    assert storage.list_files(RUN_DIR) == []
    mark("deleted")

    stage_seconds = {s["name"]: round(s.get("durationSeconds") or 0, 1) for s in status["stages"]}
    record(
        "e2e",
        {
            "seconds": times,
            "stage_seconds": stage_seconds,
            "sigterm_checkpoint_seconds": float(saved.group(1)),
            "operator_killed_at": killer.killed_at,
            "seed": seed,
            "chat_requests_during_roll": chatter.ok,
            "scraped_pods": {k: len(v) for k, v in scrapes.items()},
            "gpu_only_queries": len(gpu_only),
        },
    )
