"""The bundled corpus: the English prose of two Debian documentation packages (the Linux kernel's
documentation and Python's), about 32 MB of text, fetched with `apt-get download` (see docs/data.md
for licenses) and packed into shards (`nanorun data prepare`). Building it takes seconds once the
packages are downloaded; it is cached and idempotent: `manifest.json`, written last, marks a
complete set.
"""

from __future__ import annotations

import io
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from nanorun.pipeline import storage
from nanorun.trainer.data.shards import DataError, user_cache_dir, write_shards

MANIFEST = "manifest.json"

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
