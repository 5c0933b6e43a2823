"""How long `make test` took, against its budget, and which test files grew.

    python tools/test_budget.py                # compare the last run's durations with the baseline
    python tools/test_budget.py --write        # make the last run's durations the baseline

`make test` (tools/pytest_split.py) leaves the seconds each test file took, per pytest process, in
`.artifacts/test-logs/durations-*.json` and the wall time in `.artifacts/test-logs/wall.json`; the
baseline, committed, is tests/durations.json. The report lists the files that grew by more than
GROWTH_SECONDS and GROWTH_RATIO together, the new files, and the wall time against the budget. It
reports and never fails: the machine's load changes times from run to run, and a slower run is a
question for the change that made it, not a failed test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "tests" / "durations.json"
GROWTH_SECONDS = 20.0
GROWTH_RATIO = 1.25


def logs_dir() -> Path:
    return Path(os.environ.get("NANORUN_TEST_LOGS", REPO / ".artifacts" / "test-logs"))


def last_run(logs: Path) -> tuple[dict[str, float], float | None]:
    """(seconds per test file over every pytest process, wall seconds of the whole run or None)."""
    files: dict[str, float] = {}
    for path in sorted(logs.glob("durations-*.json")):
        for name, seconds in json.loads(path.read_text()).items():
            files[name] = files.get(name, 0.0) + seconds
    wall = logs / "wall.json"
    return files, json.loads(wall.read_text())["seconds"] if wall.exists() else None


def report(files: dict[str, float], wall: float | None, baseline: dict) -> list[str]:
    before: dict[str, float] = baseline.get("files", {})
    lines = []
    budget = baseline.get("budget_seconds")
    if wall is not None and budget:
        verdict = "within" if wall <= budget else "OVER"
        lines.append(
            f"make test's pytest took {wall / 60:.1f} min: {verdict} its budget of {budget / 60:.0f} min"
        )
    grew = [
        (name, before[name], now)
        for name, now in files.items()
        if name in before and now - before[name] > GROWTH_SECONDS and now > before[name] * GROWTH_RATIO
    ]
    for name, was, now in sorted(grew, key=lambda g: g[1] - g[2]):
        lines.append(f"grew: {name} {was:.0f} s -> {now:.0f} s")
    for name in sorted(set(files) - set(before)):
        if files[name] > GROWTH_SECONDS:
            lines.append(f"new: {name} {files[name]:.0f} s")
    return lines


def main(argv: list[str]) -> int:
    files, wall = last_run(logs_dir())
    if not files:
        print(f"no durations in {logs_dir()}: run `make test` first", file=sys.stderr)
        return 1
    baseline = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    if "--write" in argv:
        BASELINE.write_text(
            json.dumps(
                {"budget_seconds": baseline.get("budget_seconds"), "files": files}, indent=1, sort_keys=True
            )
            + "\n"
        )
        print(
            f"wrote {BASELINE.relative_to(REPO)}: {len(files)} files, {sum(files.values()) / 60:.1f} min in all"
        )
        return 0
    for line in report(files, wall, baseline) or ["no test file grew"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
