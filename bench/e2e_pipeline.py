"""Wall time of the two end-to-end tests on the test cluster, phase by phase: an LLMRun through the
training-operator's PyTorchJobs to a rolled RayService, and the TrainJob pipeline.

    python bench/e2e_pipeline.py                 # both tests, in one pytest process (one cluster)
    python bench/e2e_pipeline.py --only pytorchjob

Runs the tests with pytest (the test images must be built: `make test-images`), then reads the
lines they record (tests/e2e/pipeline.py `record`: the seconds from the test's start to each phase,
each stage's durationSeconds, the SIGTERM checkpoint's time). Prints one JSON line: the pytest wall
seconds (the cluster's start included), each test's record, CPU count and load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = {
    "pytorchjob": ("tests/e2e/test_pipeline_kube.py", "e2e"),
    "trainjob": ("tests/e2e/test_pipeline_trainjob_kube.py", "e2e-trainjob"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(TESTS), default=None, help="run one of the two tests")
    args = p.parse_args()
    chosen = {args.only: TESTS[args.only]} if args.only else TESTS

    logs = tempfile.mkdtemp(prefix="nanorun-e2e-bench-")
    load_before = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(t for t, _ in chosen.values())],
        cwd=REPO,
        env={**os.environ, "NANORUN_TEST_LOGS": logs},
    )
    wall = time.time() - start
    records = {}
    for kind, (_, name) in chosen.items():
        path = Path(logs, f"{name}.json")
        records[kind] = json.loads(path.read_text()) if path.exists() else None
    print(
        json.dumps(
            {
                "bench": "e2e_pipeline",
                "passed": proc.returncode == 0,
                "pytest_seconds": round(wall, 1),
                "records": records,
                "cpus": os.cpu_count(),
                "load_before": round(load_before, 2),
                "load_after": round(os.getloadavg()[0], 2),
                "python": platform.python_version(),
            }
        )
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
