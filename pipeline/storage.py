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

Torch-free on purpose: the operator image imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from nanorun.pipeline.errors import StageError


class StorageError(StageError):
    """A storage operation failed in a way the caller should report (missing object, bad URI)."""


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


@cache
def _s3_client_cached(endpoint: str | None, pid: int):
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 8, "mode": "adaptive"}, max_pool_connections=32)
    return boto3.client("s3", endpoint_url=endpoint or None, config=config)


def s3_client():
    """A boto3 S3 client for the endpoint in the environment (one per process and endpoint)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return _s3_client_cached(endpoint, os.getpid())


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


def exists(uri: str) -> bool:
    if is_s3(uri):
        loc = parse_s3(uri)
        try:
            s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
            return True
        except Exception as err:  # botocore ClientError
            if _is_missing(err):
                return False
            raise
    return Path(uri).exists()


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        loc = parse_s3(uri)
        return _read_with_retries(
            uri, lambda: s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
        )
    return Path(uri).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        loc = parse_s3(uri)
        s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
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
        return _read_with_retries(
            uri,
            lambda: digest(s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].iter_chunks(CHUNK)),
        )
    with open(uri, "rb") as f:
        return digest(iter(lambda: f.read(CHUNK), b""))


def list_files(prefix: str) -> list[str]:
    """Every file below `prefix` (recursive), as full URIs, sorted."""
    if is_s3(prefix):
        loc = parse_s3(prefix)
        key_prefix = loc.key + "/" if loc.key else ""
        out = []
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=key_prefix):
            for obj in page.get("Contents", []):
                out.append(f"s3://{loc.bucket}/{obj['Key']}")
        return sorted(out)
    root = Path(prefix)
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def file_sizes(prefix: str) -> dict[str, int]:
    """{path relative to `prefix`: size in bytes} of every file below `prefix` (one listing on S3)."""
    if is_s3(prefix):
        loc = parse_s3(prefix)
        key_prefix = loc.key + "/" if loc.key else ""
        out = {}
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=key_prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(key_prefix) :]] = obj["Size"]
        return out
    root = Path(prefix)
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in map(Path, list_files(prefix))}


def list_dirs(prefix: str) -> list[str]:
    """Names (not URIs) of the immediate sub-directories of `prefix`, sorted."""
    if is_s3(prefix):
        loc = parse_s3(prefix)
        key_prefix = loc.key + "/" if loc.key else ""
        names = []
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=key_prefix, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                names.append(cp["Prefix"][len(key_prefix) :].strip("/"))
        return sorted(names)
    root = Path(prefix)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def delete(uri: str) -> None:
    """Delete one file; a missing file is no error."""
    if is_s3(uri):
        loc = parse_s3(uri)
        s3_client().delete_object(Bucket=loc.bucket, Key=loc.key)  # S3: deleting a missing key succeeds
        return
    Path(uri).unlink(missing_ok=True)


def delete_prefix(prefix: str) -> int:
    """Delete everything below `prefix`; returns the number of files removed."""
    if is_s3(prefix):
        files = list_files(prefix)
        loc = parse_s3(prefix)
        client = s3_client()
        for i in range(0, len(files), 1000):
            chunk = [{"Key": parse_s3(u).key} for u in files[i : i + 1000]]
            client.delete_objects(Bucket=loc.bucket, Delete={"Objects": chunk})
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
        _read_with_retries(uri, lambda: s3_client().download_file(loc.bucket, loc.key, str(local_path)))
    else:
        shutil.copyfile(uri, local_path)
    return local_path


def upload_from(local_path: str | Path, uri: str) -> None:
    """Copy one local file to `uri` (multipart for large files on S3; atomic locally)."""
    if is_s3(uri):
        loc = parse_s3(uri)
        s3_client().upload_file(str(local_path), loc.bucket, loc.key)
        return
    dst = Path(uri)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(local_path, tmp)
    os.replace(tmp, dst)


def walk_local(root: str | Path) -> Iterator[Path]:
    yield from sorted(p for p in Path(root).rglob("*") if p.is_file())
