"""Shared pytest fixtures. Each fixture module lives in tests/fixtures/ and is registered here."""

import json
import os
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.kube",
    "tests.fixtures.tiny_run",
    "tests.fixtures.post_training",
    "tests.fixtures.hub",
    "tests.fixtures.chat_model",
    "tests.fixtures.metrics",
    "tests.fixtures.threads",
    "tests.fixtures.images",
]


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by markers
def pytest_collection_modifyitems(config, items) -> None:
    """The tests that use the session's cluster or the built images are marked `cluster`:
    `make test` runs them in one pytest process and the others in a second one beside it
    (tools/pytest_split.py). The end-to-end runs go last: they train with the real trainer on the
    cluster's CPUs, and run twice as fast once the other process's CPU-bound tests are done, while
    the cluster's other tests mostly wait on controllers and fit beside them."""
    for item in items:
        if {"kube", "images"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
    items.sort(key=lambda item: item.nodeid.startswith("tests/e2e/"))


_seconds_by_test: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    """Sum each test's setup, call and teardown time (session fixtures count where they start)."""
    _seconds_by_test[report.nodeid] = _seconds_by_test.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session) -> None:
    """With NANORUN_TEST_DURATIONS set (tools/pytest_split.py sets it), write the seconds per test
    file there as JSON, for tools/test_budget.py to compare with tests/durations.json, and each
    test's seconds beside it (`tests-<name>.json`), slowest first."""
    out = os.environ.get("NANORUN_TEST_DURATIONS")
    if not out:
        return
    by_file: dict[str, float] = {}
    for nodeid, seconds in _seconds_by_test.items():
        path = nodeid.split("::", 1)[0]
        by_file[path] = by_file.get(path, 0.0) + seconds
    Path(out).write_text(json.dumps({k: round(v, 1) for k, v in sorted(by_file.items())}, indent=1))
    slowest = sorted(_seconds_by_test.items(), key=lambda item: -item[1])
    Path(out).with_name(Path(out).name.replace("durations-", "tests-")).write_text(
        json.dumps({k: round(v, 1) for k, v in slowest}, indent=1)
    )
