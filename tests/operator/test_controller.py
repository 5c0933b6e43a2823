"""The reconcile loop's Kubernetes client: every call bounded in time, and the answers that mean
"already done" on a repeated reconcile."""

from __future__ import annotations

import contextlib

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.config import kube_config
from nanorun.operator.loop import controller
from nanorun.operator.loop.controller import unless_status


def test_every_call_of_the_reconcile_loops_client_has_a_timeout(tmp_path, monkeypatch):
    """An API server that restarts or vanishes behind a dead connection must not hold a reconcile
    worker for good: each call the controller's client makes gets a timeout unless it names one."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "config").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "config"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    api = controller.api_client()
    seen = []

    def request(*args, **kwargs):
        seen.append(kwargs["timeout"])
        raise ConnectionError("no server here")

    monkeypatch.setattr(api.rest_client.pool_manager, "request", request)
    core = client.CoreV1Api(api)
    for timeout in (None, 5):
        with contextlib.suppress(ConnectionError):
            core.list_namespace(_request_timeout=timeout)
    assert (seen[0].connect_timeout, seen[0].read_timeout) == controller.REQUEST_TIMEOUT
    assert seen[1].total == 5


def test_a_create_that_finds_its_object_is_no_error_and_any_other_refusal_is():
    """A reconcile that runs again after an operator restart creates what is already there (409)
    and deletes what is already gone (404); a refusal of any other kind still raises."""
    calls = []

    def answer(status):
        def call(*args, **kwargs):
            calls.append((args, kwargs))
            if status:
                raise ApiException(status=status)

        return call

    assert unless_status(409, answer(None), "ns", body={"a": 1}) is True
    assert calls == [(("ns",), {"body": {"a": 1}})]
    assert unless_status(409, answer(409)) is False
    assert unless_status(404, answer(404)) is False
    for status in (403, 404, 500):
        with pytest.raises(ApiException):
            unless_status(409, answer(status))
