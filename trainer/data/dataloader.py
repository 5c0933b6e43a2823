"""Pretraining batches: parquet shards -> tokens -> BOS-aligned, best-fit packed rows, resumable exactly.

    loader = PackedBatches.for_shards(tokenizer, train_shards, device_batch_size=B, seq_len=T,
                                      rows_per_step=N, streams=K, rank=r, world_size=w, device=dev)
    for x, y in loader.step_batches(): ...   # the N/w rows of this rank for one optimizer step
    state = loader.state_dict()                # between steps: goes into the checkpoint's meta.json

Data streams. The global batch of every step is N rows, R = N/K from each of K independent streams.
Stream k reads the row groups whose index, counted across all training shards, is k modulo K; rank r
owns streams r, r+w, r+2w, ... So with K = w this is nanochat's row groups strided across ranks, and
because K is fixed for the run (not tied to the world size), a step's global batch is the same on 1,
2 or 8 ranks: one process with gradient accumulation reproduces a multi-process run, and a run can
resume on any world size that divides K (2 ranks -> 1 rank).

Packing (per stream): every document starts with BOS; from a buffer of tokenized documents each row
takes the largest document that still fits, and when none fits, the shortest one is cropped to fill
the row exactly (no padding; cropped tails are dropped, like nanochat).

Exact resume: a stream's state is the position of the next document to read plus the positions of the
documents waiting in its buffer, so a resumed run re-reads and re-tokenizes those few documents and
then sees exactly the rows the uninterrupted run would have seen.

Throughput: each stream reads, tokenizes and packs in a background thread, a few steps ahead of the
trainer; shards on s3:// or https:// are downloaded to a local cache with the next one prefetched,
transient errors are retried with backoff, and a missing or corrupt shard is an error naming it.

`SequenceDocuments` serves already-tokenized documents (e.g. rendered conversations for mid_train)
through the same streams and packing.
"""

from __future__ import annotations

import math
import queue
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from nanorun.trainer.data.shards import DataError, fetch, is_remote, parquet_shard, read_texts

TOKENIZE_BATCH = 128  # documents per encode_batch call
PREFETCH_BLOCKS = 3  # steps a stream may run ahead of the trainer

Position = list[int]  # an opaque, JSON-able document position inside one source


def default_streams(world_size: int) -> int:
    """The most streams a run uses: 8, or a multiple of the world size (so every rank owns some)."""
    return world_size * 8 // math.gcd(world_size, 8)


def fit_streams(world_size: int, rows_per_step: int, units: int, what: str) -> int:
    """The stream count for data of `units` indivisible pieces (`what`: row groups of the training
    shards, or documents): the most, from `default_streams` down, that is a multiple of the world
    size (every rank owns whole streams), divides the rows of a step (every stream gives the same
    number) and is at most `units` (every stream reads at least one). A small corpus then trains as
    it is; the checkpoint records the count, so a resumed run reads exactly the same batches."""
    for k in range(default_streams(world_size), 0, -world_size):
        if rows_per_step % k == 0 and k <= units:
            return k
    if units < world_size:
        raise DataError(
            f"the training data has {units} {what}; each of the {world_size} ranks needs at least one "
            f"to read: add data (or write shards with smaller row groups), or train on fewer ranks"
        )
    raise DataError(
        f"a step of {rows_per_step} rows cannot be split evenly over {world_size} ranks; "
        f"make the total batch size a multiple of {world_size} x the sequence length"
    )


def count_row_groups(shards: Sequence[str], cache: ShardCache, enough: int) -> int:
    """Row groups in `shards`, counted shard by shard until there are `enough` (a large corpus
    opens only its first shard, which training reads first anyway)."""
    total = 0
    for uri in shards:
        total += open_shard(uri, cache).num_row_groups
        if total >= enough:
            break
    return total


# ----------------------------------------------------------------------------------------------
# Shards: local paths, s3:// and https:// URLs, cached locally with the next one prefetched


class ShardCache:
    """Local copies of remote shards; keeps the most recent few, downloads ahead in the background."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="nanorun-shards-"))
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-download")
        self.entries: OrderedDict[str, Future[Path]] = OrderedDict()
        self.lock = threading.Lock()
        self.downloads = 0

    def _future(self, uri: str) -> Future[Path]:
        with self.lock:
            if uri in self.entries:
                self.entries.move_to_end(uri)
                return self.entries[uri]
            self.downloads += 1
            dest = self.dir / f"shard-{self.downloads}.parquet"
            fut = self.pool.submit(lambda: (fetch(uri, dest), dest)[1])
            self.entries[uri] = fut
            while len(self.entries) > self.keep:
                _, old = self.entries.popitem(last=False)
                old.add_done_callback(lambda f: f.exception() or f.result().unlink(missing_ok=True))
            return fut

    def local_path(self, uri: str) -> Path:
        if not is_remote(uri):
            if not Path(uri).exists():
                raise DataError(f"shard {uri} does not exist")
            return Path(uri)
        return self._future(uri).result()

    def prefetch(self, uri: str) -> None:
        if is_remote(uri):
            self._future(uri)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def open_shard(uri: str, cache: ShardCache) -> pq.ParquetFile:
    """Shard `uri`, from the local cache, as a checked ParquetFile (a DataError naming it otherwise)."""
    return parquet_shard(cache.local_path(uri), uri)


# ----------------------------------------------------------------------------------------------
# Document sources: where one stream's documents come from, in a fixed, restartable order


class ParquetDocuments:
    """Stream k of K over parquet shards. Position: [epoch, shard, rg_offset, row_group, row]."""

    def __init__(self, tokenizer: Any, shards: Sequence[str], stream: int, streams: int, cache: ShardCache):
        if not shards:
            raise DataError("no training shards: check --data (the last shard is kept for validation)")
        self.tokenizer, self.shards, self.stream, self.streams, self.cache = (
            tokenizer,
            list(shards),
            stream,
            streams,
            cache,
        )

    def _texts(self, start: Position | None) -> Iterator[tuple[Position, str]]:
        epoch, shard, offset, rg0, row0 = start or [1, 0, 0, -1, 0]
        while True:
            found = False
            for s in range(shard, len(self.shards)):
                uri = self.shards[s]
                pf = open_shard(uri, self.cache)
                if s + 1 < len(self.shards):
                    self.cache.prefetch(self.shards[s + 1])
                for rg in range(pf.num_row_groups):
                    if (offset + rg) % self.streams != self.stream or rg < rg0:
                        continue
                    found = True
                    for row, text in enumerate(read_texts(pf, uri, rg)):
                        if rg == rg0 and row < row0:
                            continue
                        yield [epoch, s, offset, rg, row], text
                offset += pf.num_row_groups
                rg0, row0 = -1, 0
            if not found and shard == 0:
                raise DataError(
                    f"data stream {self.stream} of {self.streams} got no row groups: the training shards "
                    f"hold only {offset} row groups; use fewer data streams or more data"
                )
            epoch, shard, offset = epoch + 1, 0, 0

    def documents(self, start_after: Position | None) -> Iterator[tuple[Position, list[int]]]:
        start = None if start_after is None else [*start_after[:4], start_after[4] + 1]
        batch: list[tuple[Position, str]] = []
        for item in self._texts(start):
            batch.append(item)
            if len(batch) == TOKENIZE_BATCH:
                yield from self._encode(batch)
                batch = []

    def _encode(self, batch: list[tuple[Position, str]]) -> list[tuple[Position, list[int]]]:
        ids = self.tokenizer.encode_batch(
            [t for _, t in batch], prepend=self.tokenizer.bos_token_id, num_threads=4
        )
        return [(pos, tok) for (pos, _), tok in zip(batch, ids, strict=True)]

    def fetch(self, positions: Sequence[Position]) -> list[list[int]]:
        texts: dict[tuple[int, int], list[str]] = {}
        out = []
        for pos in positions:
            key = (pos[1], pos[3])
            if key not in texts:
                uri = self.shards[pos[1]]
                texts[key] = read_texts(open_shard(uri, self.cache), uri, pos[3])
            out.append(texts[key][pos[4]])
        return (
            self.tokenizer.encode_batch(out, prepend=self.tokenizer.bos_token_id, num_threads=4)
            if out
            else []
        )


class SequenceDocuments:
    """Stream k of K over `count` tokenized documents (index i goes to stream i mod K), epoch after epoch.

    `get(i)` returns document i's tokens, starting with BOS. Position: [epoch, index].
    """

    def __init__(self, get: Callable[[int], list[int]], count: int, stream: int, streams: int):
        if count <= stream:
            raise DataError(f"{count} documents cannot feed data stream {stream} of {streams}")
        self.get, self.count, self.stream, self.streams = get, count, stream, streams

    def documents(self, start_after: Position | None) -> Iterator[tuple[Position, list[int]]]:
        epoch, index = start_after if start_after is not None else [1, self.stream - self.streams]
        while True:
            index += self.streams
            if index >= self.count:
                epoch, index = epoch + 1, self.stream
            yield [epoch, index], self.get(index)

    def fetch(self, positions: Sequence[Position]) -> list[list[int]]:
        return [self.get(p[1]) for p in positions]


# ----------------------------------------------------------------------------------------------
# Best-fit packing of one stream, in a background thread


class PackedStream:
    """Packs one source's documents into blocks of `rows` rows of `seq_len + 1` tokens."""

    def __init__(self, source: Any, rows: int, seq_len: int, buffer_size: int, state: dict | None = None):
        self.source, self.rows, self.width, self.buffer_size = source, rows, seq_len + 1, buffer_size
        self.state = state or {"next_after": None, "buffer": []}
        self.queue: queue.Queue = queue.Queue(maxsize=PREFETCH_BLOCKS)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="packed-stream")
        self.thread.start()

    def _run(self) -> None:
        try:
            positions = [list(p) for p in self.state["buffer"]]
            buffer = list(zip(positions, self.source.fetch(positions), strict=True))
            last = self.state["next_after"]
            docs = self.source.documents(last)
            while not self.stop.is_set():
                block = torch.empty((self.rows, self.width), dtype=torch.long)
                for r in range(self.rows):
                    if self.stop.is_set():
                        return
                    pos = 0
                    while pos < self.width:
                        while len(buffer) < self.buffer_size:
                            doc = next(docs)
                            buffer.append(doc)
                            last = doc[0]
                        space = self.width - pos
                        best, best_len = -1, 0
                        for i, (_, tokens) in enumerate(buffer):
                            if best_len < len(tokens) <= space:
                                best, best_len = i, len(tokens)
                        if best < 0:  # nothing fits: crop the shortest document to fill the row
                            best = min(range(len(buffer)), key=lambda i: len(buffer[i][1]))
                        tokens = buffer.pop(best)[1][:space]
                        block[r, pos : pos + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                        pos += len(tokens)
                state = {"next_after": last, "buffer": [p for p, _ in buffer]}
                self._put((block, state))
        except BaseException as err:  # surfaces in the trainer's thread, with the shard's name
            self._put(err)

    def _put(self, item: Any) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next_block(self) -> torch.Tensor:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        block, self.state = item
        return block

    def close(self) -> None:
        """Stop the background thread and wait for it: a thread still inside torch or the tokenizer
        when the interpreter exits can abort the process."""
        self.stop.set()
        self.thread.join(timeout=30)


class PackedBatches:
    """One rank's view of the K streams: the micro-batches of each optimizer step, and the resume state."""

    def __init__(
        self,
        make_source: Callable[[int], Any],
        *,
        device_batch_size: int,
        seq_len: int,
        rows_per_step: int,
        streams: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        buffer_size: int = 256,
        state: dict | None = None,
    ):
        if streams % world_size:
            raise DataError(
                f"{streams} data streams cannot be split over {world_size} ranks; "
                f"use a world size that divides {streams}"
            )
        if rows_per_step % streams:
            raise DataError(
                f"rows per step ({rows_per_step}) must be a multiple of the data streams ({streams})"
            )
        rows_per_rank = rows_per_step // world_size
        if rows_per_rank % device_batch_size:
            raise DataError(
                f"{rows_per_rank} rows per rank per step is not a multiple of the device batch size {device_batch_size}"
            )
        self.B, self.T, self.device = device_batch_size, seq_len, torch.device(device)
        self.cache: ShardCache | None = None
        self.streams = streams
        self.owned = list(range(rank, streams, world_size))
        saved = (state or {}).get("streams", {})
        if state is not None and int(state.get("count", streams)) != streams:
            raise DataError(f"checkpoint has {state['count']} data streams, the loader was given {streams}")
        self.packers = {
            k: PackedStream(make_source(k), rows_per_step // streams, seq_len, buffer_size, saved.get(str(k)))
            for k in self.owned
        }

    @classmethod
    def for_shards(cls, tokenizer: Any, shards: Sequence[str], **kwargs: Any) -> PackedBatches:
        """Batches from parquet shards. `streams=0` fits the count to the data (`fit_streams`);
        the loader's `streams` says what it chose. An explicit count that the shards' row groups
        cannot feed is refused here, saying how many there are."""
        cache = ShardCache()
        world = kwargs.get("world_size", 1)
        wanted = kwargs["streams"] or default_streams(world)
        row_groups = count_row_groups(shards, cache, enough=wanted)
        if not kwargs["streams"]:
            kwargs["streams"] = fit_streams(world, kwargs["rows_per_step"], row_groups, "row group(s)")
        elif row_groups < kwargs["streams"]:
            raise DataError(
                f"{kwargs['streams']} data streams need as many row groups, but the training shards hold "
                f"{row_groups}: use --data-streams {row_groups} or fewer (or -1 to fit the data), or add data"
            )
        streams = kwargs["streams"]
        loader = cls(lambda k: ParquetDocuments(tokenizer, shards, k, streams, cache), **kwargs)
        loader.cache = cache
        return loader

    def step_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's rows of the next step, as (inputs, targets) micro-batches of B rows."""
        rows = torch.cat([self.packers[k].next_block() for k in self.owned])
        out = []
        for i in range(0, rows.size(0), self.B):
            chunk = rows[i : i + self.B]
            x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
            if self.device.type == "cuda":
                x, y = (
                    x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True),
                )
            out.append((x, y))
        return out

    def state_dict(self) -> dict:
        """State of this rank's streams after the last step (merge ranks' dicts with `merge_states`)."""
        return {"count": self.streams, "streams": {str(k): p.state for k, p in self.packers.items()}}

    def close(self) -> None:
        for p in self.packers.values():
            p.close()
        if self.cache is not None:
            self.cache.close()


def merge_states(states: Sequence[dict]) -> dict:
    """One state for the whole run from every rank's `state_dict()`."""
    merged: dict[str, Any] = {"count": states[0]["count"], "streams": {}}
    for s in states:
        merged["streams"].update(s["streams"])
    return merged


def validation_batches(
    tokenizer: Any,
    val_shard: str,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    buffer_size: int = 64,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation rows, the same on any world size: one stream, rank r keeps rows r, r+w, ..."""
    loader = PackedBatches.for_shards(
        tokenizer,
        [val_shard],
        device_batch_size=batch_size * world_size,
        seq_len=seq_len,
        rows_per_step=batch_size * world_size,
        streams=1,
        device="cpu",
        buffer_size=buffer_size,
    )
    device = torch.device(device)
    try:
        while True:
            ((x, y),) = loader.step_batches()
            yield x[rank::world_size].to(device), y[rank::world_size].to(device)
    finally:
        loader.close()
