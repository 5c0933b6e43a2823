"""The machinery both reconcile loops share (controller.py for LLMRuns, sweep/controller.py for
LLMSweeps): a de-duplicated queue of object keys, workers that reconcile each key one at a time,
a periodic resync of every watched object, and a growing delay after a failed reconcile.

kopf feeds the queue (handlers.py, sweep/handlers.py): every watch event of an object or of one of
its children queues that object; the resync queues all of them (files in storage change without
events); a retry or a requeue the decision asks for queues one at its time. A subclass says which
objects it watches (`objects`), what it reads of their children in the event loop (`snapshot`) and
what one reconcile does, in a worker thread (`handle`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("nanorun.operator")

Key = tuple[str, str]  # (namespace, name)


def newest_body(indexed: dict[str, Any], written: dict[str, Any] | None) -> dict[str, Any]:
    """The newer of kopf's indexed body and the one a status patch returned: `written` when it is
    the same object (uid) at a higher resourceVersion, as a patch lands before its watch event."""
    if written is not None and written["metadata"].get("uid") == indexed["metadata"].get("uid"):
        try:
            if int(written["metadata"]["resourceVersion"]) > int(indexed["metadata"]["resourceVersion"]):
                return written
        except (KeyError, ValueError):
            pass
    return indexed


class WorkQueue:
    """One per kind and operator process. `settings` holds resync_seconds, error_backoff_seconds,
    max_error_backoff_seconds and ignored_namespaces (controller.Settings)."""

    kind = ""  # the watched kind, for logs

    def __init__(self, settings: Any, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self._queue: asyncio.Queue[Key] | None = None
        self._queued: set[Key] = set()
        self._locks: dict[Key, asyncio.Lock] = {}
        self._errors: dict[Key, int] = {}
        self._written: dict[Key, dict[str, Any]] = {}  # the newest body patched, until the index has it
        self._tasks: list[asyncio.Task] = []
        self._pool: ThreadPoolExecutor | None = None

    # --- what a subclass says -------------------------------------------------------------------

    def objects(self) -> Mapping[Key, Any] | None:
        """kopf's index of the watched objects (None until attached)."""
        raise NotImplementedError

    def snapshot(self, key: Key) -> tuple:
        """Copies of what `handle` needs from kopf's indexes, taken in the event loop."""
        return ()

    def handle(self, key: Key, body: dict[str, Any], *snapshot: Any) -> float | None:
        """One reconcile, in a worker thread: decide and apply. Returns seconds after which to
        reconcile again (None: at the next event or resync); raises to be retried after a delay."""
        raise NotImplementedError

    def forget(self, key: Key) -> None:
        """The object is gone: drop what is kept about it (metrics, caches)."""

    def failed(self, key: Key, err: Exception) -> None:
        """A reconcile raised (counted in metrics, say); it is retried after a growing delay."""

    # --- the loop -------------------------------------------------------------------------------

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"reconcile-{self.kind.lower()}")
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._resync()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def enqueue(self, key: Key) -> None:
        if key[0] in self.settings.ignored_namespaces:
            return
        if self._queue is not None and key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def enqueue_later(self, key: Key, seconds: float) -> None:
        asyncio.get_running_loop().call_later(max(0.0, seconds), self.enqueue, key)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            for key in list((self.objects() or {}).keys()):
                self.enqueue(key)

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            lock = self._locks.setdefault(key, asyncio.Lock())
            async with lock:
                await self._reconcile_key(key)

    def body(self, key: Key) -> dict[str, Any] | None:
        """The newest body of an object: kopf's index, or what was last written if that is newer."""
        store = (self.objects() or {}).get(key)
        indexed = next(iter(store), None) if store else None
        written = self._written.get(key)
        if indexed is None:
            return None
        if newest_body(indexed, written) is written:
            return written
        self._written.pop(key, None)
        return indexed

    def wrote(self, key: Key, body: dict[str, Any]) -> None:
        """Remember the body a status patch returned (see `body`)."""
        self._written[key] = body

    async def _reconcile_key(self, key: Key) -> None:
        body = self.body(key)
        if body is None:  # deleted
            self._errors.pop(key, None)
            self._locks.pop(key, None)
            self.forget(key)
            return
        snapshot = self.snapshot(key)
        loop = asyncio.get_running_loop()
        try:
            requeue = await loop.run_in_executor(self._pool, self.handle, key, body, *snapshot)
        except Exception as err:  # API or storage trouble: count it, retry later with a growing delay
            n = self._errors[key] = self._errors.get(key, 0) + 1
            s = self.settings
            delay = min(s.max_error_backoff_seconds, s.error_backoff_seconds * 2 ** (n - 1))
            self.failed(key, err)
            log.warning("reconcile of %s %s/%s failed (retry in %.0fs): %s", self.kind, *key, delay, err)
            self.enqueue_later(key, delay)
            return
        self._errors.pop(key, None)
        if requeue:
            self.enqueue_later(key, requeue + 0.05)
