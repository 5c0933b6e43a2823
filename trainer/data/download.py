"""Downloading public pretraining shard sets (Hugging Face's fineweb-edu and climbmix, or a mirror
of them): in parallel, resuming partial files, each checked against its size, sha256 and parquet
magic bytes (`nanorun data download`).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from nanorun.pipeline import storage
from nanorun.trainer.data.shards import SHARD_NAME, DataError, user_cache_dir, with_retries

# Public shard sets on Hugging Face: base URL and number of shards (the last one is validation).
HF_DATASETS = {
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1823),
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6543),
}

HF_BASE = "https://huggingface.co/datasets/{repo}/resolve/main"


def hf_shard_urls(repo: str, num_shards: int, count: int | None = None) -> list[str]:
    """URLs of the first `count` training shards plus the validation shard (the last one)."""
    base = HF_BASE.format(repo=repo)
    ids = list(range(num_shards - 1)) if count is None else list(range(min(count, num_shards - 1)))
    return [f"{base}/{SHARD_NAME.format(i)}" for i in [*ids, num_shards - 1]]


def download_one(client, url: str, out: str, retries: int, part_dir: Path) -> str:
    """Downloads one shard to `out`, resuming a partial file with a Range request; checks its size
    against Content-Length, its sha256 against the server's X-Linked-ETag (Hugging Face sends one for
    LFS files) and its parquet magic bytes. Retries transient failures (see `with_retries`)."""
    name = url.rsplit("/", 1)[1]
    dest = storage.join(out, name)
    if storage.exists(dest):
        return dest
    part = part_dir / (name + ".part")

    def once() -> str:
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with client.stream("GET", url, headers=headers) as resp:
            if resp.status_code in (401, 403, 404):
                raise DataError(f"{url}: HTTP {resp.status_code} (no such shard, or access denied)")
            if resp.status_code == 416:  # the part file is already complete
                resp.read()
                expected = have
            else:
                resp.raise_for_status()
                if resp.status_code != 206:
                    have = 0  # the server ignored the Range header: start over
                length = int(resp.headers.get("content-length", -1))
                expected = have + length if length >= 0 else -1
                with open(part, "ab" if have else "wb") as f:
                    for chunk in resp.iter_bytes(1 << 20):
                        f.write(chunk)
            sha = (resp.headers.get("x-linked-etag") or "").strip('"')
        size = part.stat().st_size
        if expected >= 0 and size != expected:
            raise OSError(f"{url}: got {size} bytes, expected {expected}")
        with open(part, "rb") as f:
            data = f.read()
        if len(sha) == 64 and hashlib.sha256(data).hexdigest() != sha:
            part.unlink()
            raise OSError(f"{url}: sha256 mismatch (corrupt download); starting over")
        if data[:4] != b"PAR1" or data[-4:] != b"PAR1":
            part.unlink()
            raise OSError(f"{url}: not a parquet file; starting over")
        storage.upload_from(part, dest)
        part.unlink()
        return dest

    return with_retries(once, retries + 1, url)


def download_shards(urls: list[str], out: str, workers: int = 4, retries: int = 5) -> list[str]:
    """Downloads `urls` into `out` (dir or s3://) in parallel; already-present shards are skipped and
    partial ones resumed. Fails fast, before any download, when the host cannot be reached."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlsplit

    import httpx

    # Partial files live beside a local `out`; for S3 in the user cache, one folder per destination.
    key = hashlib.sha1(out.encode()).hexdigest()[:12]
    part_dir = user_cache_dir() / "partial" / key if storage.is_s3(out) else Path(out) / ".partial"
    timeout = httpx.Timeout(60.0, connect=10.0)
    with httpx.Client(follow_redirects=True, timeout=timeout) as client:
        try:
            client.head(urls[0])
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            host = urlsplit(urls[0]).netloc
            raise DataError(
                f"cannot reach {host} ({err}): this machine looks offline. Download the shards "
                "elsewhere (or pass --base-url for a mirror), or build the bundled corpus with "
                "`nanorun data prepare --out URI`."
            ) from err
        part_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            paths = list(pool.map(lambda u: download_one(client, u, out, retries, part_dir), urls))
    shutil.rmtree(part_dir, ignore_errors=True)
    return paths
