"""operator/loop/workqueue.py: one reconcile per key at a time, duplicates dropped, errors retried
with a growing delay, requeues honoured, deleted objects forgotten (no cluster: the index is a
dict)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from nanorun.operator.loop.workqueue import WorkQueue

SETTINGS = SimpleNamespace(
    resync_seconds=3600.0,
    error_backoff_seconds=0.05,
    max_error_backoff_seconds=0.2,
    ignored_namespaces=frozenset({"kube-system"}),
)


def body(name: str, version: int = 1) -> dict:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": str(version)}}


class Recorder(WorkQueue):
    kind = "Test"

    def __init__(self, index: dict, fail_times: int = 0, requeue: float | None = None) -> None:
        super().__init__(SETTINGS, workers=4)
        self.index, self.fail_times, self.requeue = index, fail_times, requeue
        self.calls: list[tuple[str, str, float]] = []  # (name, resourceVersion, when)
        self.running: dict[str, int] = {}
        self.overlaps = 0
        self.forgotten: list[tuple[str, str]] = []
        self.failures = 0
        self.lock = threading.Lock()

    def objects(self):
        return self.index

    def handle(self, key, body):
        with self.lock:
            self.running[key[1]] = self.running.get(key[1], 0) + 1
            self.overlaps += self.running[key[1]] > 1
            self.calls.append((key[1], body["metadata"]["resourceVersion"], time.monotonic()))
        time.sleep(0.05)
        with self.lock:
            self.running[key[1]] -= 1
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("API server unavailable")
        return self.requeue

    def forget(self, key):
        self.forgotten.append(key)

    def failed(self, key, err):
        self.failures += 1


async def settle(q: WorkQueue, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await q.stop()


def test_a_key_is_reconciled_once_per_burst_and_never_twice_at_once():
    async def main():
        q = Recorder({("ns", "a"): [body("a")], ("ns", "b"): [body("b")]})
        q.start()
        for _ in range(10):
            q.enqueue(("ns", "a"))
        q.enqueue(("ns", "b"))
        q.enqueue(("kube-system", "a"))  # an ignored namespace
        await asyncio.sleep(0.02)
        q.enqueue(("ns", "a"))  # while a's reconcile runs: once more after it
        await settle(q, 0.4)
        return q

    q = asyncio.run(main())
    assert sorted(name for name, _, _ in q.calls) == ["a", "a", "b"]
    assert q.overlaps == 0


def test_a_failed_reconcile_is_retried_with_a_growing_delay_and_a_requeue_is_honoured():
    async def main():
        q = Recorder({("ns", "a"): [body("a")]}, fail_times=3)
        q.start()
        q.enqueue(("ns", "a"))
        await settle(q, 1.0)
        return q

    q = asyncio.run(main())
    assert q.failures == 3 and len(q.calls) == 4
    # Each gap is the 0.05 s reconcile plus at least its delay: 0.05, 0.1, 0.2 s.
    gaps = [b[2] - a[2] for a, b in zip(q.calls, q.calls[1:], strict=False)]
    assert [g > 0.05 + d - 0.005 for g, d in zip(gaps, (0.05, 0.1, 0.2), strict=True)] == [True] * 3, gaps

    async def requeued():
        q = Recorder({("ns", "a"): [body("a")]}, requeue=0.1)
        q.start()
        q.enqueue(("ns", "a"))  # one event; the rest are the requeues each reconcile asks for
        for _ in range(100):
            if len(q.calls) >= 3:
                break
            await asyncio.sleep(0.05)
        await q.stop()
        return q

    assert len(asyncio.run(requeued()).calls) >= 3


def test_the_newer_written_body_wins_until_the_index_catches_up_and_a_deleted_key_is_forgotten():
    async def main():
        index = {("ns", "a"): [body("a", 5)]}
        q = Recorder(index)
        q.wrote(("ns", "a"), body("a", 7))  # a status patch returned version 7
        q.start()
        q.enqueue(("ns", "a"))
        await asyncio.sleep(0.15)
        index[("ns", "a")] = [body("a", 9)]  # the watch event arrives
        q.enqueue(("ns", "a"))
        await asyncio.sleep(0.15)
        del index[("ns", "a")]
        q.enqueue(("ns", "a"))
        await settle(q, 0.15)
        return q

    q = asyncio.run(main())
    assert [v for _, v, _ in q.calls] == ["7", "9"]
    assert q.forgotten == [("ns", "a")]
