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


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by markers
def pytest_collection_modifyitems(config, items) -> None:
    """The tests that use the session's cluster or the built images are marked `cluster`:
    `make test` runs them in one pytest process and the others in a second one beside it
    (tools/pytest_split.py)."""
    for item in items:
        if {"kube", "images"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
