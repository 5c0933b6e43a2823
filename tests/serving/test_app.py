"""The chat service under Ray Serve, driven over HTTP by the `openai` client and httpx: API keys,
the body cap and what public responses leave out, completions (plain and streamed), concurrency,
validation, disconnects, metrics and checkpoint rollout."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from nanorun.serving import SERVE_MAX_REQUEST_BYTES, checkpoint_digest
from nanorun.serving.api import MAX_MESSAGE_CHARS, MAX_MESSAGES
from nanorun.serving.metrics import SERIES
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.chat_model import greedy_reply

pytestmark = pytest.mark.slow  # starts Ray once per session (~20 s)

HELLO = [{"role": "user", "content": "Hello! What can you do?"}]


@pytest.fixture(scope="module")
def client(chat_service) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{chat_service.url}/v1", api_key=chat_service.key, max_retries=0, timeout=60
    )


def metric_values(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_api_needs_a_key_which_the_openai_client_sends_as_api_key(chat_service):
    def ask(api_key: str):
        chat = openai.OpenAI(base_url=f"{chat_service.url}/v1", api_key=api_key, max_retries=0, timeout=60)
        return chat.chat.completions.create(model="nanorun", messages=HELLO, max_tokens=2)

    assert ask(chat_service.key).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError) as refused:
        ask(chat_service.key[:-1] + "X")
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    for path in ("/v1/models", "/api/run"):
        response = httpx.get(f"{chat_service.url}{path}", timeout=30)
        assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"]["code"] == "missing_api_key"
    response = httpx.post(f"{chat_service.url}/api/tokenize", json={"text": "hi"}, timeout=30)
    assert response.status_code == 401
    for path in ("/healthz", "/metrics", "/", "/static/chat.js", "/static/auth.js", "/explain/training"):
        assert httpx.get(f"{chat_service.url}{path}", timeout=30).status_code == 200, path


def test_rewriting_the_keys_file_rotates_keys_in_the_running_replica(chat_service):
    keys = Path(chat_service.keys_file)
    new_key = "sk-nanorun-rotated-" + "9" * 32
    pid = chat_service.health()["pid"]
    models = f"{chat_service.url}/v1/models"
    try:
        keys.write_text(f"{new_key}\n")
        assert httpx.get(models, headers=chat_service.headers, timeout=30).status_code == 401
        assert (
            httpx.get(models, headers={"Authorization": f"Bearer {new_key}"}, timeout=30).status_code == 200
        )
    finally:
        keys.write_text(f"{chat_service.key}\n")
    assert httpx.get(models, headers=chat_service.headers, timeout=30).status_code == 200
    assert chat_service.health()["pid"] == pid  # the same replica throughout


def test_a_body_over_the_cap_is_a_413_with_or_without_content_length(chat_service):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * SERVE_MAX_REQUEST_BYTES}]}).encode()
    url = f"{chat_service.url}/v1/chat/completions"
    headers = {"content-type": "application/json", **chat_service.headers}
    sized = httpx.post(url, content=body, headers=headers, timeout=60)

    def chunked():
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    streamed = httpx.post(url, content=chunked(), headers=headers, timeout=60)
    assert "content-length" not in streamed.request.headers
    for response in (sized, streamed):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "request_too_large"


def test_public_responses_name_no_storage_location(chat_service, tiny_chat_run):
    texts = [
        httpx.get(f"{chat_service.url}/healthz", timeout=30).text,
        httpx.get(f"{chat_service.url}/api/run", headers=chat_service.headers, timeout=30).text,
    ]
    for text in texts:
        assert "s3://" not in text and tiny_chat_run not in text and "checkpoints/step_" not in text
        assert str(Path(tiny_chat_run).parent) not in text
    assert json.loads(texts[1])["stage"] == "sft"


def test_openai_client_gets_the_greedy_completion_with_usage(client, tiny_chat_run):
    prompt, generated, text = greedy_reply(tiny_chat_run, HELLO, max_tokens=12)
    reply = client.chat.completions.create(model="nanorun", messages=HELLO, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == text and text
    assert choice.finish_reason == ("length" if len(generated) == 12 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(generated))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_delivers_the_same_text_as_a_plain_request(client, chat_service):
    kwargs = dict(model="nanorun", messages=HELLO, max_tokens=20, temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]  # the fixture's model never stops on its own
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20

    with httpx.stream(
        "POST",
        f"{chat_service.url}/v1/chat/completions",
        timeout=60,
        json={"messages": HELLO, "max_tokens": 5, "stream": True},
        headers=chat_service.headers,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in response.iter_lines() if line]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[0][6:])["object"] == "chat.completion.chunk"


def test_sixteen_concurrent_clients_all_complete_and_decode_together(client, chat_service):
    steps_before = chat_service.health()["decode_steps"]

    def ask(i: int):
        return client.chat.completions.create(
            model="nanorun",
            messages=[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
            max_tokens=32,
            temperature=0.9,
            seed=i,
        )

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(16)))
    assert [r.choices[0].finish_reason for r in replies] == ["length"] * 16  # the model never stops
    generated = sum(r.usage.completion_tokens for r in replies)
    steps = chat_service.health()["decode_steps"] - steps_before
    assert generated == 16 * 32
    # one at a time would need a decode step per generated token; batched, the steps are shared
    assert steps < generated / 3, (steps, generated)


def test_greedy_replies_do_not_depend_on_what_else_is_in_the_batch(client):
    def ask(content: str):
        return (
            client.chat.completions.create(
                model="nanorun", messages=[{"role": "user", "content": content}], max_tokens=24, temperature=0
            )
            .choices[0]
            .message.content
        )

    prompts = [f"Tell me about item {i}" + " please" * i for i in range(8)]
    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


INVALID = [
    ({"messages": HELLO, "temperature": 2.5}, "temperature"),
    ({"messages": HELLO, "temperature": -0.1}, "temperature"),
    ({"messages": HELLO, "top_k": 201}, "top_k"),
    ({"messages": HELLO, "top_k": -1}, "top_k"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "top_p": 1.5}, "top_p"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 4097}, "max_tokens"),
    ({"messages": HELLO, "n": 2}, "n"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]}, "messages.0"),
    (
        {
            "messages": [
                {"role": "user", "content": "x" * 7000},
                {"role": "assistant", "content": "y" * 7000},
            ]
            * 2
            + [{"role": "user", "content": "z" * 7000}] * 1
            + [{"role": "assistant", "content": "w" * 5000}, {"role": "user", "content": "v"}]
        },
        "messages",
    ),
    (
        {
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
            * (MAX_MESSAGES // 2)
            + [{"role": "user", "content": "c"}]
        },
        "messages",
    ),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "a"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": "hello"}, "messages"),
    ({"messages": HELLO, "stream": "maybe"}, "stream"),
]


@pytest.mark.parametrize(("body", "param"), INVALID, ids=[p + str(i) for i, (_, p) in enumerate(INVALID)])
def test_invalid_requests_get_a_400_with_an_openai_error_body(chat_service, body, param):
    response = chat_service.post("/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(param)
    assert len(error["message"]) > 10


@pytest.mark.parametrize("payload", [b"{not json", b"", b"[1, 2]", b"\xff\xfe", b'{"messages": [}'])
def test_malformed_bodies_are_a_400_not_a_500(chat_service, payload):
    response = httpx.post(
        f"{chat_service.url}/v1/chat/completions",
        content=payload,
        timeout=30,
        headers={"content-type": "application/json", **chat_service.headers},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


def test_openai_client_raises_bad_request_with_the_reason(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="nanorun", messages=HELLO, temperature=3.0)


def test_unknown_routes_answer_in_openai_error_format(chat_service):
    response = httpx.get(f"{chat_service.url}/v1/nothing-here", timeout=30, headers=chat_service.headers)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{chat_service.url}/v1/nothing-here", timeout=30).status_code == 401  # the key first


def test_models_health_and_web_ui_are_served(chat_service, tiny_chat_run):
    models = httpx.get(f"{chat_service.url}/v1/models", timeout=30, headers=chat_service.headers).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "nanorun"
    health = chat_service.health()
    assert health["ready"] and health["slots"] == 16 and (health["stage"], health["step"]) == ("sft", 1)
    assert health["checkpoint_digest"] == checkpoint_digest(f"{tiny_chat_run}/sft/checkpoints/step_000001")
    page = httpx.get(f"{chat_service.url}/", timeout=30)
    assert page.status_code == 200 and "nanorun chat" in page.text
    script = httpx.get(f"{chat_service.url}/static/chat.js", timeout=30)
    assert script.status_code == 200 and "v1/chat/completions" in script.text
    assert httpx.get(f"{chat_service.url}/static/..%2Fapp.py", timeout=30).status_code == 404


def test_a_long_conversation_is_trimmed_and_the_response_says_so(chat_service):
    messages = []
    for i in range(40):
        messages += [
            {"role": "user", "content": f"message {i} " + "lorem ipsum " * 20},
            {"role": "assistant", "content": "ok " * 30},
        ]
    messages.append({"role": "user", "content": "last"})
    response = chat_service.post("/v1/chat/completions", {"messages": messages, "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert "dropped the" in response.headers["x-nanorun-notice"]


def test_client_disconnect_frees_its_slot(chat_service):
    url = chat_service.url
    before = metric_values(url)[("nanorun_serve_generated_tokens_total", ())]
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        timeout=60,
        json={"messages": HELLO, "max_tokens": 4000, "temperature": 1.0, "top_k": 50, "stream": True},
        headers=chat_service.headers,
    ) as response:
        lines = response.iter_lines()
        next(lines), next(lines)  # the role chunk and the first token, then hang up
    deadline = time.monotonic() + 10
    while chat_service.health()["inflight"] != 0:
        assert time.monotonic() < deadline, "the disconnected request still holds its row"
        time.sleep(0.05)
    generated = metric_values(url)[("nanorun_serve_generated_tokens_total", ())] - before
    context_room = chat_service.health()["context"] - 20
    assert generated < context_room  # it stopped early instead of generating to the end


def test_metrics_expose_every_serving_series(client, chat_service):
    before = metric_values(chat_service.url)
    client.chat.completions.create(model="nanorun", messages=HELLO, max_tokens=3)
    chat_service.post("/v1/chat/completions", {"messages": HELLO, "top_k": 999})
    httpx.post(f"{chat_service.url}/v1/chat/completions", json={"messages": HELLO}, timeout=30)
    values = metric_values(chat_service.url)
    names = {name for name, _ in values}
    for series in SERIES:
        assert series in names or f"{series}_count" in names, series
    for reason in ("too_large", "rate_limited"):
        assert ("nanorun_serve_refused_requests_total", (("reason", reason),)) in values

    def added(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return values[key] - before.get(key, 0.0)

    # one completion of 3 tokens (the model never stops on its own), one 400, one 401
    assert added("nanorun_serve_requests_total", status="200") == 1
    assert added("nanorun_serve_requests_total", status="400") == 1
    assert added("nanorun_serve_requests_total", status="401") == 1
    assert added("nanorun_serve_refused_requests_total", reason="unauthorized") == 1
    assert added("nanorun_serve_generated_tokens_total") == 3
    assert added("nanorun_serve_time_to_first_token_seconds_count") == 1
    assert added("nanorun_serve_request_seconds_count") == 1  # what reached generation
    assert values[("nanorun_serve_inflight_requests", ())] == 0


def test_a_new_checkpoint_is_loaded_without_restarting_the_replica(
    client, chat_service, tiny_chat_run, tiny_chat_run_v2
):
    kwargs = dict(model="nanorun", messages=HELLO, max_tokens=24, temperature=0)
    pid = chat_service.health()["pid"]
    before = client.chat.completions.create(**kwargs).choices[0].message.content
    try:
        chat_service.deploy(tiny_chat_run_v2)
        health = chat_service.health()
        assert health["pid"] == pid  # reconfigure(), not a new replica
        assert health["checkpoint_digest"] == checkpoint_digest(
            f"{tiny_chat_run_v2}/sft/checkpoints/step_000001"
        )
        assert client.chat.completions.create(**kwargs).choices[0].message.content != before
    finally:
        chat_service.deploy(tiny_chat_run)
    assert client.chat.completions.create(**kwargs).choices[0].message.content == before


def test_a_checkpoint_path_is_loaded_again_when_the_config_id_it_must_have_changes(tiny_chat_run):
    """A stage that ran again after a spec change may write its final checkpoint to the same path:
    user_config's "version" (the config id the checkpoint must carry) makes the replica reload it."""
    import asyncio

    from nanorun.serving.app import ChatDeployment, LoadedModel
    from nanorun.trainer.chat import engine
    from nanorun.trainer.training import checkpoint

    async def scenario():
        # The replica as Ray Serve builds it (its class without the ingress wrapper's async __init__).
        deployment = object.__new__(ChatDeployment.func_or_class)
        deployment.slots, deployment.device, deployment.lock = 1, "cpu", asyncio.Lock()
        deployment.loaded = first = LoadedModel(tiny_chat_run, None, 1, "cpu")
        saved_id = first.info["config_id"]
        assert saved_id == str(
            checkpoint.read_meta(engine.resolve_checkpoint(tiny_chat_run)).get("config_id") or ""
        )
        await deployment.reconfigure({"checkpoint": tiny_chat_run, "version": saved_id})
        assert deployment.loaded is first  # the same weights: nothing to load
        await deployment.reconfigure({"checkpoint": tiny_chat_run, "version": "a-newer-config"})
        assert deployment.loaded is not first and deployment.loaded.source == first.source
        deployment.loaded.scheduler.close()

    asyncio.run(scenario())
