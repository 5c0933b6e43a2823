"""tools/test_budget.py: which test files grew, and the wall time against the budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tools.test_budget import REPO, report

BASELINE = {"budget_seconds": 1800, "files": {"tests/a.py": 100.0, "tests/b.py": 10.0, "tests/c.py": 60.0}}


def test_a_file_grows_only_by_both_seconds_and_ratio():
    now = {
        "tests/a.py": 150.0,
        "tests/b.py": 25.0,
        "tests/c.py": 79.0,
        "tests/new.py": 30.0,
        "tests/tiny.py": 2.0,
    }
    assert report(now, 1700.0, BASELINE) == [
        "make test's pytest took 28.3 min: within its budget of 30 min",
        "grew: tests/a.py 100 s -> 150 s",  # +50 s, x1.5
        # b: x2.5 but only +15 s; c: +19 s
        "new: tests/new.py 30 s",  # tiny.py is new but under 20 s
    ]
    assert report({"tests/a.py": 90.0}, 1900.0, BASELINE) == [
        "make test's pytest took 31.7 min: OVER its budget of 30 min"
    ]


def test_the_command_adds_up_every_process_durations(tmp_path):
    (tmp_path / "durations-cluster.json").write_text(json.dumps({"tests/zz_made_up.py": 70.0}))
    (tmp_path / "durations-rest.json").write_text(
        json.dumps({"tests/zz_made_up.py": 80.0, "tests/b.py": 1.0})
    )
    (tmp_path / "wall.json").write_text(json.dumps({"seconds": 600.0}))
    env = {"NANORUN_TEST_LOGS": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "tools/test_budget.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    budget = json.loads(Path(REPO, "tests", "durations.json").read_text())["budget_seconds"]
    assert out.splitlines() == [
        f"make test's pytest took 10.0 min: within its budget of {budget / 60:.0f} min",
        "new: tests/zz_made_up.py 150 s",
    ]
