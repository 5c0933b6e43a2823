"""The Ray Serve chat application: OpenAI-compatible API, web UI and metrics over one checkpoint.

    from ray import serve
    from nanorun.serving.app import build_app
    serve.run(build_app({"checkpoint": "s3://bucket/runs/d20/sft"}), route_prefix="/")

or, on a cluster, a RayService whose serveConfigV2 names `nanorun.serving.SERVE_IMPORT_PATH`.

Routes: `POST /v1/chat/completions` (stream true: server-sent events in OpenAI's chunk format
ending with `data: [DONE]`; false: one JSON with `usage`), `GET /v1/models`, `GET /healthz`,
`GET /metrics` (Prometheus, names in `nanorun.serving.metrics`), the web UI at `/`, and the
explainer pages (`/explain/tokenizer|next-token|attention|training`) with their JSON endpoints
(`POST /api/tokenize`, `/api/bpe-replay`, `/api/next-token`, `/api/attention`, `GET /api/run`;
computed by `nanorun.serving.explain`). On a cluster each replica also serves its metrics on its
pod's port `$NANORUN_SERVE_METRICS_PORT`.

Every `/v1/*` and `/api/*` route needs an API key (`Authorization: Bearer <key>`) and counts
against the key's rate limit; every request body is capped (`nanorun.serving.access`, whose
`AccessGuard` runs in front of the routes). `/healthz`, `/metrics` and the pages stay open, and no
response names a storage location: `/healthz` and `/api/run` say which stage and step is served,
and `/healthz` gives `checkpoint_digest(uri)` to tell checkpoints apart.

- One deployment, `ChatDeployment`, holds the model and a continuous-batching `Scheduler`
  (`nanorun.serving.batching`): concurrent requests decode together.
- The checkpoint is the deployment's `user_config` (`{"checkpoint": URI, "tokenizer": URI?}`):
  `reconfigure()` loads a new one into the running replica, requests in flight finish on the old
  model, new ones go to the new model; the replica is not restarted.
- The explainer endpoints run on a small thread pool of their own (`EXPLAIN_WORKERS` threads per
  loaded model): plain forward passes over the same weights, without a KV cache, so they neither
  wait for nor hold the batching thread, and the event loop stays free.
- Bad input is a 400 with OpenAI's error body, never a 500. A conversation longer than the context
  is trimmed from its oldest turns, and the response says so in the `x-nanorun-notice` header.
- `build_app(args)` takes `checkpoint`, `tokenizer`, `slots`, `device`, `num_gpus`, `num_cpus`,
  `max_ongoing_requests` (default 2 x slots: a full batch and as many queued),
  `autoscaling_config` (Ray Serve's fields, e.g. min/max_replicas; target_ongoing_requests
  defaults to slots, so a replica is scaled out once its batch is full), and the access rules:
  `api_keys_file` (a keys file, or a mounted Secret's directory, read on the replicas) or
  `allow_unauthenticated: true`, exactly one of them; `max_request_bytes` (1 MiB) and
  `rate_limit_per_minute` (per key and replica; 0 = unlimited).
"""

# No `from __future__ import annotations` here: FastAPI must see the route signatures' real types
# (Ray Serve's ingress rebuilds the methods, and string annotations would not resolve).
import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from nanorun.serving import SERVE_DEPLOYMENT_NAME, SERVE_SLOTS, access, checkpoint_digest
from nanorun.serving.access import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_RATE_LIMIT_PER_MINUTE, AccessGuard
from nanorun.serving.api import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    completion_id,
    error_body,
    now,
    validation_error_body,
)
from nanorun.serving.explain import (
    AttentionRequest,
    BpeReplayRequest,
    ExplainInputError,
    NextTokenRequest,
    TokenizeRequest,
    stage_of,
)
from nanorun.serving.metrics import export_replica_metrics, serve_metrics
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("nanorun.serving")

MODEL_ID = "nanorun"
STATIC_DIR = Path(__file__).parent / "static"
CHAT_PATH = "/v1/chat/completions"
EXPLAIN_PAGES = ("tokenizer", "next-token", "attention", "training")
EXPLAIN_WORKERS = 2  # explainer computations at once per replica; more wait their turn
ACCESS_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "no API key, or not a valid one"},
    413: {"model": ErrorResponse, "description": "request body over the size cap"},
    429: {"model": ErrorResponse, "description": "rate limit reached; see Retry-After"},
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request"},
    **ACCESS_RESPONSES,
    503: {"model": ErrorResponse, "description": "no model loaded yet"},
}

api = FastAPI(
    title="nanorun chat",
    version="0.1.0",
    description="OpenAI-compatible chat completions over a nanorun checkpoint, with continuous "
    "batching. Limits: see nanorun.serving.api.",
)


def _error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(validation_error_body(list(exc.errors())), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error(exc.status_code, str(exc.detail), type_, headers=getattr(exc, "headers", None))


# Added before the request counter, so the counter wraps it and sees refused chat requests' statuses.
api.add_middleware(AccessGuard, policy=access.replica_policy)


@api.middleware("http")
async def _count_requests(request: Request, call_next: Any) -> Response:
    response = await call_next(request)
    if request.url.path.endswith(CHAT_PATH):
        serve_metrics().requests.labels(status=str(response.status_code)).inc()
    return response


class AppArgs(BaseModel):
    """`build_app`'s arguments (RayService serveConfigV2 `args`, or `nanorun serve` flags)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(default=None, description="checkpoint, stage or run URI (path or s3://)")
    tokenizer: str | None = Field(default=None, description="tokenizer dir; default <run-dir>/tokenizer")
    slots: int = Field(
        default=SERVE_SLOTS, ge=1, le=1024, description="KV-cache rows: requests decoded together"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_gpus: float = Field(default=0, ge=0)
    num_cpus: float = Field(default=1, ge=0)
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    api_keys_file: str | None = Field(
        default=None, description="file of API keys, one per line, or a directory of such files (a Secret)"
    )
    allow_unauthenticated: bool = Field(default=False, description="serve /v1 and /api without keys")
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, ge=1024, le=64 * 1024 * 1024)
    rate_limit_per_minute: int = Field(
        default=DEFAULT_RATE_LIMIT_PER_MINUTE, ge=0, description="per key and replica; 0 = unlimited"
    )

    @model_validator(mode="after")
    def _one_way_in(self) -> "AppArgs":
        if bool(self.api_keys_file) == self.allow_unauthenticated:
            raise ValueError(
                "give exactly one of api_keys_file (the API keys) and allow_unauthenticated: true"
            )
        return self


class LoadedModel:
    """A model, its tokenizer and the scheduler that batches requests over it."""

    def __init__(self, checkpoint: str, tokenizer: str | None, slots: int, device: str) -> None:
        from nanorun.serving.batching import Scheduler
        from nanorun.trainer.chat.engine import default_device, load_chat_model

        torch_device = default_device() if device == "auto" else device
        self.model, self.tokenizer, self.info = load_chat_model(checkpoint, tokenizer, torch_device)
        self.source = (checkpoint, tokenizer)
        self.scheduler = Scheduler(self.model, self.tokenizer, slots=slots, metrics=serve_metrics()).start()
        self.explain_pool = ThreadPoolExecutor(EXPLAIN_WORKERS, thread_name_prefix="nanorun-explain")
        log.info(
            "loaded %s (tokenizer %s) on %s", self.info["checkpoint"], self.info["tokenizer"], torch_device
        )


# Everything the routes use is defined above the deployment: Ray Serve's ingress takes a copy of
# this module's globals when it wraps the class, so later definitions would not be visible to it.
class _NotReady(Exception):
    pass


def _not_ready() -> JSONResponse:
    return _error(
        503,
        "no model is loaded yet: set the deployment's user_config.checkpoint",
        "service_unavailable",
        code="not_ready",
    )


async def _explain(loaded: "LoadedModel | None", compute: Callable[..., Any], *args: Any) -> Any:
    """`compute(model, tokenizer, *args)` on the loaded model's explainer threads, as a response."""
    if loaded is None:
        return _not_ready()

    def run() -> Any:
        import torch

        with torch.inference_mode():
            return compute(loaded.model, loaded.tokenizer, *args)

    try:
        return await asyncio.get_running_loop().run_in_executor(loaded.explain_pool, run)
    except ExplainInputError as e:
        return _error(400, str(e), param=e.param)


async def _complete(events: AsyncIterator[Any], start: float, headers: dict[str, str]) -> JSONResponse:
    parts: list[str] = []
    last = None
    async with contextlib.aclosing(events):
        async for event in events:
            if not parts and event.token is not None:
                serve_metrics().time_to_first_token.observe(time.monotonic() - start)
            parts.append(event.text)
            last = event
    serve_metrics().request_seconds.observe(time.monotonic() - start)
    if last is None or last.finish_reason == "error":
        return _error(500, last.error if last else "generation ended early", "server_error")
    result = ChatCompletion(
        id=completion_id(),
        created=now(),
        model=MODEL_ID,
        choices=[Choice(message=AssistantMessage(content="".join(parts)), finish_reason=last.finish_reason)],
        usage=Usage(
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            total_tokens=last.prompt_tokens + last.completion_tokens,
        ),
    )
    return JSONResponse(result.model_dump(), headers=headers)


def _data(payload: BaseModel | dict[str, Any]) -> str:
    text = (
        payload.model_dump_json(exclude_none=True) if isinstance(payload, BaseModel) else json.dumps(payload)
    )
    return f"data: {text}\n\n"


async def _sse(events: AsyncIterator[Any], start: float, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's streaming format: a role chunk, content chunks, a finish chunk, [DONE]."""
    cid, created = completion_id(), now()

    def chunk(delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=cid, created=created, model=MODEL_ID, choices=[ChunkChoice(delta=delta, finish_reason=finish)]
        )

    first = True
    try:
        yield _data(chunk(Delta(role="assistant", content="")))
        async with contextlib.aclosing(events):
            async for event in events:
                if first and event.token is not None:
                    serve_metrics().time_to_first_token.observe(time.monotonic() - start)
                    first = False
                if event.finish_reason == "error":
                    yield _data(error_body(event.error or "generation failed", "server_error"))
                    break
                if event.text:
                    yield _data(chunk(Delta(content=event.text)))
                if event.finish_reason is not None:
                    yield _data(chunk(Delta(), event.finish_reason))
                    if include_usage:
                        usage = Usage(
                            prompt_tokens=event.prompt_tokens,
                            completion_tokens=event.completion_tokens,
                            total_tokens=event.prompt_tokens + event.completion_tokens,
                        )
                        yield _data(
                            ChatCompletionChunk(
                                id=cid, created=created, model=MODEL_ID, choices=[], usage=usage
                            )
                        )
        yield "data: [DONE]\n\n"
    finally:
        serve_metrics().request_seconds.observe(time.monotonic() - start)


@serve.deployment(name=SERVE_DEPLOYMENT_NAME, max_ongoing_requests=2 * SERVE_SLOTS, health_check_period_s=10)
@serve.ingress(api)
class ChatDeployment:
    def __init__(
        self,
        slots: int = SERVE_SLOTS,
        device: str = "auto",
        checkpoint: str | None = None,
        tokenizer: str | None = None,
        api_keys_file: str | None = None,
        allow_unauthenticated: bool = False,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        rate_limit_per_minute: int = DEFAULT_RATE_LIMIT_PER_MINUTE,
    ) -> None:
        export_replica_metrics()  # on the pod's metrics port, when the pod names one
        access.configure(
            access.AccessPolicy.create(
                api_keys_file,
                allow_unauthenticated,
                max_request_bytes,
                rate_limit_per_minute,
                refused=lambda reason: serve_metrics().refused.labels(reason=reason).inc(),
            )
        )
        self.slots = slots
        self.device = device
        self.loaded: LoadedModel | None = None
        self.lock = asyncio.Lock()
        if checkpoint:
            self.loaded = LoadedModel(checkpoint, tokenizer, slots, device)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load `user_config["checkpoint"]` (and optional `"tokenizer"`) into this running replica,
        unless it is loaded already (and, with `"version"`, saved under that config id)."""
        checkpoint = (user_config or {}).get("checkpoint")
        tokenizer = (user_config or {}).get("tokenizer")
        # The config id the checkpoint must have been saved with: a stage that ran again after a
        # spec change may have written new weights to the same path.
        version = (user_config or {}).get("version", "")
        if not checkpoint:
            return
        async with self.lock:
            loaded = self.loaded
            if (
                loaded is not None
                and loaded.source == (checkpoint, tokenizer)
                and (not version or loaded.info.get("config_id") == version)
            ):
                return
            fresh = await asyncio.to_thread(LoadedModel, checkpoint, tokenizer, self.slots, self.device)
            old, self.loaded = self.loaded, fresh
        if old is not None:  # requests in flight on the old model finish, then its thread ends
            threading.Thread(target=old.scheduler.close, daemon=True).start()

    def _require(self) -> LoadedModel:
        if self.loaded is None:
            raise _NotReady()
        return self.loaded

    @api.get("/", include_in_schema=False)
    async def index(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> FileResponse:
        if name not in {p.name for p in STATIC_DIR.iterdir()}:
            raise StarletteHTTPException(404, f"no static file {name!r}")
        return FileResponse(STATIC_DIR / name)

    @api.get("/explain/{page}", include_in_schema=False)
    async def explain_page(self, page: str) -> FileResponse:
        if page not in EXPLAIN_PAGES:
            raise StarletteHTTPException(
                404, f"no explainer page {page!r}; pages: {', '.join(EXPLAIN_PAGES)}"
            )
        return FileResponse(STATIC_DIR / f"explain-{page}.html")

    @api.post("/api/tokenize", responses=ERROR_RESPONSES)
    async def api_tokenize(self, body: TokenizeRequest) -> Any:
        """The run's tokens of `text` (ids, bytes, the characters of each), chars per token, and the
        token counts under tiktoken's gpt2 and cl100k_base when they are available offline."""
        from nanorun.serving import explain

        return await _explain(self.loaded, lambda _m, tok: explain.tokenize(tok, body.text))

    @api.post("/api/bpe-replay", responses=ERROR_RESPONSES)
    async def api_bpe_replay(self, body: BpeReplayRequest) -> Any:
        """The tokens of `text` with only the first `merges` merges of the run's tokenizer."""
        from nanorun.serving import explain

        return await _explain(
            self.loaded,
            lambda _m, tok: explain.bpe_replay(tok, body.text, body.merges, body.list_merges),
        )

    @api.post("/api/next-token", responses=ERROR_RESPONSES)
    async def api_next_token(self, body: NextTokenRequest) -> Any:
        """The model's top-k next-token distribution after `prompt`, at `temperature`."""
        from nanorun.serving import explain

        return await _explain(
            self.loaded,
            lambda m, tok: explain.next_token(m, tok, body.prompt, body.temperature, body.top_k),
        )

    @api.post("/api/attention", responses=ERROR_RESPONSES)
    async def api_attention(self, body: AttentionRequest) -> Any:
        """One layer/head's attention probabilities (T x T) over a short prompt."""
        from nanorun.serving import explain

        return await _explain(
            self.loaded, lambda m, tok: explain.attention(m, tok, body.prompt, body.layer, body.head)
        )

    @api.get("/api/run", responses=ERROR_RESPONSES)
    async def api_run(self) -> Any:
        """What is served, and the loss / val-bpb history of each stage of its run."""
        from nanorun.serving import explain

        loaded = self.loaded
        if loaded is None:
            return _not_ready()
        info = loaded.info
        return await _explain(loaded, lambda m, tok: explain.run_summary(m, tok, info))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Readiness and the batch's state; the checkpoint by stage, step and digest, not by location."""
        if self.loaded is None:
            return {
                "status": "waiting for a checkpoint (user_config.checkpoint)",
                "ready": False,
                "pid": os.getpid(),
            }
        info = self.loaded.info
        return {
            "status": "ok",
            "ready": True,
            "pid": os.getpid(),
            "stage": stage_of(info["checkpoint"]),
            "step": info.get("step"),
            "config_id": info.get("config_id", ""),
            "checkpoint_digest": checkpoint_digest(info["checkpoint"]),
            "context": info.get("context"),
            **self.loaded.scheduler.stats(),
        }

    @api.get("/metrics", include_in_schema=False)
    async def prometheus(self) -> Response:
        body, content_type = serve_metrics().render()
        return Response(body, media_type=content_type)

    @api.get("/v1/models", response_model=ModelList, responses=ACCESS_RESPONSES)
    async def models(self) -> ModelList:
        cards = [ModelCard(id=MODEL_ID, created=now())] if self.loaded else []
        return ModelList(data=cards)

    @api.post(CHAT_PATH, response_model=ChatCompletion, responses=ERROR_RESPONSES)
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        from nanorun.serving.batching import SamplingParams
        from nanorun.trainer.chat.conversation import ConversationError
        from nanorun.trainer.chat.engine import ContextOverflowError, fit_conversation

        start = time.monotonic()
        try:
            loaded = self._require()
        except _NotReady:
            return _not_ready()
        sampling = body.sampling()
        context = loaded.scheduler.context
        reserve = min(sampling["max_tokens"], context // 2)  # room left to answer in
        try:
            prompt, notice = fit_conversation(loaded.tokenizer, body.conversation(), context - reserve)
        except (ConversationError, ContextOverflowError) as e:
            return _error(400, str(e), param="messages")
        params = SamplingParams(**sampling)
        headers = {"x-nanorun-notice": notice} if notice else {}
        events = loaded.scheduler.stream(prompt, params)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(events, start, include_usage),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", **headers},
            )
        return await _complete(events, start, headers)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Ray Serve application for `args` (see `AppArgs`); named by `SERVE_IMPORT_PATH`."""
    config = AppArgs(**(args or {}))
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": config.num_gpus, "num_cpus": config.num_cpus},
        # a replica batches `slots` requests; a few more wait in its scheduler queue
        "max_ongoing_requests": config.max_ongoing_requests or 2 * config.slots,
    }
    if config.autoscaling_config:
        options["autoscaling_config"] = {"target_ongoing_requests": config.slots, **config.autoscaling_config}
    if config.checkpoint:
        options["user_config"] = {"checkpoint": config.checkpoint, "tokenizer": config.tokenizer}
    return ChatDeployment.options(**options).bind(
        slots=config.slots,
        device=config.device,
        api_keys_file=config.api_keys_file,
        allow_unauthenticated=config.allow_unauthenticated,
        max_request_bytes=config.max_request_bytes,
        rate_limit_per_minute=config.rate_limit_per_minute,
    )
