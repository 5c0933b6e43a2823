"""Load a Hugging Face dataset split as rows, from its parquet files, with a cache in run storage.

    rows = load_rows("openai/gsm8k", "main", "test", cache="s3://bucket/run/task_data")

- Which files make up a split is asked from the Hub's parquet listing
  (`{HF_ENDPOINT}/api/datasets/{repo}/parquet/{config}/{split}`, a JSON list of URLs); each file is
  downloaded once and kept under `<cache>/{repo}/{config}/{split}/NNNN.parquet` (a local directory
  or an s3:// prefix, usually `<run-dir>/task_data`), so every rank and every later stage reads the
  cached copy. A `files.json` written after the last file marks the split complete; parquet files
  copied into that folder by hand are used as they are.
- `HF_ENDPOINT` (the Hub's own variable) points at a mirror; `HF_TOKEN` is sent if set;
  `HF_HUB_OFFLINE=1` skips the network and uses only the cache.
- Without network and without a cached copy, `TaskDataUnavailable` says what was tried and how to
  provide the files; task mixtures catch it and fall back to tasks that need no download.
"""

from __future__ import annotations

import io
import os
from typing import Any

from nanorun.pipeline import storage
from nanorun.pipeline.errors import StageError

DEFAULT_ENDPOINT = "https://huggingface.co"
MANIFEST = "files.json"


class TaskDataUnavailable(StageError):
    """A dataset could not be downloaded and is not in the cache. `reason` is the one-line version."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _get(url: str) -> bytes:
    import httpx

    headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
    response = httpx.get(
        url, headers=headers, follow_redirects=True, timeout=httpx.Timeout(60.0, connect=10.0)
    )
    response.raise_for_status()
    return response.content


def cache_prefix(cache: str, repo: str, config: str, split: str) -> str:
    return storage.join(cache, *repo.split("/"), config, split)


def parquet_urls(repo: str, config: str, split: str) -> list[str]:
    """The URLs of the parquet files of one split, from the Hub's parquet listing."""
    import json

    listing = json.loads(_get(f"{_endpoint()}/api/datasets/{repo}/parquet/{config}/{split}"))
    if not isinstance(listing, list) or not all(isinstance(u, str) for u in listing) or not listing:
        raise TaskDataUnavailable(f"unexpected parquet listing for {repo}/{config}/{split}: {listing!r:.200}")
    return listing


def download_split(repo: str, config: str, split: str, cache: str) -> list[str]:
    """The cached parquet files of a split, downloading them first if the cache has none."""
    prefix = cache_prefix(cache, repo, config, split)
    manifest = storage.read_json_or_none(storage.join(prefix, MANIFEST))
    if isinstance(manifest, list):  # written after the last file: a half-downloaded split is not used
        return [storage.join(prefix, name) for name in manifest]
    copied = sorted(f for f in storage.list_files(prefix) if f.endswith(".parquet"))
    if copied:  # files a person copied in by hand
        return copied
    where = f"{_endpoint()}/api/datasets/{repo}/parquet/{config}/{split}"
    hint = (
        f"Task data {repo} ({config}/{split}) is not cached under {prefix} and could not be downloaded "
        f"from {where}{{reason}}. Give this machine network access to the Hub, set HF_ENDPOINT to a "
        f"mirror, or copy the split's parquet files into {prefix}/."
    )
    if _offline():
        raise TaskDataUnavailable(
            hint.format(reason=" (HF_HUB_OFFLINE is set)"), "not cached; HF_HUB_OFFLINE is set"
        )
    try:
        blobs = [_get(url) for url in parquet_urls(repo, config, split)]  # all or nothing reaches the cache
    except Exception as err:  # network, HTTP status, DNS: all mean "not available from here"
        if isinstance(err, TaskDataUnavailable):
            raise
        reason = f"{type(err).__name__}: {err}"
        raise TaskDataUnavailable(
            hint.format(reason=f" ({reason})"), f"not cached; download failed ({reason})"
        ) from err
    names = [f"{n:04d}.parquet" for n in range(len(blobs))]
    for name, data in zip(names, blobs, strict=True):
        storage.write_bytes(storage.join(prefix, name), data)
    storage.write_json(storage.join(prefix, MANIFEST), names)
    return [storage.join(prefix, name) for name in names]


def load_rows(repo: str, config: str, split: str, cache: str) -> list[dict[str, Any]]:
    """All rows of a split as dicts (column name -> Python value)."""
    from nanorun.trainer.data.shards import parquet_file

    rows: list[dict[str, Any]] = []
    for uri in download_split(repo, config, split, cache):
        rows.extend(parquet_file(io.BytesIO(storage.read_bytes(uri)), uri).read().to_pylist())
    return rows


def default_cache() -> str:
    """Where tasks cache their data when no run directory is given."""
    return os.environ.get(
        "NANORUN_TASK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanorun", "task_data")
    )
