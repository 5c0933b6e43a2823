"""The chat API's access rules (nanorun.serving.access) on a small FastAPI app with the same middleware
the service installs, driven by Starlette's TestClient: API keys (missing, wrong, right, rotated by
rewriting the file or a mounted Secret's directory), open routes, the body size cap with and without
Content-Length, and per-key rate limits with Retry-After. No Ray: fast. The same rules through Ray
Serve's HTTP proxy: tests/serving/test_app.py."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from nanorun.serving.access import (
    MIN_KEY_CHARS,
    AccessGuard,
    AccessPolicy,
    KeysFile,
    RateLimiter,
    is_protected,
    parse_keys,
)

KEY = "sk-nanorun-" + "a" * 32
OTHER_KEY = "sk-nanorun-" + "b" * 32
NEW_KEY = "sk-nanorun-rotated-" + "c" * 40


def app_with(policy: AccessPolicy | None) -> tuple[FastAPI, list[str]]:
    """Routes shaped like the service's: protected /v1 and /api, open /healthz, /metrics, pages."""
    app = FastAPI()
    parsed: list[str] = []
    app.add_middleware(AccessGuard, policy=lambda: policy)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.body()
        parsed.append(request.url.path)
        return {"bytes": len(body), "echo": json.loads(body or b"{}")}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "nanorun"}]}

    @app.get("/api/run")
    async def run() -> dict:
        return {"stage": "sft"}

    for path in ("/healthz", "/metrics", "/", "/static/chat.js", "/explain/training"):
        app.add_api_route(path, lambda: {"open": True}, methods=["GET"])
    return app, parsed


def keys_file(tmp_path: Path, *keys: str) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text("# the chat API's keys\n" + "".join(f"{k}\n" for k in keys) + "\n")
    return path


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and len(body["error"]["message"]) > 10
    return body["error"]


@pytest.fixture
def refusals() -> list[str]:
    return []


@pytest.fixture
def guarded(tmp_path, refusals):
    policy = AccessPolicy.create(
        api_keys_file=str(keys_file(tmp_path, KEY, OTHER_KEY)), refused=refusals.append
    )
    app, parsed = app_with(policy)
    return TestClient(app), parsed


def test_no_key_is_a_401_in_openais_shape_with_a_bearer_challenge(guarded, refusals):
    client, parsed = guarded
    response = client.post("/v1/chat/completions", json={"messages": []})
    error = assert_openai_error(response, 401, "missing_api_key")
    assert error["type"] == "invalid_request_error" and "Authorization: Bearer" in error["message"]
    assert response.headers["www-authenticate"] == 'Bearer realm="nanorun"'
    assert parsed == [] and refusals == ["unauthorized"]


@pytest.mark.parametrize(
    "header",
    [
        {"Authorization": f"Bearer {OTHER_KEY[:-1]}x"},
        {"Authorization": f"Bearer {KEY}{KEY}"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer "},
        {"Authorization": KEY},
    ],
    ids=["wrong-key", "longer-key", "basic-scheme", "empty", "no-scheme"],
)
def test_a_wrong_key_is_a_401(guarded, header):
    client, parsed = guarded
    response = client.get("/v1/models", headers=header)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] in ("invalid_api_key", "missing_api_key")
    assert parsed == []


def test_a_wrong_key_is_named_invalid_token_in_the_challenge(guarded):
    client, _ = guarded
    response = client.get("/api/run", headers=bearer(OTHER_KEY.replace("b", "c")))
    assert_openai_error(response, 401, "invalid_api_key")
    assert response.headers["www-authenticate"] == 'Bearer realm="nanorun", error="invalid_token"'


def test_each_right_key_gets_through(guarded):
    client, parsed = guarded
    for key in (KEY, OTHER_KEY):
        response = client.post("/v1/chat/completions", json={"messages": ["hi"]}, headers=bearer(key))
        assert response.status_code == 200 and response.json()["echo"] == {"messages": ["hi"]}
        assert client.get("/api/run", headers=bearer(key)).json() == {"stage": "sft"}
    assert client.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200
    assert parsed == ["/v1/chat/completions"] * 2


def test_probes_metrics_and_pages_stay_open(guarded):
    client, _ = guarded
    for path in ("/healthz", "/metrics", "/", "/static/chat.js", "/explain/training"):
        assert client.get(path).status_code == 200, path
    assert not is_protected("/v1x") and is_protected("/v1") and is_protected("/api/tokenize")


def test_rewriting_the_keys_file_rotates_keys_without_a_restart(tmp_path):
    path = keys_file(tmp_path, KEY)
    client = TestClient(app_with(AccessPolicy.create(api_keys_file=str(path)))[0])
    assert client.get("/v1/models", headers=bearer(KEY)).status_code == 200
    path.write_text(NEW_KEY + "\n")  # the same file, rewritten in place
    assert client.get("/v1/models", headers=bearer(KEY)).status_code == 401
    assert client.get("/v1/models", headers=bearer(NEW_KEY)).status_code == 200
    path.unlink()  # gone: nothing is let through
    assert client.get("/v1/models", headers=bearer(NEW_KEY)).status_code == 401


def test_a_mounted_secrets_update_rotates_keys(tmp_path):
    """A Secret volume as the kubelet writes it: each data key a symlink into `..data`, itself a
    symlink to a timestamped directory that an update replaces at once."""
    mount = tmp_path / "api-keys"
    mount.mkdir()

    def publish(version: str, data: dict[str, str]) -> None:
        (mount / version).mkdir()
        for name, value in data.items():
            (mount / version / name).write_text(value)
        os.symlink(version, mount / "..data_tmp")
        os.replace(mount / "..data_tmp", mount / "..data")
        for name in data:
            if not (mount / name).is_symlink():
                os.symlink(f"..data/{name}", mount / name)

    publish("..2024_01_01", {"alice": KEY, "team": f"{OTHER_KEY}\n# spare\n"})
    client = TestClient(app_with(AccessPolicy.create(api_keys_file=str(mount)))[0])
    assert [client.get("/v1/models", headers=bearer(k)).status_code for k in (KEY, OTHER_KEY)] == [200, 200]
    publish("..2024_01_02", {"alice": NEW_KEY, "team": OTHER_KEY})
    codes = [client.get("/v1/models", headers=bearer(k)).status_code for k in (KEY, OTHER_KEY, NEW_KEY)]
    assert codes == [401, 200, 200]


def test_keys_files_skip_comments_blanks_and_non_keys(tmp_path, caplog):
    text = f"# comment\n\n  {KEY}  \nshort\n{'x' * MIN_KEY_CHARS} with space\n{OTHER_KEY}==\n"
    assert parse_keys(text, "keys.txt") == [KEY, f"{OTHER_KEY}=="]
    assert "keys.txt line 4 is not an API key" in caplog.text and "line 5" in caplog.text
    assert "short" not in caplog.text  # the text of a bad line may be a key: never logged
    assert KeysFile(tmp_path / "missing").digests() == ()


def test_unauthenticated_access_must_be_chosen():
    with pytest.raises(ValueError, match="exactly one"):
        AccessPolicy.create()
    with pytest.raises(ValueError, match="exactly one"):
        AccessPolicy.create(api_keys_file="keys.txt", allow_unauthenticated=True)
    client = TestClient(app_with(AccessPolicy.create(allow_unauthenticated=True))[0])
    assert client.get("/v1/models").status_code == 200


def test_an_unconfigured_guard_lets_nothing_protected_through():
    client = TestClient(app_with(None)[0])
    assert client.get("/v1/models", headers=bearer(KEY)).status_code == 503
    assert client.get("/healthz").status_code == 200


def test_a_body_over_the_cap_is_a_413_before_it_is_parsed(tmp_path, refusals):
    policy = AccessPolicy.create(
        api_keys_file=str(keys_file(tmp_path, KEY)), max_request_bytes=1024, refused=refusals.append
    )
    app, parsed = app_with(policy)
    client = TestClient(app)
    fits = json.dumps({"text": "x" * 1000}).encode()
    assert len(fits) <= 1024
    assert client.post("/v1/chat/completions", content=fits, headers=bearer(KEY)).json()["bytes"] == len(fits)
    big = json.dumps({"text": "x" * 1100}).encode()
    response = client.post("/v1/chat/completions", content=big, headers=bearer(KEY))
    assert "content-length" in response.request.headers
    error = assert_openai_error(response, 413, "request_too_large")
    assert "1024 bytes" in error["message"]

    def chunks():  # no Content-Length: Transfer-Encoding: chunked
        yield big

    response = client.post("/v1/chat/completions", content=chunks(), headers=bearer(KEY))
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, "request_too_large")
    assert parsed == ["/v1/chat/completions"] and refusals == ["too_large", "too_large"]
    # the cap holds on open routes too; the key is checked first on protected ones
    assert client.post("/healthz", content=big).status_code == 413
    assert client.post("/v1/chat/completions", content=big).status_code == 401


def test_a_chunked_body_is_counted_as_it_arrives_and_handed_on_whole():
    """The middleware on its own, fed a chunked body in pieces as a server does: over the cap it
    answers 413 without calling the app, and under it the app receives every piece."""
    received: list[bytes] = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            received.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = AccessGuard(
        app, policy=lambda: AccessPolicy.create(allow_unauthenticated=True, max_request_bytes=1024)
    )

    def run(pieces: list[bytes]) -> tuple[int, int]:
        messages = [
            {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
            for i, p in enumerate(pieces)
        ]
        pulled = 0

        async def receive():
            nonlocal pulled
            pulled += 1
            return messages.pop(0)

        sent = []

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": [(b"transfer-encoding", b"chunked")],
            "client": ("10.0.0.1", 1234),
        }
        asyncio.run(guard(scope, receive, send))
        return sent[0]["status"], pulled

    assert run([b"a" * 400] * 2) == (200, 2) and received == [b"a" * 400] * 2
    received.clear()
    status, pulled = run([b"a" * 400] * 10)
    assert status == 413 and pulled == 3 and received == []  # stopped reading at the third piece


def test_a_key_over_its_rate_limit_gets_a_429_with_retry_after_and_other_keys_do_not(tmp_path, refusals):
    now = [1000.0]
    policy = AccessPolicy(
        keys=KeysFile(keys_file(tmp_path, KEY, OTHER_KEY)),
        limiter=RateLimiter(3, clock=lambda: now[0]),
        refused=refusals.append,
    )
    client = TestClient(app_with(policy)[0])
    assert [client.get("/v1/models", headers=bearer(KEY)).status_code for _ in range(3)] == [200] * 3
    response = client.get("/api/run", headers=bearer(KEY))
    error = assert_openai_error(response, 429, "rate_limit_exceeded")
    assert response.headers["retry-after"] == "20"  # 3 a minute: a token every 20 s
    assert error["type"] == "requests" and "3 requests per minute" in error["message"]
    assert client.get("/v1/models", headers=bearer(OTHER_KEY)).status_code == 200  # its own bucket
    assert client.get("/healthz").status_code == 200  # probes are not limited
    now[0] += 15
    assert client.get("/v1/models", headers=bearer(KEY)).headers["retry-after"] == "5"
    now[0] += 5
    assert client.get("/v1/models", headers=bearer(KEY)).status_code == 200
    assert refusals == ["rate_limited", "rate_limited"]


def test_without_keys_the_limit_is_per_client_address():
    now = [0.0]
    policy = AccessPolicy(keys=None, limiter=RateLimiter(2, clock=lambda: now[0]))
    app = app_with(policy)[0]
    one, two = TestClient(app, client=("10.0.0.1", 1)), TestClient(app, client=("10.0.0.2", 1))
    assert [one.get("/v1/models").status_code for _ in range(3)] == [200, 200, 429]
    assert two.get("/v1/models").status_code == 200
    assert "per client address" in one.get("/v1/models").json()["error"]["message"]


def test_the_rate_limiter_refills_and_forgets_the_least_recent_clients():
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0], max_buckets=2)
    assert all(limiter.acquire("a") == 0 for _ in range(60))
    assert limiter.acquire("a") == pytest.approx(1.0)
    now[0] += 0.5
    assert limiter.acquire("a") == pytest.approx(0.5)
    limiter.acquire("b")
    limiter.acquire("c")
    assert "a" not in limiter._buckets and len(limiter._buckets) == 2
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_the_app_needs_keys_or_the_opt_out_and_hands_its_rules_to_each_replica():
    from nanorun.serving.app import build_app

    with pytest.raises(ValueError, match="exactly one of api_keys_file"):
        build_app({"checkpoint": "/runs/x"})
    deployment = build_app(
        {"api_keys_file": "/etc/keys", "max_request_bytes": 4096, "rate_limit_per_minute": 9}
    )._bound_deployment
    assert deployment.init_kwargs == {
        "slots": 16,
        "device": "auto",
        "api_keys_file": "/etc/keys",
        "allow_unauthenticated": False,
        "max_request_bytes": 4096,
        "rate_limit_per_minute": 9,
    }
