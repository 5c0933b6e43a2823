"""Start-up time of the test cluster (tests/kube/cluster.py), phase by phase, and of its pods.

    python bench/kube_up.py                 # warm: the binaries and images are built (make setup-kube
                                            # test-images)
    python bench/kube_up.py --repeat 3

Starts the whole cluster in a temporary folder as the `kube` test fixture does (control plane, the
registry with every image pushed, two kubelet nodes, kube-proxy, CoreDNS, the training-operator,
KubeRay and Kueue), then times, from `kubectl apply` to the container's start as the kubelet
reports it: a busybox pod (a 2 MB image the node pulls), a trainer-image pod on the GPU node (the
node pulls and unpacks 7 GB) and a second one there (the image is present). Stops the cluster and
prints one JSON line per start: seconds until each phase was done, the pod start times, the time
`stop` took, CPU count and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.images.containers import NAMES, TEST_NAMES, image_ref  # noqa: E402
from tests.kube.cluster import GPU_LABELS, GPU_TOLERATIONS, Cluster  # noqa: E402


def pod_start_s(cluster: Cluster, name: str, image: str, command: list[str], gpu: bool = False) -> float:
    """Seconds from `kubectl apply` of a pod to its container's start (its `startedAt`)."""
    spec: dict = {
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": image, "command": command}],
    }
    if gpu:
        spec.update(nodeSelector=GPU_LABELS, tolerations=GPU_TOLERATIONS)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }
    began = time.monotonic()
    cluster._kubectl("apply", "-f", "-", input=json.dumps(pod))
    while time.monotonic() - began < 900:
        status = json.loads(cluster._kubectl("get", "pod", name, "-o", "json").stdout).get("status", {})
        state = (status.get("containerStatuses") or [{}])[0].get("state", {})
        if "running" in state or "terminated" in state:
            return round(time.monotonic() - began, 2)
        time.sleep(0.1)
    raise TimeoutError(f"pod {name} did not start in 900 s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=1, help="how many starts (default 1)")
    args = p.parse_args()
    images = tuple(image_ref(name) for name in (*NAMES, *TEST_NAMES))
    for _ in range(args.repeat):
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="nanorun-kube-bench-") as tmp:
            cluster = Cluster(Path(tmp), local_images=images)
            try:
                cluster.start()
                sleep = ["sleep", "30"]
                pods = {
                    "busybox_pod_start_s": pod_start_s(cluster, "busybox", "busybox:1.36", sleep),
                    "trainer_pod_cold_start_s": pod_start_s(
                        cluster, "trainer-cold", image_ref("trainer"), sleep, gpu=True
                    ),
                    "trainer_pod_warm_start_s": pod_start_s(
                        cluster, "trainer-warm", image_ref("trainer"), sleep, gpu=True
                    ),
                }
            finally:
                stopping = time.monotonic()
                cluster.stop()
            print(
                json.dumps(
                    {
                        "bench": "kube_up",
                        **{f"{k}_s": v for k, v in cluster.timings.items()},
                        **pods,
                        "stop_s": round(time.monotonic() - stopping, 2),
                        "pods": cluster.pods,
                        "cpus": os.cpu_count(),
                        "load_before": round(load, 2),
                        "machine": platform.machine(),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
