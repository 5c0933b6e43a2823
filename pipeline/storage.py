"""Run storage: one small API over a local directory and `s3://bucket/prefix`.

Every stage reads its inputs from and writes its outputs to a run directory given as a URI
(`--run-dir`). This module is the only place that knows the difference between a local path and
S3, so stages, the operator (which reads progress.json) and the local executor share it.

- S3 endpoint and credentials come from the standard AWS environment variables
  (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
  `AWS_DEFAULT_REGION`), exactly as boto3 reads them.
- Local writes are atomic (write to a temporary file, then rename), so a reader never sees half a
  file; S3 PUTs are atomic by nature.
- Transient S3 errors (5xx, SlowDown, reset connections) are retried by botocore's adaptive retry
  mode, request by request. What botocore does not retry, this module does: a GET whose body is
  cut short after the headers arrived (`read_bytes`, `download_to`), with `READ_ATTEMPTS` tries.
  Reads never see half an object: a short body is an error (botocore checks Content-Length), never
  data. tests/fixtures/faulty_s3.py is the proxy the tests use to check this at 5% faults.
- In a stage process (`wait_out_outages()`, which `setup_stage` calls), an unreachable store
  (connections refused or reset, 5xx and throttling answers after botocore's own retries gave up)
  is waited out: every S3 operation is tried again, whole, with jittered
  exponential backoff up to `BACKOFF_CAP_SECONDS`, for up to `outage_seconds()` in all
  (NANORUN_STORAGE_OUTAGE_SECONDS, default 15 minutes). Then it raises `StorageUnavailable`. Every
  operation here is idempotent (a PUT writes the same bytes again), so a repeat is safe. The budget
  sits above the executor's stall timeout and below the collective timeout: an outage a run can
  ride out (minutes) costs it nothing; a longer one shows as a stall (no progress, stacks in
  storage once it returns) rather than a crash loop; and a rank waiting out storage inside a
  checkpoint never makes the ranks waiting for it in a barrier time out first. A thread that must
  not wait (the heartbeat thread) works inside `impatient()`: one try, fewer botocore attempts.
  Other processes (the operator, whose handlers must not block for minutes) fail as botocore does.
- `AWS_MAX_ATTEMPTS`, when set, replaces botocore's attempts per request (8 by default), as boto3
  itself reads it.

Torch-free on purpose: the operator image imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from nanorun.pipeline.errors import StageError


class StorageError(StageError):
    """A storage operation failed in a way the caller should report (missing object, bad URI)."""


class StorageUnavailable(StorageError):
    """The store stayed unreachable for longer than `outage_seconds()`."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def parse_s3(uri: str) -> S3Location:
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"s3 URI has no bucket: {uri!r}")
    return S3Location(bucket, key.strip("/"))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        out = uri.rstrip("/")
        for p in parts:
            p = str(p).strip("/")
            if p:
                out += "/" + p
        return out
    return str(Path(uri, *[str(p) for p in parts]))


OUTAGE_SECONDS_ENV = "NANORUN_STORAGE_OUTAGE_SECONDS"
OUTAGE_SECONDS = 900.0  # above a stall timeout of minutes, below the 30-minute collective timeout
BACKOFF_CAP_SECONDS = 30.0  # the longest wait between two tries of an operation on an unreachable store
CONNECT_TIMEOUT_SECONDS = 10  # botocore's default (60 s) times 8 attempts is 8 minutes on a dropped route
_thread = threading.local()
_process = {"wait_out_outages": False}


def outage_seconds() -> float:
    """How long one operation keeps trying an unreachable store (NANORUN_STORAGE_OUTAGE_SECONDS)."""
    return float(os.environ.get(OUTAGE_SECONDS_ENV) or OUTAGE_SECONDS)


def wait_out_outages(on: bool = True) -> None:
    """Whether this process's S3 operations wait out an unreachable store (see the module doc)."""
    _process["wait_out_outages"] = on


@contextmanager
def impatient() -> Iterator[None]:
    """Within the block, this thread's S3 operations are tried once (2 botocore attempts), not
    waited out: for work that is tried again anyway (a heartbeat) and must not block for minutes."""
    before = getattr(_thread, "impatient", False)
    _thread.impatient = True
    try:
        yield
    finally:
        _thread.impatient = before


@cache
def _s3_client_cached(endpoint: str | None, pid: int, attempts: int):
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": attempts, "mode": "adaptive"},
        max_pool_connections=32,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
    )
    return boto3.client("s3", endpoint_url=endpoint or None, config=config)


def s3_client():
    """A boto3 S3 client for the endpoint in the environment (one per process, endpoint and
    patience)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or 8)
    if getattr(_thread, "impatient", False):
        attempts = min(attempts, 2)
    return _s3_client_cached(endpoint, os.getpid(), attempts)


# Answers of a store that is there but cannot serve now (botocore retried them already).
_UNAVAILABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "RequestLimitExceeded",
}


def _is_unreachable(err: BaseException | None) -> bool:
    """Whether `err` (or the error it wraps: boto3's transfer manager wraps what it met) says the
    store could not be reached or could not serve: a connection refused, reset or timed out, or a
    5xx/throttling answer. Not: a missing object, a denied request, a bad request."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError
    from urllib3.exceptions import HTTPError

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, HTTPClientError, HTTPError)):
            return True
        if isinstance(err, ClientError):
            response = err.response or {}
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return status >= 500 or response.get("Error", {}).get("Code") in _UNAVAILABLE_CODES
        err = getattr(err, "last_exception", None) or err.__cause__ or err.__context__
    return False


def _waiting_out_outages(uri: str, operation: Callable[[], Any]) -> Any:
    """`operation()` (one whole S3 operation on `uri`), tried again while the store is unreachable,
    for up to `outage_seconds()`; a line on stderr when the wait starts and when it ends."""
    start = delay = None
    while True:
        try:
            result = operation()
        except Exception as err:
            waits = _process["wait_out_outages"] and not getattr(_thread, "impatient", False)
            if not waits or not _is_unreachable(err):
                raise
            now = time.monotonic()
            if start is None:
                start, delay = now, 1.0
                print(
                    f"storage unreachable ({type(err).__name__}) at {uri}: trying again for up to "
                    f"{outage_seconds():.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
            if now - start >= outage_seconds():
                raise StorageUnavailable(
                    f"storage unreachable for {now - start:.0f} s at {uri} (the limit, "
                    f"{OUTAGE_SECONDS_ENV}, is {outage_seconds():.0f} s): {err}"
                ) from err
            time.sleep(min(random.uniform(delay / 2, delay), max(0.0, start + outage_seconds() - now)))
            delay = min(2 * delay, BACKOFF_CAP_SECONDS)
            continue
        if start is not None:
            print(
                f"storage reachable again after {time.monotonic() - start:.0f} s at {uri}",
                file=sys.stderr,
                flush=True,
            )
        return result


READ_ATTEMPTS = 5  # tries of a whole GET (request and body) when its body is cut short


def _is_missing(err: Exception) -> bool:
    code = (
        (getattr(err, "response", None) or {}).get("Error", {}).get("Code", "")
    )  # None on connection errors
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def _is_cut_short(err: Exception) -> bool:
    """A transport failure botocore did not retry: the connection broke while the body streamed.
    (Errors before the response, and 5xx/SlowDown answers, botocore has already retried.) An error
    answer's body (a 404's XML) is read inside botocore itself, which lets urllib3's ProtocolError
    through when that body is cut."""
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError

    return isinstance(err, (IncompleteReadError, ReadTimeoutError, ResponseStreamingError, ProtocolError))


def _read_with_retries(uri: str, read: Any) -> Any:
    """`read()` (one whole GET of `uri`), again with jittered backoff while its body is cut short."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read()
        except Exception as err:
            if _is_missing(err):
                raise FileNotFoundError(uri) from err
            if attempt == READ_ATTEMPTS or not _is_cut_short(err):
                raise
            time.sleep(random.uniform(0, min(0.1 * 2**attempt, 5)))
    raise AssertionError("unreachable")


def _list_objects(bucket: str, key_prefix: str) -> list[dict[str, Any]]:
    """Every object below `key_prefix` (one whole listing, all its pages: what a repeat repeats)."""
    paginator = s3_client().get_paginator("list_objects_v2")
    return [
        obj
        for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix)
        for obj in page.get("Contents", [])
    ]


def exists(uri: str) -> bool:
    if is_s3(uri):
        loc = parse_s3(uri)

        def head() -> bool:
            try:
                s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
                return True
            except Exception as err:  # botocore ClientError
                if _is_missing(err):
                    return False
                raise

        return _waiting_out_outages(uri, head)
    return Path(uri).exists()


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        loc = parse_s3(uri)
        return _waiting_out_outages(
            uri,
            lambda: _read_with_retries(
                uri, lambda: s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
            ),
        )
    return Path(uri).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        loc = parse_s3(uri)
        _waiting_out_outages(uri, lambda: s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data))
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def read_json_or_none(uri: str) -> Any | None:
    """The JSON document at `uri`, or None when it does not exist or is not valid JSON yet."""
    try:
        return json.loads(read_bytes(uri))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def json_bytes(obj: Any) -> bytes:
    """The bytes `write_json` writes for `obj` (so a caller can checksum exactly what was stored)."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json_bytes(obj))


CHUNK = 1 << 20
CHECKSUM_BYTES = 16  # BLAKE2b-128: fast, and far beyond what accidental damage could ever collide with


def checksum(data: bytes) -> str:
    """The content checksum of `data` (BLAKE2b-128, hex): what a checkpoint's COMMITTED marker records."""
    return hashlib.blake2b(data, digest_size=CHECKSUM_BYTES).hexdigest()


def file_checksum(uri: str | Path) -> str:
    """`checksum` of a file's contents, read in 1 MiB chunks (a file of gigabytes is never held in
    memory). On S3 the whole GET is tried again, from the start, when its body is cut short."""

    def digest(chunks: Any) -> str:
        h = hashlib.blake2b(digest_size=CHECKSUM_BYTES)
        for chunk in chunks:
            h.update(chunk)
        return h.hexdigest()

    uri = str(uri)
    if is_s3(uri):
        loc = parse_s3(uri)
        return _waiting_out_outages(
            uri,
            lambda: _read_with_retries(
                uri,
                lambda: digest(
                    s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].iter_chunks(CHUNK)
                ),
            ),
        )
    with open(uri, "rb") as f:
        return digest(iter(lambda: f.read(CHUNK), b""))


def list_files(prefix: str) -> list[str]:
    """Every file below `prefix` (recursive), as full URIs, sorted."""
    if is_s3(prefix):
        loc = parse_s3(prefix)
        key_prefix = loc.key + "/" if loc.key else ""
        objects = _waiting_out_outages(prefix, lambda: _list_objects(loc.bucket, key_prefix))
        return sorted(f"s3://{loc.bucket}/{obj['Key']}" for obj in objects)
    root = Path(prefix)
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def file_sizes(prefix: str) -> dict[str, int]:
    """{path relative to `prefix`: size in bytes} of every file below `prefix` (one listing on S3)."""
    if is_s3(prefix):
        loc = parse_s3(prefix)
        key_prefix = loc.key + "/" if loc.key else ""
        objects = _waiting_out_outages(prefix, lambda: _list_objects(loc.bucket, key_prefix))
        return {obj["Key"][len(key_prefix) :]: obj["Size"] for obj in objects}
    root = Path(prefix)
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in map(Path, list_files(prefix))}


def list_dirs(prefix: str) -> list[str]:
    """Names (not URIs) of the immediate sub-directories of `prefix`, sorted."""
    if is_s3(prefix):
        loc = parse_s3(prefix)
        key_prefix = loc.key + "/" if loc.key else ""

        def names() -> list[str]:
            paginator = s3_client().get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=loc.bucket, Prefix=key_prefix, Delimiter="/")
            return [
                cp["Prefix"][len(key_prefix) :].strip("/")
                for page in pages
                for cp in page.get("CommonPrefixes", [])
            ]

        return sorted(_waiting_out_outages(prefix, names))
    root = Path(prefix)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def delete(uri: str) -> None:
    """Delete one file; a missing file is no error."""
    if is_s3(uri):
        loc = parse_s3(uri)
        # S3: deleting a missing key succeeds, so a repeat after a lost answer does too
        _waiting_out_outages(uri, lambda: s3_client().delete_object(Bucket=loc.bucket, Key=loc.key))
        return
    Path(uri).unlink(missing_ok=True)


def delete_prefix(prefix: str) -> int:
    """Delete everything below `prefix`; returns the number of files removed."""
    if is_s3(prefix):
        files = list_files(prefix)
        loc = parse_s3(prefix)
        for i in range(0, len(files), 1000):
            chunk = [{"Key": parse_s3(u).key} for u in files[i : i + 1000]]
            _waiting_out_outages(
                prefix,
                lambda chunk=chunk: s3_client().delete_objects(Bucket=loc.bucket, Delete={"Objects": chunk}),
            )
        return len(files)
    root = Path(prefix)
    if not root.exists():
        return 0
    n = sum(1 for p in root.rglob("*") if p.is_file())
    shutil.rmtree(root)
    return n


def download_to(uri: str, local_path: str | Path) -> Path:
    """Copy one file to a local path (a plain copy for local URIs)."""
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        loc = parse_s3(uri)  # s3transfer writes a temporary file and renames it when complete
        _waiting_out_outages(
            uri,
            lambda: _read_with_retries(
                uri, lambda: s3_client().download_file(loc.bucket, loc.key, str(local_path))
            ),
        )
    else:
        shutil.copyfile(uri, local_path)
    return local_path


def upload_from(local_path: str | Path, uri: str) -> None:
    """Copy one local file to `uri` (multipart for large files on S3; atomic locally)."""
    if is_s3(uri):
        loc = parse_s3(uri)
        _waiting_out_outages(uri, lambda: s3_client().upload_file(str(local_path), loc.bucket, loc.key))
        return
    dst = Path(uri)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(local_path, tmp)
    os.replace(tmp, dst)


def walk_local(root: str | Path) -> Iterator[Path]:
    yield from sorted(p for p in Path(root).rglob("*") if p.is_file())
