"""Wall time of the demo pipeline, stage by stage: what `make demo` runs after setup.

    python bench/demo_pipeline.py                         # examples/tiny.yaml into a fresh temp run dir
    python bench/demo_pipeline.py --file examples/tiny.yaml --run-dir /tmp/tinyrun

Runs `nanorun run FILE --run-dir DIR` (no --serve) as a subprocess on a fresh run directory, then
reads each stage's done.json. Prints one JSON line: total wall seconds, per-stage seconds as each
stage recorded them, the headline metrics (val bpb of pretraining, ChatCORE), CPU count and load.
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

from nanorun.cli.run import load_run_file
from nanorun.operator.reconcile.plan import stage_plan
from nanorun.pipeline.progress import read_done

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", default=str(REPO / "examples" / "tiny.yaml"), help="LLMRun file")
    p.add_argument("--run-dir", default=None, help="run directory (default: a fresh temporary one)")
    args = p.parse_args()

    run_dir = args.run_dir or tempfile.mkdtemp(prefix="nanorun-demo-")
    load_before = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "nanorun.cli.main", "run", args.file, "--run-dir", run_dir],
        capture_output=True,
        text=True,
    )
    wall = time.time() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode

    stages, metrics = {}, {}
    for planned in stage_plan(load_run_file(args.file).spec):
        done = read_done(run_dir, planned.key)
        stages[planned.key] = round(done.seconds, 1) if done else None
        if done:
            metrics[planned.key] = {k: v for k, v in done.metrics.items() if isinstance(v, int | float)}
    print(
        json.dumps(
            {
                "bench": "demo_pipeline",
                "file": os.path.relpath(args.file, REPO),
                "wall_seconds": round(wall, 1),
                "stage_seconds": stages,
                "base_val_bpb": metrics.get("pretrain", {}).get("val_bpb"),
                "chatcore": metrics.get("eval", {}).get("ChatCORE"),
                "cpus": os.cpu_count(),
                "load_average_before": round(load_before, 2),
                "machine": platform.machine(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
