"""Every chat replica is scraped on its own pod: the RayService nanorun's operator builds, with two
replicas on the test cluster, serves a chat, and each Ray worker pod's `serve-metrics` port (what
the chart's PodMonitor scrapes) has that replica's own series, which promtool accepts and which
together count every request sent."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.kube import api_keys_secret, deploy_s3, upload_dir, wait_until
from tests.images.containers import image_ref
from tests.kube.cluster import GPU_LABELS, GPU_TOLERATIONS
from tests.test_metrics_promtool import promtool_check

pytestmark = [pytest.mark.kube, pytest.mark.slow]
API_KEY = "sk-nanorun-kube-" + "5" * 32


def requests_counted(text: str) -> float:
    """Chat completions a replica answered with 200."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "nanorun_serve_requests_total" and s.labels == {"status": "200"}
    )


def test_two_replicas_each_serve_their_own_metrics_on_their_pod(kube_pods, kube_namespace, tiny_chat_run):
    from nanorun.operator.api import parse_spec
    from nanorun.operator.jobs import RunRef
    from nanorun.operator.rayservice import SERVE_METRICS_PORT_NAME, rayservice_for_run, rayservice_name
    from nanorun.serving import SERVE_METRICS_PORT

    ns = kube_namespace
    endpoint = deploy_s3(kube_pods, ns)
    upload_dir(kube_pods, ns, tiny_chat_run, "runs/chat")
    kube_pods.apply(ns, api_keys_secret("chat-keys", API_KEY))
    spec = parse_spec(
        {
            "image": image_ref("trainer"),
            "storage": {
                "uri": "s3://nanorun/runs/chat",
                "endpoint": endpoint,
                "credentialsSecret": "s3-creds",
            },
            "serving": {
                "enabled": True,
                "minReplicas": 2,
                "maxReplicas": 2,
                "gpusPerReplica": 0,
                # The head, its autoscaler sidecar and both replicas on the GPU node's 2 CPUs,
                # where the image is pulled.
                "cpusPerReplica": 0.25,
                "headCpu": "500m",
                "nodeSelector": GPU_LABELS,
                "tolerations": GPU_TOLERATIONS,
                "image": image_ref("serving"),
                "apiKeysSecret": "chat-keys",
            },
        }
    )
    run = RunRef(name="chat", namespace=ns, uid="00000000-0000-0000-0000-000000000003")
    service = rayservice_for_run(run, spec, "s3://nanorun/runs/chat/sft")
    service["metadata"].pop("ownerReferences")
    kube_pods.apply(ns, service)
    name = rayservice_name(run.name)

    def ready(svc: dict) -> bool:
        conditions = svc.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    wait_until(lambda: kube_pods.get(ns, "rayservice", name), ready, timeout=600, interval=1)
    workers = json.loads(
        kube_pods.kubectl("get", "pods", "-n", ns, "-l", "ray.io/node-type=worker", "-o", "json").stdout
    )["items"]
    assert len(workers) == 2
    for pod in workers:
        ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert ports[SERVE_METRICS_PORT_NAME] == SERVE_METRICS_PORT
    scrape_urls = [f"http://{pod['status']['podIP']}:{SERVE_METRICS_PORT}/metrics" for pod in workers]

    serve_ip = kube_pods.kubectl(
        "get", "service", f"{name}-serve-svc", "-n", ns, "-o", "jsonpath={.spec.clusterIP}"
    ).stdout
    body = {"model": "nanorun", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

    def chat(_: int = 0) -> int:
        try:
            return httpx.post(
                f"http://{serve_ip}:8000/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=60,
            ).status_code
        except httpx.TransportError:  # the Service's endpoints are programmed a moment after Ready
            return 0

    wait_until(chat, lambda status: status == 200, timeout=120, interval=1)
    sent = 1  # answered with 200
    # Concurrent rounds until Serve's router has sent requests to both replicas.
    scraped: list[str] = []
    for _ in range(10):
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(chat, range(4))) == [200] * 4
        sent += 4
        scraped = [httpx.get(url, timeout=10).text for url in scrape_urls]
        if all(requests_counted(text) > 0 for text in scraped):
            break
    for url, text in zip(scrape_urls, scraped, strict=True):
        check = promtool_check(text)
        assert check.returncode == 0, f"{url}: {check.stdout}{check.stderr}"
        assert requests_counted(text) > 0, f"{url} counted no request"
    assert sum(requests_counted(text) for text in scraped) == sent
