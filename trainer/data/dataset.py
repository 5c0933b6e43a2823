"""Which shards a data URI means (`resolve_shards`, what every stage's `--data` goes through), and the
`nanorun data` command that builds or downloads them.

    nanorun data prepare --out URI [--source bundled|DIR|FILE.deb ...] [--shard-chars N]
    nanorun data download --dataset fineweb-edu|climbmix --shards N --out URI [--workers 4]

The shard format is in shards.py, the bundled corpus in corpus.py, downloads in download.py.
"""

from __future__ import annotations

import argparse
import sys

from nanorun.pipeline import layout, storage
from nanorun.trainer.data.corpus import prepare
from nanorun.trainer.data.download import HF_DATASETS, download_shards, hf_shard_urls
from nanorun.trainer.data.shards import DataError, user_cache_dir


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
