"""`nanorun serve`: run the chat service on this machine with Ray Serve and print its URL.

    nanorun serve --checkpoint .runs/demo --allow-unauthenticated      # this machine only, no keys
    nanorun serve --checkpoint s3://bucket/runs/d20/sft --api-keys-file keys.txt --host 0.0.0.0

Starts a local Ray instance, deploys `build_app` (the same application a RayService runs) at `/`,
prints the web UI and API URLs, and serves until Ctrl-C. The checkpoint and the keys are checked
before Ray starts, so a wrong URI or an unreadable keys file fails fast with a clear message.

The API (`/v1/*`, `/api/*`) needs `Authorization: Bearer <key>` with a key from `--api-keys-file`
(one per line; re-read when it changes, so keys rotate without a restart), unless
`--allow-unauthenticated` says that anyone who reaches the port may use it; one of the two is
required. `--max-request-bytes` caps request bodies (413 above it) and `--rate-limit` the requests
per minute of each key (429 over it; 0 = unlimited); see `nanorun.serving.access`.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from nanorun.serving.access import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_RATE_LIMIT_PER_MINUTE, KeysFile

NO_ACCESS_RULE = (
    "give --api-keys-file FILE (API keys, one per line; clients send 'Authorization: Bearer <key>') "
    "or --allow-unauthenticated (anyone who reaches the port may use the API)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nanorun serve", description="Serve a checkpoint: OpenAI-compatible chat API and web UI."
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint dir, stage dir or run dir (local path or s3://)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: <run-dir>/tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--slots", type=int, default=16, help="requests decoded together (KV-cache rows)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="compute device")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance")
    access = p.add_mutually_exclusive_group()
    access.add_argument(
        "--api-keys-file",
        default=None,
        metavar="FILE",
        help="file of API keys, one per line (or a directory of such files); re-read when it changes",
    )
    access.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve /v1 and /api without keys (rate-limited per client address)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"largest request body accepted (default {DEFAULT_MAX_REQUEST_BYTES}: 1 MiB)",
    )
    p.add_argument(
        "--rate-limit",
        type=int,
        default=DEFAULT_RATE_LIMIT_PER_MINUTE,
        metavar="PER_MINUTE",
        help=f"requests per minute of each key (default {DEFAULT_RATE_LIMIT_PER_MINUTE}; 0 = unlimited)",
    )
    return p


def check_access(args: argparse.Namespace) -> str | None:
    """Why the access flags cannot serve (None: they can): no keys file and no opt-out, or a keys
    file that cannot be read or holds no key."""
    if not args.api_keys_file and not args.allow_unauthenticated:
        return NO_ACCESS_RULE
    if args.api_keys_file:
        keys = KeysFile(args.api_keys_file)
        if not keys.path.exists():
            return f"--api-keys-file {args.api_keys_file}: no such file or directory"
        if not keys.digests():
            return f"--api-keys-file {args.api_keys_file}: no API key in it (one per line, at least 16 characters)"
    if not 1024 <= args.max_request_bytes <= 64 * 1024 * 1024:
        return "--max-request-bytes must be between 1024 and 67108864"
    if args.rate_limit < 0:
        return "--rate-limit must be 0 (unlimited) or more"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_access(args)
    if problem:
        print(f"nanorun serve: {problem}", file=sys.stderr)
        return 2
    if args.allow_unauthenticated and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"nanorun serve: no API keys on {args.host}: anyone who reaches port {args.port} may use the API",
            file=sys.stderr,
        )

    from nanorun.trainer.chat.engine import resolve_checkpoint
    from nanorun.trainer.training.checkpoint import CheckpointError

    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"nanorun serve: {e}", file=sys.stderr)
        return 2

    import ray
    from nanorun.serving import SERVE_APP_NAME
    from nanorun.serving.app import build_app
    from ray import serve

    num_gpus = 1 if args.device != "cpu" and _cuda_available() else 0
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(
        build_app(
            {
                "checkpoint": checkpoint,
                "tokenizer": args.tokenizer,
                "slots": args.slots,
                "device": args.device,
                "num_gpus": num_gpus,
                "api_keys_file": str(Path(args.api_keys_file).resolve()) if args.api_keys_file else None,
                "allow_unauthenticated": args.allow_unauthenticated,
                "max_request_bytes": args.max_request_bytes,
                "rate_limit_per_minute": args.rate_limit,
            }
        ),
        name=SERVE_APP_NAME,
        route_prefix="/",
    )
    host = "localhost" if args.host in ("0.0.0.0", "127.0.0.1") else args.host
    url = f"http://{host}:{args.port}"
    keys = (
        f"API keys from {args.api_keys_file}"
        if args.api_keys_file
        else "no API keys: anyone who reaches the port may use the API"
    )
    print(
        f"nanorun serve: {checkpoint}\n  web UI   {url}/\n  API      {url}/v1  (OpenAI-compatible; {keys})\n"
        f"  explain  {url}/explain/tokenizer, /explain/training, /explain/next-token, /explain/attention\n"
        f"  metrics  {url}/metrics\nCtrl-C to stop.",
        flush=True,
    )

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
