"""Shared pytest fixtures. Each fixture module lives in tests/fixtures/ and is registered here."""

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


def pytest_collection_modifyitems(config, items) -> None:
    """`make test` runs pytest in two workers (pytest-xdist, `--dist loadgroup`). The tests that use
    the session's cluster or the built images share one worker, so that one cluster runs and the
    images are built once; the other tests are balanced over both workers."""
    for item in items:
        if {"kube", "images"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("cluster"))
