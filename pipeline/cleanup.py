"""`nanorun delete-run URI`: delete a run's files. What `storage.cleanupOnDelete` runs, as a Job in
the run's namespace with the run's own S3 credentials (operator/children/cleanup.py), when the LLMRun is
deleted.

    nanorun delete-run s3://bucket/runs/r1
"""

from __future__ import annotations

import argparse
import sys

from nanorun.pipeline import storage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="nanorun delete-run", description="Delete a run's files from its storage."
    )
    p.add_argument("run_dir", help="the run directory (its storage.uri) whose files go")
    args = p.parse_args(argv)
    deleted = storage.delete_prefix(args.run_dir)
    print(f"deleted {deleted} files under {args.run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
