"""Pretraining data loading: packing, exact resume, world-size independence, S3 / HTTPS shards, errors."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from nanorun.pipeline import storage
from nanorun.trainer.data.dataloader import (
    DataError,
    PackedBatches,
    SequenceDocuments,
    fit_streams,
    merge_states,
    validation_batches,
)

from tests.fixtures.tiny_run import real_english_documents, small_tokenizer

T = 64


def write_shards(root: Path, docs: list[str], n_shards: int = 3, row_group: int = 16) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    per = len(docs) // n_shards
    paths = []
    for i in range(n_shards):
        path = root / f"shard_{i:05d}.parquet"
        pq.write_table(pa.table({"text": docs[i * per : (i + 1) * per]}), path, row_group_size=row_group)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("shards"), real_english_documents()[:600])


def loader(
    tok, shards, *, rank=0, world=1, state=None, streams=2, rows=8, batch=2, buffer=32
) -> PackedBatches:
    return PackedBatches.for_shards(
        tok,
        shards,
        device_batch_size=batch,
        seq_len=T,
        rows_per_step=rows,
        streams=streams,
        rank=rank,
        world_size=world,
        buffer_size=buffer,
        state=state,
    )


def take(ld: PackedBatches, steps: int) -> list[torch.Tensor]:
    out = []
    for _ in range(steps):
        out.append(torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in ld.step_batches()]))
    return out


def test_rows_start_with_bos_are_full_and_hold_document_pieces(tok, shards):
    ld = loader(tok, shards)
    rows = torch.cat(take(ld, 4))
    ld.close()
    assert rows.shape == (32, T + 1)
    assert (rows[:, 0] == tok.bos_token_id).all()
    encoded = {tuple(t) for t in tok.encode_batch(real_english_documents()[:600], prepend=tok.bos_token_id)}
    for row in rows.tolist():  # every BOS-delimited piece is a whole document or a document's prefix
        starts = [i for i, t in enumerate(row) if t == tok.bos_token_id] + [len(row)]
        for a, b in zip(starts, starts[1:], strict=False):
            piece = tuple(row[a:b])
            assert any(doc[: len(piece)] == piece for doc in encoded)


def test_best_fit_prefers_the_largest_document_that_fits():
    lengths = [50, 10, 30, 20, 60, 5, 40, 25]
    docs = [[0] + [i + 1] * (n - 1) for i, n in enumerate(lengths)]
    source = functools.partial(SequenceDocuments, docs.__getitem__, len(docs))
    ld = PackedBatches(
        lambda k: source(k, 1),
        device_batch_size=1,
        seq_len=T,
        rows_per_step=1,
        streams=1,
        buffer_size=len(docs),
    )
    ((x, y),) = ld.step_batches()
    ld.close()
    row = torch.cat([x[0], y[0, -1:]]).tolist()
    # 65 tokens: the largest fitting document (60) first, then the largest that fits the 5 left (5)
    assert row[:60] == docs[4] and row[60:] == docs[5]


def test_resume_from_state_sees_exactly_the_same_batches(tok, shards):
    straight = loader(tok, shards)
    expected = take(straight, 8)
    straight.close()
    first = loader(tok, shards)
    got = take(first, 3)
    state = first.state_dict()
    first.close()
    resumed = loader(tok, shards, state=state)
    got += take(resumed, 5)
    resumed.close()
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_two_ranks_together_see_the_one_rank_batches_and_resume_on_one(tok, shards):
    one = loader(tok, shards)
    expected = take(one, 6)
    one.close()
    ranks = [loader(tok, shards, rank=r, world=2) for r in range(2)]
    for step in range(3):
        parts = [take(ld, 1)[0] for ld in ranks]
        assert torch.equal(torch.cat(parts), expected[step])
    state = merge_states([ld.state_dict() for ld in ranks])
    for ld in ranks:
        ld.close()
    single = loader(tok, shards, state=state)  # 2 ranks -> 1 rank
    assert all(torch.equal(a, b) for a, b in zip(take(single, 3), expected[3:], strict=True))
    single.close()


def test_streams_read_interleaved_row_groups(tok, shards):
    ld = loader(tok, shards, streams=2)
    take(ld, 2)
    state = ld.state_dict()
    ld.close()
    for k, s in state["streams"].items():
        for _epoch, _shard, offset, rg, _row in [s["next_after"], *s["buffer"]]:
            assert (offset + rg) % 2 == int(k)


def first_step(tok, paths, **kwargs) -> list[torch.Tensor]:
    ld = loader(tok, paths, **kwargs)
    try:
        return take(ld, 1)
    finally:
        ld.close()


def test_more_streams_than_row_groups_is_a_clear_error(tok, tmp_path):
    paths = write_shards(tmp_path, real_english_documents()[:40], n_shards=1, row_group=20)
    with pytest.raises(
        DataError, match="4 data streams need as many row groups, but the training shards hold 2"
    ):
        first_step(tok, paths, streams=4, rows=4, batch=1)


def test_the_stream_count_fits_a_small_corpus(tok, tmp_path):
    # 3 shards of one row group each: 8 streams cannot all read, and a step of 8 rows splits into
    # 2 streams of 4 (3 does not divide 8). Nothing to pass: streams=0 fits the data.
    paths = write_shards(tmp_path, real_english_documents()[:90], n_shards=3, row_group=100)
    ld = loader(tok, paths, streams=0, rows=8, batch=4)
    try:
        assert ld.streams == 2 and ld.state_dict()["count"] == 2
        assert [b.shape for b in take(ld, 2)] == [(8, T + 1), (8, T + 1)]
    finally:
        ld.close()
    big = loader(tok, write_shards(tmp_path / "big", real_english_documents()[:600]), streams=0)
    try:
        assert big.streams == 8  # enough row groups: as many streams as a step of 8 rows allows
    finally:
        big.close()


@pytest.mark.parametrize(
    ("world", "rows", "units", "streams"),
    [
        (1, 8, 100, 8),
        (1, 8, 3, 2),
        (1, 6, 100, 6),
        (2, 8, 3, 2),
        (2, 8, 100, 8),
        (3, 12, 100, 12),
        (4, 16, 5, 4),
    ],
)
def test_fit_streams_takes_the_most_that_the_ranks_the_step_and_the_data_allow(world, rows, units, streams):
    assert fit_streams(world, rows, units, "row group(s)") == streams


def test_too_little_data_says_how_much_there_is_and_what_the_ranks_need():
    with pytest.raises(
        DataError, match="the training data has 3 row group\\(s\\); each of the 4 ranks needs at least one"
    ):
        fit_streams(4, 16, 3, "row group(s)")
    with pytest.raises(DataError, match="a step of 6 rows cannot be split evenly over 4 ranks"):
        fit_streams(4, 6, 100, "row group(s)")


def test_world_size_must_divide_the_streams(tok, shards):
    with pytest.raises(DataError, match="cannot be split over 3 ranks"):
        loader(tok, shards, streams=2, world=3)


def test_corrupt_shard_is_an_error_naming_it(tok, shards, tmp_path):
    bad = tmp_path / "shard_bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataError, match="shard_bad.parquet is corrupt"):
        first_step(tok, [bad.as_posix()], streams=1)


def test_missing_shard_is_an_error_naming_it(tok, tmp_path):
    with pytest.raises(DataError, match="nope.parquet does not exist"):
        first_step(tok, [str(tmp_path / "nope.parquet")], streams=1)


def test_s3_shards_stream_the_same_rows_as_local(tok, shards, s3_bucket):
    uris = []
    for path in shards:
        uri = f"s3://{s3_bucket}/data/{Path(path).name}"
        storage.upload_from(path, uri)
        uris.append(uri)
    local, remote = loader(tok, shards), loader(tok, uris)
    assert all(torch.equal(a, b) for a, b in zip(take(local, 3), take(remote, 3), strict=True))
    local.close()
    remote.close()


def test_corrupt_s3_shard_is_an_error_naming_it(tok, s3_bucket):
    uri = f"s3://{s3_bucket}/data/shard_00000.parquet"
    storage.write_bytes(uri, b"garbage")
    with pytest.raises(DataError, match=f"shard {uri} is corrupt"):
        first_step(tok, [uri], streams=1)


def test_https_style_shards_download_from_a_web_server(tok, shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(Path(shards[0]).parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        urls = [f"{base}/{Path(p).name}" for p in shards]
        local, remote = loader(tok, shards), loader(tok, urls)
        assert all(torch.equal(a, b) for a, b in zip(take(local, 2), take(remote, 2), strict=True))
        local.close()
        remote.close()
        with pytest.raises(DataError, match="missing.parquet does not exist"):
            first_step(tok, [f"{base}/missing.parquet"], streams=1)
    finally:
        server.shutdown()


def test_validation_rows_do_not_depend_on_world_size(tok, shards):
    one = validation_batches(tok, shards[-1], batch_size=2, seq_len=T)
    expected = [next(one) for _ in range(2)]
    one.close()
    halves = [
        validation_batches(tok, shards[-1], batch_size=1, seq_len=T, rank=r, world_size=2) for r in range(2)
    ]
    for x, _ in expected:
        got = [next(h)[0] for h in halves]
        assert torch.equal(torch.stack([got[0][0], got[1][0]]), x)
    for h in halves:
        h.close()
