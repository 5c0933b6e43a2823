"""The pretraining shard format, read and written: parquet files with one `text` column,
zstd-compressed, in row groups of 1024 documents, named `shard_NNNNN.parquet`; the last shard (in
sorted order) is the validation split. This is the layout of the public pretraining sets
(karpathy/fineweb-edu-100b-shuffle, climbmix-400b-shuffle), so `base_train` reads prepared,
downloaded and public shards the same way.

`iter_texts` streams the documents of a list of shards (local, s3:// or https://, fetched with
retries); `write_shards` packs documents into shards. Every failure is a `DataError` naming the shard.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from nanorun.pipeline import storage
from nanorun.pipeline.errors import StageError

ROW_GROUP_DOCS = 1024

DOWNLOAD_ATTEMPTS = 5  # tries per shard download before giving up

SHARD_NAME = "shard_{:05d}.parquet"


T = TypeVar("T")


class DataError(StageError):
    """Data could not be prepared, found or read (a shard missing, corrupt or of another schema); the
    message names the shard or source and says what to do."""


def user_cache_dir() -> Path:
    root = os.environ.get("NANORUN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "nanorun"
    )
    return Path(root).expanduser()


def parquet_file(source, uri: str):
    """`source` (a local path or a file object holding parquet file `uri`) as a pyarrow ParquetFile,
    or a DataError naming `uri`. pyarrow's own message is kept in ours; its stack is left out: it
    says nothing about which file is bad. The one way every parquet file is opened (shards, task data)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(source)
    except Exception as err:  # ArrowInvalid, OSError: truncated, garbage, not parquet at all
        raise DataError(f"shard {uri} is corrupt or not a parquet file: {err}") from None


def parquet_shard(source, uri: str):
    """`source` as a checked ParquetFile (see `parquet_file`) with a string `text` column."""
    import pyarrow as pa

    pf = parquet_file(source, uri)
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise DataError(f"shard {uri} has no 'text' column (columns: {schema.names})")
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise DataError(f"shard {uri} has a 'text' column of type {text_type}, not string")
    return pf


def read_texts(pf, uri: str, row_group: int) -> list[str]:
    """The documents of one row group of shard `uri` (a DataError naming it when they cannot be read)."""
    try:
        return pf.read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    except Exception as err:  # damage inside the file that its footer did not show
        raise DataError(f"shard {uri}: row group {row_group} is unreadable: {err}") from None


def is_remote(uri: str) -> bool:
    return storage.is_s3(uri) or uri.startswith(("http://", "https://"))


def with_retries(action: Callable[[], T], attempts: int, what: str) -> T:
    """`action()`, tried up to `attempts` times: network and server errors are usually transient, so
    each failure waits 0.5 s, 1 s, 2 s, ... (at most 30 s, with jitter, so parallel downloads do not
    retry in step). A DataError is final (a missing file, a refused request) and passes at once; the
    last failure becomes a DataError saying `what` failed."""
    for attempt in range(attempts):
        try:
            return action()
        except DataError:
            raise
        except Exception as err:
            if attempt == attempts - 1:
                raise DataError(f"{what}: failed after {attempts} attempts: {err}") from err
            time.sleep(min(30.0, 0.5 * 2**attempt) * (1 + random.random() / 2))
    raise AssertionError("unreachable")


def fetch(uri: str, dest: Path, attempts: int = DOWNLOAD_ATTEMPTS) -> None:
    """Copy shard `uri` (s3:// or https://) to the local file `dest`, retrying transient failures
    (see `with_retries`); a shard that does not exist is a DataError at once."""

    def once() -> None:
        try:
            if uri.startswith(("http://", "https://")):
                import httpx

                tmp = dest.with_suffix(".part")
                with httpx.stream("GET", uri, follow_redirects=True, timeout=60) as resp:
                    if resp.status_code == 404:
                        raise FileNotFoundError(uri)
                    resp.raise_for_status()
                    with open(tmp, "wb") as f:
                        for chunk in resp.iter_bytes(1 << 20):
                            f.write(chunk)
                tmp.replace(dest)
            else:
                storage.download_to(uri, dest)
        except FileNotFoundError as err:
            raise DataError(f"shard {uri} does not exist") from err

    with_retries(once, attempts, f"shard {uri} could not be downloaded")


def open_parquet(uri: str):
    """Shard `uri` (local, s3:// or https://) as a checked ParquetFile (see `parquet_shard`); a remote
    one is fetched first (`fetch`) and read from memory."""
    if is_remote(uri):
        with tempfile.TemporaryDirectory(prefix="nanorun-shard-") as tmp:
            local = Path(tmp) / "shard.parquet"
            fetch(uri, local)
            return parquet_shard(io.BytesIO(local.read_bytes()), uri)
    if not Path(uri).is_file():
        raise DataError(f"shard {uri} does not exist")
    return parquet_shard(uri, uri)


def iter_texts(
    shard_uris: list[str], max_chars: int | None = None, doc_cap: int | None = None
) -> Iterator[str]:
    """The documents of `shard_uris` in order, row group by row group; each cut to `doc_cap` characters,
    stopping once `max_chars` characters (after the cut) have been yielded."""
    seen = 0
    for uri in shard_uris:
        pf = open_parquet(uri)
        for rg in range(pf.num_row_groups):
            for text in read_texts(pf, uri, rg):
                if doc_cap is not None:
                    text = text[:doc_cap]
                yield text
                seen += len(text)
                if max_chars is not None and seen >= max_chars:
                    return


def write_shards(docs: list[str], out: str, shard_chars: int) -> list[str]:
    """Writes `docs` as about-equal shards of at most ~`shard_chars` characters; returns their names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = sum(len(d) for d in docs)
    num_shards = max(2, -(-total // shard_chars))
    per_shard = total / num_shards
    groups: list[list[str]] = [[]]
    filled = 0
    for doc in docs:
        if filled >= per_shard * len(groups) and len(groups) < num_shards:
            groups.append([])
        groups[-1].append(doc)
        filled += len(doc)
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, group in enumerate(groups):
            name = SHARD_NAME.format(i)
            local = Path(tmp, name)
            table = pa.table({"text": pa.array(group, type=pa.string())})
            pq.write_table(table, local, row_group_size=ROW_GROUP_DOCS, compression="zstd")
            storage.upload_from(local, storage.join(out, name))
            names.append(name)
    return names
