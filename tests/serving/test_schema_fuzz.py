"""Schemathesis fuzzes every operation of the running service's OpenAPI schema, with valid and
invalid inputs: no request may produce a server error (5xx).

The cases come from schemathesis' Hypothesis strategies and run inside one test (its pytest
`from_fixture` integration does not run under pytest 9)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 15  # per operation and mode: enough to reach every validation branch, cheap on 2 cores
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)


def test_no_input_makes_the_service_fail_with_a_server_error(chat_service):
    schema = schemathesis.openapi.from_url(f"{chat_service.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/chat/completions", "GET /v1/models", "GET /healthz"} <= labels
    seen: dict[int, int] = {}

    for operation in operations:
        for mode in MODES:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def call(case):
                if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                    case.body["max_tokens"] = min(case.body["max_tokens"], 64)  # short replies; same validity
                response = case.call(base_url=chat_service.url, timeout=60, headers=chat_service.headers)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                assert response.status_code < 500, (
                    f"{case.method} {case.path} body={case.body!r} -> {response.status_code}: {response.text[:300]}"
                )

            try:
                call()
            except Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE  # nothing to make invalid (no inputs)
    assert seen.get(200) and seen.get(400)  # both valid and invalid requests were really exercised
