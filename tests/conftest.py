"""Shared pytest fixtures. Each fixture module lives in tests/fixtures/ and is registered here."""

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
