"""Pretraining shards: the bundled corpus, prepare from text, resolve/iterate (local and S3), and the
download of public shards against a local HTTP server (this machine has no internet; the server plays
Hugging Face: Range requests, X-Linked-ETag checksums, injected failures)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import threading
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nanorun.pipeline import storage
from nanorun.trainer.data import dataset
from nanorun.trainer.data.corpus import prepare
from nanorun.trainer.data.dataset import resolve_shards
from nanorun.trainer.data.download import download_shards
from nanorun.trainer.data.shards import DataError, iter_texts

from tests.fixtures.tiny_run import real_english_documents


@pytest.fixture(scope="session")
def bundled_dir():
    if not shutil.which("apt-get"):
        pytest.skip("the bundled corpus is fetched with apt-get (Debian/Ubuntu only)")
    shards = resolve_shards("bundled")
    return os.path.dirname(shards[0])


def test_bundled_corpus_is_real_english_of_at_least_20_mb(bundled_dir):
    manifest = storage.read_json(os.path.join(bundled_dir, "manifest.json"))
    assert manifest["chars"] >= 20_000_000
    assert any(s.startswith("linux-doc") for s in manifest["sources"])
    text = " ".join(iter_texts(resolve_shards(bundled_dir), max_chars=200_000))
    words = text.lower().split()
    common = sum(words.count(w) for w in ("the", "of", "and", "to", "is"))
    assert common / len(words) > 0.08  # English prose: these five words alone are ~10% of running text
    licenses = os.listdir(os.path.join(bundled_dir, "LICENSES"))
    assert len(licenses) == 2 and all(name.endswith(".copyright") for name in licenses)


def test_shards_have_the_fineweb_layout(bundled_dir):
    shards = resolve_shards(bundled_dir)
    assert len(shards) >= 2 and [os.path.basename(s) for s in shards] == sorted(
        os.path.basename(s) for s in shards
    )
    for shard in shards:
        pf = pq.ParquetFile(shard)
        assert pf.schema_arrow.names == ["text"]
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        assert all(n == 1024 for n in sizes[:-1]) and 0 < sizes[-1] <= 1024


def test_prepare_is_idempotent(bundled_dir):
    before = {f: os.path.getmtime(os.path.join(bundled_dir, f)) for f in os.listdir(bundled_dir)}
    prepare(bundled_dir)
    assert {f: os.path.getmtime(os.path.join(bundled_dir, f)) for f in os.listdir(bundled_dir)} == before


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    for i, doc in enumerate(real_english_documents()):
        (root / f"doc_{i:04d}.txt").write_text(doc)
    return root


def test_prepare_from_a_text_directory_to_s3(text_dir, s3_run_dir):
    out = f"{s3_run_dir}/data"
    manifest = prepare(out, [str(text_dir)], shard_chars=150_000)
    shards = resolve_shards(out)
    assert [s.rsplit("/", 1)[1] for s in shards] == manifest["shards"] and all(
        s.startswith("s3://") for s in shards
    )
    docs = list(iter_texts(shards))
    assert len(docs) == manifest["documents"] and sum(map(len, docs)) == manifest["chars"]
    # Documents are re-cut at paragraph boundaries and shuffled, but every word of the source is kept.
    assert Counter(" ".join(docs).split()) == Counter(" ".join(real_english_documents()).split())


def test_iter_texts_caps_documents_and_stops_at_max_chars(text_dir, tmp_path):
    prepare(str(tmp_path), [str(text_dir)], shard_chars=150_000)
    docs = list(iter_texts(resolve_shards(str(tmp_path)), max_chars=10_000, doc_cap=300))
    assert all(len(d) <= 300 for d in docs)
    assert 10_000 <= sum(map(len, docs)) < 10_300


def test_the_cli_prepares_shards(text_dir, tmp_path):
    assert dataset.main(["prepare", "--source", str(text_dir), "--out", str(tmp_path)]) == 0
    assert len(resolve_shards(str(tmp_path))) == 2


def test_unknown_source_is_a_clear_error(tmp_path, capsys):
    assert (
        dataset.main(["prepare", "--source", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 1
    )
    assert "neither 'bundled', a .deb file nor a directory" in capsys.readouterr().err


def test_resolve_shards_of_an_empty_directory_explains_how_to_make_shards(tmp_path):
    with pytest.raises(DataError, match="nanorun data prepare"):
        resolve_shards(str(tmp_path))


def test_hf_uris_resolve_to_urls_with_the_validation_shard_last():
    urls = resolve_shards("hf://karpathy/fineweb-edu-100b-shuffle?shards=3")
    assert urls == [
        f"https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{i:05d}.parquet"
        for i in (0, 1, 2, 1822)
    ]
    assert len(resolve_shards("hf://karpathy/climbmix-400b-shuffle")) == 6543
    with pytest.raises(DataError, match="unknown Hugging Face dataset"):
        resolve_shards("hf://someone/else")


# ---- download against a local HTTP server ----------------------------------------------------------


def parquet_bytes(texts: list[str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, compression="zstd")
    return buf.getvalue()


class ShardServer:
    """Serves shard_NNNNN.parquet like Hugging Face, with Range support and scripted failures."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.fail = files, [], {}  # fail: name -> list of statuses to send first
        self.bad_sha: set[str] = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(200 if self.path.lstrip("/") in server.files else 404)
                self.end_headers()

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if server.fail.get(name):
                    self.send_response(server.fail[name].pop(0))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if name not in server.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files[name]
                sha = "0" * 64 if name in server.bad_sha else hashlib.sha256(data).hexdigest()
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("X-Linked-ETag", f'"{sha}"')
                self.end_headers()
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def shard_server():
    docs = real_english_documents()
    files = {f"shard_{i:05d}.parquet": parquet_bytes(docs[i * 50 : (i + 1) * 50]) for i in (0, 1, 2)}
    files["shard_06542.parquet"] = parquet_bytes(docs[200:250])  # climbmix's validation shard
    server = ShardServer(files)
    yield server
    server.httpd.shutdown()


def test_download_fetches_train_shards_and_the_validation_shard(shard_server, tmp_path):
    rc = dataset.main(
        [
            "download",
            "--dataset",
            "climbmix",
            "--shards",
            "2",
            "--out",
            str(tmp_path),
            "--base-url",
            shard_server.url,
        ]
    )
    assert rc == 0
    names = ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    assert sorted(os.listdir(tmp_path)) == names
    assert all((tmp_path / n).read_bytes() == shard_server.files[n] for n in names)
    assert resolve_shards(str(tmp_path))[-1].endswith("shard_06542.parquet")


def test_download_skips_finished_shards_and_resumes_partial_ones(shard_server, tmp_path):
    data = shard_server.files["shard_00001.parquet"]
    (tmp_path / "shard_00000.parquet").write_bytes(shard_server.files["shard_00000.parquet"])
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "shard_00001.parquet.part").write_bytes(data[:1000])
    urls = [f"{shard_server.url}/shard_{i:05d}.parquet" for i in (0, 1)]
    download_shards(urls, str(tmp_path))
    assert (tmp_path / "shard_00001.parquet").read_bytes() == data
    assert shard_server.requests == [("shard_00001.parquet", "bytes=1000-")]


def test_download_retries_transient_errors(shard_server, tmp_path):
    shard_server.fail["shard_00002.parquet"] = [503, 500]
    download_shards([f"{shard_server.url}/shard_00002.parquet"], str(tmp_path), retries=3)
    assert (tmp_path / "shard_00002.parquet").read_bytes() == shard_server.files["shard_00002.parquet"]
    assert len(shard_server.requests) == 3


def test_download_rejects_a_checksum_mismatch(shard_server, tmp_path):
    shard_server.bad_sha.add("shard_00000.parquet")
    with pytest.raises(DataError, match="sha256 mismatch"):
        download_shards([f"{shard_server.url}/shard_00000.parquet"], str(tmp_path), retries=1)
    assert not (tmp_path / "shard_00000.parquet").exists()


def test_download_of_a_missing_shard_fails_without_retrying(shard_server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download_shards(
            [f"{shard_server.url}/shard_00000.parquet", f"{shard_server.url}/shard_09999.parquet"],
            str(tmp_path),
        )
    assert [r for r in shard_server.requests if r[0] == "shard_09999.parquet"] == [
        ("shard_09999.parquet", None)
    ]


def test_download_offline_fails_fast_with_a_clear_message(tmp_path, capsys):
    closed = socket_port_with_nothing_listening()
    t0 = time.time()
    rc = dataset.main(
        ["download", "--shards", "1", "--out", str(tmp_path), "--base-url", f"http://127.0.0.1:{closed}"]
    )
    assert rc == 1 and time.time() - t0 < 10
    assert "looks offline" in capsys.readouterr().err


def test_download_to_s3(shard_server, s3_run_dir):
    urls = [f"{shard_server.url}/shard_{i:05d}.parquet" for i in (0, 6542)]
    paths = download_shards(urls, f"{s3_run_dir}/shards")
    assert storage.read_bytes(paths[1]) == shard_server.files["shard_06542.parquet"]
    assert resolve_shards(f"{s3_run_dir}/shards") == paths


def socket_port_with_nothing_listening() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
