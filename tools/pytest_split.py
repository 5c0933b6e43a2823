"""`make test`'s pytest run: the tests that use the session's cluster or the built images (marked
`cluster` by tests/conftest.py) in one pytest process, every other test in a second one beside it.

    python tools/pytest_split.py [PYTEST ARGS...]      # e.g. -q --durations=30

The cluster's tests spend much of their time waiting (on pods, controllers, image pulls), which the
second process's CPU-bound tests fill, at a lower priority (`NICENESS`); one process of each kind
keeps one cluster and one image build. Each process writes its own log under `.artifacts/test-logs/`;
both logs are printed when both have ended (the last lines of each every five minutes meanwhile),
and the exit status is nonzero when either failed. The seconds of each test file and of each test
(`tests-*.json`) and the run's wall time stay there too, and tools/test_budget.py reports the wall
time against the budget and the files that grew.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {"cluster": ["-m", "cluster"], "rest": ["-m", "not cluster"]}
# The rest's niceness: the two together keep every core busy, and the cluster's tests take longer,
# so where both want a core the cluster's get it first (CFS weights 1024 to 335) and the rest fills
# the time the cluster's tests wait.
NICENESS = {"cluster": 0, "rest": 5}
REPORT_EVERY_S = 300


def tail(path: Path, lines: int = 1) -> str:
    text = path.read_text(errors="replace").rstrip().splitlines()
    return "\n".join(text[-lines:])


def main(argv: list[str]) -> int:
    logs = Path(os.environ.get("NANORUN_TEST_LOGS", REPO / ".artifacts" / "test-logs"))
    logs.mkdir(parents=True, exist_ok=True)
    for old in [*logs.glob("durations-*.json"), *logs.glob("tests-*.json"), logs / "wall.json"]:
        old.unlink(missing_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    for name, selection in RUNS.items():
        with open(logs / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "pytest", *selection, *argv],
                cwd=REPO,
                env={**os.environ, "NANORUN_TEST_DURATIONS": str(logs / f"durations-{name}.json")},
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda niceness=NICENESS[name]: os.nice(niceness),
            )
    began = last_report = time.monotonic()
    while any(p.poll() is None for p in procs.values()):
        time.sleep(1)
        if time.monotonic() - last_report >= REPORT_EVERY_S:
            last_report = time.monotonic()
            minutes = (last_report - began) / 60
            for name in procs:
                print(f"[{minutes:.0f} min] {name}: {tail(logs / f'{name}.log')[-200:]}", flush=True)
    (logs / "wall.json").write_text(json.dumps({"seconds": round(time.monotonic() - began, 1)}))
    for name, proc in procs.items():
        print(f"===== pytest -m {' '.join(RUNS[name][1:])!r}: exit {proc.returncode} =====", flush=True)
        print((logs / f"{name}.log").read_text(errors="replace"), flush=True)
    subprocess.run([sys.executable, str(REPO / "tools" / "test_budget.py")], cwd=REPO)
    return max(abs(p.returncode) for p in procs.values())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
