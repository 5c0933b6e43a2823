"""Pretraining text in the FineWeb-Edu shard format, and the `nanorun data` command.

    nanorun data prepare --out URI [--source bundled|DIR|FILE.deb ...] [--shard-chars N]
    nanorun data download --dataset fineweb-edu|climbmix --shards N --out URI [--workers 4]

A shard is a parquet file with one `text` column, zstd-compressed, in row groups of 1024 documents,
named `shard_NNNNN.parquet`; the last shard (in sorted order) is the validation split. This is the
layout of the public pretraining sets (karpathy/fineweb-edu-100b-shuffle, climbmix-400b-shuffle), so
`base_train` reads prepared, downloaded and public shards the same way.

`prepare` with no `--source` builds the bundled corpus: the English prose of two Debian documentation
packages (the Linux kernel's documentation and Python's), about 32 MB of text, fetched with
`apt-get download` (see docs/data.md for licenses). Building it takes seconds once the packages are
downloaded; it is cached and idempotent: `manifest.json`, written last, marks a complete set.

`resolve_shards` turns a data URI into the list of shard URIs every stage uses; `iter_texts` streams
their documents.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from nanorun.pipeline import layout, storage
from nanorun.pipeline.errors import StageError

MANIFEST = "manifest.json"
ROW_GROUP_DOCS = 1024
DOWNLOAD_ATTEMPTS = 5  # tries per shard download before giving up
SHARD_NAME = "shard_{:05d}.parquet"

# Public shard sets on Hugging Face: base URL and number of shards (the last one is validation).
HF_DATASETS = {
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1823),
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6543),
}
HF_BASE = "https://huggingface.co/datasets/{repo}/resolve/main"

# The bundled corpus: Debian documentation packages, tried in order per part (names differ across
# Debian and Ubuntu releases). Only the reStructuredText sources of the English pages are used.
BUNDLED_PARTS = {
    "linux-doc": ["linux-doc-6.1", "linux-doc"],
    "python-doc": ["python3.11-doc", "python3.12-doc", "python3.13-doc"],
}
DEB_TEXT = re.compile(r"/html/_sources/.*\.(rst|txt)(\.txt)?$")
DEB_SKIP = re.compile(r"/translations/")
DEB_LICENSE = re.compile(r"^\./usr/share/doc/[^/]+/copyright$")
DOC_CHARS = 4000  # documents are cut at paragraph boundaries to about this size, like web pages


T = TypeVar("T")


class DataError(StageError):
    """Data could not be prepared, found or read (a shard missing, corrupt or of another schema); the
    message names the shard or source and says what to do."""


# ---- shards: where they are, and their text -------------------------------------------------------


def user_cache_dir() -> Path:
    root = os.environ.get("NANORUN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "nanorun"
    )
    return Path(root).expanduser()


def hf_shard_urls(repo: str, num_shards: int, count: int | None = None) -> list[str]:
    """URLs of the first `count` training shards plus the validation shard (the last one)."""
    base = HF_BASE.format(repo=repo)
    ids = list(range(num_shards - 1)) if count is None else list(range(min(count, num_shards - 1)))
    return [f"{base}/{SHARD_NAME.format(i)}" for i in [*ids, num_shards - 1]]


def resolve_shards(data_uri: str, run_dir: str | None = None) -> list[str]:
    """The sorted shard URIs of a data source; the last one is the validation shard.

    data_uri: a local directory, an s3:// prefix, `hf://<owner>/<dataset>[?shards=N]` (a known public
    set, as https URLs), or "bundled" (built on first use into `<run_dir>/data/bundled`, or into the
    user cache when run_dir is None).
    """
    if data_uri == "bundled":
        out = layout.bundled_data_dir(run_dir) if run_dir else str(user_cache_dir() / "data" / "bundled")
        prepare(out)
        return resolve_shards(out)
    if data_uri.startswith("hf://"):
        repo, _, query = data_uri[len("hf://") :].partition("?")
        known = {r: n for r, n in HF_DATASETS.values()}
        if repo not in known:
            raise DataError(
                f"unknown Hugging Face dataset {repo!r}; known: {sorted(known)}. Download other "
                "shards to a directory or s3:// prefix and pass that instead."
            )
        count = int(query.split("=", 1)[1]) if query.startswith("shards=") else None
        return hf_shard_urls(repo, known[repo], count)
    shards = [u for u in storage.list_files(data_uri) if u.endswith(".parquet")]
    if len(shards) < 2:
        raise DataError(
            f"{data_uri} holds {len(shards)} parquet shard(s); at least 2 are needed (train + "
            "validation). Create them with `nanorun data prepare --out URI` or `nanorun data download`."
        )
    return shards


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


# ---- the bundled corpus: prose from Debian documentation packages ---------------------------------


def fetch_deb(candidates: list[str], cache: Path) -> Path:
    """A downloaded .deb of the first candidate apt can fetch (cached in `cache`)."""
    cache.mkdir(parents=True, exist_ok=True)
    for name in candidates:
        found = sorted(cache.glob(f"{name}_*.deb"))
        if found:
            return found[-1]
    if not shutil.which("apt-get"):
        raise DataError(
            "the bundled corpus is built from Debian documentation packages, and apt-get is not "
            f"available here. Download one of {candidates} as a .deb elsewhere and pass it with "
            "--source FILE.deb, or pass --source DIR with your own text files."
        )
    errors = []
    for name in candidates:
        # Download into a private directory, then rename: a concurrent build never sees half a file.
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            proc = subprocess.run(
                ["apt-get", "download", "-q", name], cwd=tmp, capture_output=True, text=True
            )
            found = sorted(Path(tmp).glob(f"{name}_*.deb"))
            if proc.returncode == 0 and found:
                return Path(shutil.move(str(found[-1]), cache / found[-1].name))
        errors.append(
            f"{name}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        )
    raise DataError(
        "could not download any of "
        + ", ".join(candidates)
        + " with apt-get ("
        + "; ".join(errors)
        + "). Run `apt-get update` first, or pass --source FILE.deb / --source DIR."
    )


def deb_data_tar(deb: Path) -> tarfile.TarFile:
    """The data archive of a .deb (an `ar` archive holding data.tar.{xz,gz,bz2,zst})."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DataError(f"{deb} is not a Debian package (no ar header)")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            body = f.read(size)
            f.read(size % 2)  # ar members are 2-byte aligned
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    body = subprocess.run(["zstd", "-dc"], input=body, capture_output=True, check=True).stdout
                    return tarfile.open(fileobj=io.BytesIO(body), mode="r:")
                return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
    raise DataError(f"{deb} has no data.tar member")


def clean_rst(text: str) -> str:
    """Drops reStructuredText scaffolding that is not prose: heading under/overlines and SPDX tags."""
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if len(s) >= 3 and len(set(s)) == 1 and not s[0].isalnum():
            continue
        if s.startswith(".. SPDX-License-Identifier"):
            continue
        keep.append(line)
    return "\n".join(keep).strip()


def split_documents(text: str, doc_chars: int = DOC_CHARS) -> list[str]:
    """Cuts one long page into documents of about `doc_chars` at paragraph boundaries."""
    docs, current, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        if current and size + len(para) > doc_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        docs.append("\n\n".join(current))
    return docs


def documents_from_deb(deb: Path, licenses: dict[str, str]) -> list[str]:
    docs = []
    with deb_data_tar(deb) as tar:
        for member in tar:
            if not member.isfile():
                continue
            if DEB_LICENSE.match(member.name):
                licenses[deb.name] = tar.extractfile(member).read().decode("utf-8", "replace")
            elif DEB_TEXT.search(member.name) and not DEB_SKIP.search(member.name):
                text = tar.extractfile(member).read().decode("utf-8", "replace")
                docs += split_documents(clean_rst(text))
    return docs


def documents_from_dir(root: Path) -> list[str]:
    docs = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".rst")):
        docs += split_documents(path.read_text("utf-8", errors="replace"))
    return docs


def prepare(out: str, sources: list[str] | None = None, shard_chars: int = 4_000_000, seed: int = 0) -> dict:
    """Builds shards from `sources` (default: the bundled corpus) into `out`; a no-op when `out` already
    holds a complete set. Returns the manifest."""
    done = storage.read_json_or_none(storage.join(out, MANIFEST))
    if done is not None:
        return done
    t0 = time.time()
    licenses: dict[str, str] = {}
    docs: list[str] = []
    used = []
    for source in sources or ["bundled"]:
        if source == "bundled":
            for candidates in BUNDLED_PARTS.values():
                deb = fetch_deb(candidates, user_cache_dir() / "debs")
                docs += documents_from_deb(deb, licenses)
                used.append(deb.name)
        elif source.endswith(".deb"):
            docs += documents_from_deb(Path(source), licenses)
            used.append(Path(source).name)
        elif Path(source).is_dir():
            docs += documents_from_dir(Path(source))
            used.append(source)
        else:
            raise DataError(
                f"--source {source!r} is neither 'bundled', a .deb file nor a directory of text files"
            )
    if not docs:
        raise DataError(f"no text found in {used}")
    # Shuffle so the validation shard (the last) is drawn from the same mix as the training shards.
    random.Random(seed).shuffle(docs)
    names = write_shards(docs, out, shard_chars)
    for deb_name, text in licenses.items():
        storage.write_text(storage.join(out, "LICENSES", deb_name.split("_")[0] + ".copyright"), text)
    manifest = {
        "shards": names,
        "sources": used,
        "documents": len(docs),
        "chars": sum(len(d) for d in docs),
        "seconds": round(time.time() - t0, 2),
    }
    storage.write_json(storage.join(out, MANIFEST), manifest)
    return manifest


# ---- downloading public shards --------------------------------------------------------------------


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


# ---- the command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanorun data", description="Build or download pretraining shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="pack text into parquet shards (default: the bundled English corpus)")
    p.add_argument("--out", required=True, help="output directory or s3:// prefix")
    p.add_argument(
        "--source",
        action="append",
        help="'bundled', a .deb, or a directory of .txt/.md/.rst files (repeatable; default: bundled)",
    )
    p.add_argument("--shard-chars", type=int, default=4_000_000, help="characters per shard (about)")
    d = sub.add_parser("download", help="download public pretraining shards (Hugging Face)")
    d.add_argument(
        "--dataset", choices=sorted(HF_DATASETS), default="climbmix", help="which public shard set"
    )
    d.add_argument(
        "--shards", type=int, required=True, help="number of training shards (the validation shard is added)"
    )
    d.add_argument("--out", required=True, help="output directory or s3:// prefix")
    d.add_argument("--workers", type=int, default=4, help="parallel downloads")
    d.add_argument("--base-url", help="a mirror serving shard_NNNNN.parquet (default: Hugging Face)")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            m = prepare(args.out, args.source, args.shard_chars)
            print(
                f"{len(m['shards'])} shards, {m['documents']} documents, {m['chars'] / 1e6:.1f}M chars in {args.out}"
            )
        else:
            repo, total = HF_DATASETS[args.dataset]
            urls = hf_shard_urls(repo, total, args.shards)
            if args.base_url:
                urls = [f"{args.base_url.rstrip('/')}/{u.rsplit('/', 1)[1]}" for u in urls]
            paths = download_shards(urls, args.out, workers=args.workers)
            print(f"{len(paths)} shards in {args.out} (the last is validation)")
    except DataError as err:
        print(f"nanorun data: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
