"""Start-up time of the test cluster (tests/kube/cluster.py), phase by phase.

    python bench/kube_up.py                 # warm: the binaries are built (make setup-kube)
    python bench/kube_up.py --repeat 3

Starts the whole cluster in a temporary folder as the `kube` test fixture does (control plane, two
nodes, kube-proxy, CoreDNS, the training-operator and KubeRay), stops it, and prints one JSON line
per start: seconds until the API server answered /readyz, the nodes were Ready, CoreDNS was Ready
and both controllers were Ready, the time `stop` took, CPU count and load average.
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

from tests.kube.cluster import Cluster  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=1, help="how many starts (default 1)")
    args = p.parse_args()
    for _ in range(args.repeat):
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="nanorun-kube-bench-") as tmp:
            cluster = Cluster(Path(tmp))
            cluster.start()
            stopping = time.monotonic()
            cluster.stop()
            print(
                json.dumps(
                    {
                        "bench": "kube_up",
                        **{f"{k}_s": v for k, v in cluster.timings.items()},
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
