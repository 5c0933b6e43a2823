"""`nanorun operator`: run the LLMRun operator (kopf underneath).

    nanorun operator                          watch every namespace (needs the ClusterRole)
    nanorun operator -n team-a -n team-b      watch these namespaces only
    nanorun operator --liveness-port 8080 --metrics-port 9090

Liveness is kopf's probe at `http://:<liveness-port>/healthz`; Prometheus metrics are served on
`--metrics-port`. Credentials: the in-cluster service account, else KUBECONFIG. The operator reads
stage progress from S3 with the standard AWS_* variables of its own environment, only under the
prefixes the tenancy policy (`--policy`, operator/api/tenancy.py) gives each run's namespace.
"""

from __future__ import annotations

import argparse
import logging
import os

from nanorun.operator import metrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanorun operator", description="Run the LLMRun operator.")
    p.add_argument(
        "-n", "--namespace", action="append", default=[], help="namespace to watch (repeatable); default: all"
    )
    p.add_argument(
        "--liveness-port",
        type=int,
        default=int(os.environ.get("NANORUN_LIVENESS_PORT", 8080)),
        help="port of the /healthz liveness endpoint (0 disables it)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("NANORUN_METRICS_PORT", 9090)),
        help="port of the Prometheus /metrics endpoint (0 disables it)",
    )
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=None,
        help="how often every run is re-read (progress files change without events); default 15",
    )
    p.add_argument(
        "--policy",
        default=os.environ.get("NANORUN_POLICY"),
        help="folder of the tenancy policy ConfigMap (operator/api/tenancy.py); default: everything allowed",
    )
    p.add_argument(
        "--ignore-namespace",
        action="append",
        default=None,
        help="namespace whose runs are left alone (repeatable); default: kube-system, kube-public, "
        "kube-node-lease",
    )
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resync_seconds is not None:
        os.environ["NANORUN_RESYNC_SECONDS"] = str(args.resync_seconds)
    if args.policy:
        os.environ["NANORUN_POLICY"] = args.policy
    if args.ignore_namespace is not None:
        os.environ["NANORUN_IGNORED_NAMESPACES"] = ",".join(args.ignore_namespace)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # kopf logs every handler call at INFO: thousands of lines with many runs
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    import kopf
    from nanorun.operator.loop import handlers

    if args.resync_seconds is not None:
        handlers.CONTROLLER.settings.resync_seconds = args.resync_seconds
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=liveness,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
