"""Continuous batching: many chat requests share one model and one KV cache, decoding together.

    scheduler = Scheduler(model, tokenizer, slots=16)
    scheduler.start()
    async for event in scheduler.stream(prompt_tokens, SamplingParams(max_tokens=64)):
        print(event.text, end="")            # the last event carries finish_reason and token counts
    scheduler.close()

A background thread owns the model and a `KVCache` with one row per slot. Each turn of its loop:

1. admit: while a row is free and requests are waiting, prefill the next request's prompt into the
   first free row (`KVCache.row(i)`, the other rows untouched) and sample its first token;
2. decode: one forward pass over all in-flight rows together (each row at its own length), then
   sample each row's next token with the row's own settings and seeded generator;
3. release: a row that finished (stop token, max_tokens, full context) or whose client went away
   is freed at once. The in-flight rows stay packed at the front of the cache (the last row moves
   into the freed one), so a decode step computes only rows that are in use.

So a request that arrives while others are generating joins at the next step instead of waiting
for them to finish, and throughput grows with concurrency. Tool calls work as in `Engine`
(`RowState`). Tokens travel to the asyncio side through `loop.call_soon_threadsafe`; cancelling the
consuming coroutine (a client disconnect) marks the request cancelled and frees its row.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from nanorun.trainer.chat.engine import (
    RowState,
    SpecialTokens,
    TextStream,
    context_length,
    model_device,
    new_kv_cache,
    sample_tokens,
)
from nanorun.trainer.model.gpt import KVCache

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass
class Event:
    """A piece of a request's output: new text (maybe empty), or the end with its finish reason."""

    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error", on the last event only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the scheduler thread
    state: RowState | None = None
    text: TextStream | None = None
    generator: torch.Generator | None = None
    last_token: int = 0
    generated: int = 0
    limit: int = 0  # tokens this request may generate (max_tokens, capped by the context)

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _rows_view(cache: KVCache, n: int) -> KVCache:
    """A view of the first n rows of `cache` (shares storage, like `KVCache.row`)."""
    view = object.__new__(KVCache)
    view.k, view.v, view.cache_seqlens = cache.k[:, :n], cache.v[:, :n], cache.cache_seqlens[:n]
    return view


class Scheduler:
    """Continuous-batching generation over `slots` KV-cache rows (see the module docstring)."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, slots: int = 16, metrics: Any | None = None
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.model = model
        self.tokenizer = tokenizer
        self.special = SpecialTokens(tokenizer)
        self.slots = slots
        self.context = context_length(model)
        self.device = model_device(model)
        self.cache = new_kv_cache(model, slots, self.context)
        self.metrics = metrics
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # active[i] owns cache row i
        self.wakeup = threading.Condition()
        self.closing = False
        self.thread: threading.Thread | None = None
        self.steps = 0

    # ---- the asyncio side -------------------------------------------------------------------------

    def start(self) -> Scheduler:
        self.thread = threading.Thread(target=self._run, name="nanorun-batching", daemon=True)
        self.thread.start()
        return self

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish the requests in flight and waiting, then stop the thread."""
        with self.wakeup:
            self.closing = True
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, prompt: list[int], params: SamplingParams) -> Request:
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.context:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {self.context}")
        request = Request(
            prompt=list(prompt), params=params, loop=asyncio.get_running_loop(), queue=asyncio.Queue()
        )
        with self.wakeup:
            if self.closing:
                raise RuntimeError("the scheduler is shutting down")
            self.waiting.append(request)
            self._update_gauges()
            self.wakeup.notify()
        return request

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """The request's events as they are generated; leaving early (or being cancelled) frees its row."""
        request = self.submit(prompt, params)
        try:
            while True:
                event = await request.queue.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            request.cancelled.set()
            with self.wakeup:
                self.wakeup.notify()

    # ---- the scheduler thread ---------------------------------------------------------------------

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queued.set(len(self.waiting))
            self.metrics.inflight.set(len(self.active))

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wakeup:
                while not self.waiting and not self.active and not self.closing:
                    self.wakeup.wait()
                if self.closing and not self.waiting and not self.active:
                    return
            try:
                with torch.inference_mode():
                    self._admit()
                    if self.active:
                        self._decode()
            except Exception as e:  # a broken model must not hang its clients: fail them and go on
                log.exception("generation step failed")
                for request in self.active:
                    request.emit(Event(finish_reason="error", error=f"generation failed: {e}"))
                self.active.clear()
                self.cache.reset()
            with self.wakeup:
                self._update_gauges()

    def _admit(self) -> None:
        while len(self.active) < self.slots:
            with self.wakeup:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled.is_set():
                continue
            row = len(self.active)
            p = request.params
            seed = p.seed if p.seed is not None else random.getrandbits(63)
            request.generator = torch.Generator(device=self.device).manual_seed(seed)
            request.state = RowState(self.special, self.tokenizer)
            request.text = TextStream(self.tokenizer, self.special)
            request.limit = max(1, min(p.max_tokens, self.context - len(request.prompt)))
            view = self.cache.row(row)
            view.cache_seqlens.zero_()
            ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
            try:
                logits = self.model(ids, kv_cache=view)[:, -1, :]
            except Exception as e:  # this prompt failed; the rows in flight are untouched
                log.exception("prefill failed")
                view.cache_seqlens.zero_()
                request.emit(Event(finish_reason="error", error=f"prefill failed: {e}"))
                continue
            self.active.append(request)
            self._advance(request, self._sample(logits, [request])[0])
            if self._finished(request):
                self._release([row])

    def _decode(self) -> None:
        n = len(self.active)
        ids = torch.tensor([[r.last_token] for r in self.active], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=_rows_view(self.cache, n))[:, -1, :]
        self.steps += 1
        for request, token in zip(self.active, self._sample(logits, self.active), strict=True):
            self._advance(request, token)
        self._release([i for i, r in enumerate(self.active) if self._finished(r)])

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        greedy: list[int] = []
        if any(r.params.temperature <= 0.0 for r in requests):
            greedy = torch.argmax(logits, dim=-1).tolist()  # one batched op covers every greedy row
        out = []
        for i, r in enumerate(requests):
            p = r.params
            if p.temperature <= 0.0:
                out.append(greedy[i])
            else:
                out.append(
                    int(sample_tokens(logits[i : i + 1], r.generator, p.temperature, p.top_k, p.top_p))
                )
        return out

    def _advance(self, request: Request, sampled: int) -> None:
        token, _ = request.state.choose(sampled)
        request.state.observe(token)
        request.last_token = token
        if token in self.special.stop:
            tail = request.text.push(token)
            if tail:
                request.emit(Event(text=tail))
            return
        request.generated += 1
        text = request.text.push(token)
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
        request.emit(Event(text=text, token=token))

    def _finished(self, request: Request) -> bool:
        if request.cancelled.is_set():
            return True
        if request.state.completed:
            self._finish(request, "stop")
            return True
        if request.generated >= request.limit:
            self._finish(request, "length")
            return True
        return False

    def _finish(self, request: Request, reason: str) -> None:
        tail = request.text.flush()
        request.emit(
            Event(
                text=tail,
                finish_reason=reason,
                prompt_tokens=len(request.prompt),
                completion_tokens=request.generated,
            )
        )

    def _release(self, rows: list[int]) -> None:
        """Free the given rows, moving the last in-flight row into each hole (rows stay packed)."""
        for i in sorted(rows, reverse=True):
            last = len(self.active) - 1
            if i != last:
                length = int(self.cache.cache_seqlens[last])
                self.cache.k[:, i, :length] = self.cache.k[:, last, :length]
                self.cache.v[:, i, :length] = self.cache.v[:, last, :length]
                self.cache.cache_seqlens[i] = length
                self.active[i] = self.active[last]
            self.active.pop()
            self.cache.cache_seqlens[last] = 0

    def stats(self) -> dict[str, Any]:
        return {
            "slots": self.slots,
            "inflight": len(self.active),
            "queued": len(self.waiting),
            "decode_steps": self.steps,
            "context": self.context,
        }
