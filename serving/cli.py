"""`nanorun serve`: run the chat service on this machine with Ray Serve and print its URL.

    nanorun serve --checkpoint .runs/demo                     # newest trained stage of a run
    nanorun serve --checkpoint s3://bucket/runs/d20/sft --port 8000 --host 0.0.0.0

Starts a local Ray instance, deploys `build_app` (the same application a RayService runs) at `/`,
prints the web UI and API URLs, and serves until Ctrl-C. The checkpoint is checked before Ray
starts, so a wrong URI fails fast with a clear message.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

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
            }
        ),
        name=SERVE_APP_NAME,
        route_prefix="/",
    )
    host = "localhost" if args.host in ("0.0.0.0", "127.0.0.1") else args.host
    url = f"http://{host}:{args.port}"
    print(
        f"nanorun serve: {checkpoint}\n  web UI   {url}/\n  API      {url}/v1  (OpenAI-compatible)\n"
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
