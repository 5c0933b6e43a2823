"""Prometheus metrics of the chat service: the single source of the `nanorun_serve_*` names.

Each replica process keeps one `ServeMetrics` (`serve_metrics()`), in a `prometheus_client`
registry of its own, and serves it on `GET /metrics` of the app (through Ray Serve's proxy, so a
scrape reaches one replica of the proxy's choosing) and, on a cluster, on its own port
(`export_replica_metrics()`, port `$NANORUN_SERVE_METRICS_PORT` of the pod): Prometheus scrapes
that port on every worker pod, one replica each, so every replica is its own series
(docs/monitoring.md):

    nanorun_serve_requests_total{status}            counter: finished requests by HTTP status / outcome
    nanorun_serve_time_to_first_token_seconds       histogram: request start to first generated token
    nanorun_serve_generated_tokens_total            counter: tokens generated (rate() = tokens/s)
    nanorun_serve_request_seconds                   histogram: whole-request latency
    nanorun_serve_inflight_requests                 gauge: requests holding a KV-cache row
    nanorun_serve_queued_requests                   gauge: requests waiting for a free row
    nanorun_serve_refused_requests_total{reason}    counter: requests refused before any route ran
                                                    (unauthorized, too_large, rate_limited;
                                                    nanorun.serving.access)
"""

from __future__ import annotations

import logging
import os
import threading

from nanorun.serving import SERVE_METRICS_PORT_ENV
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("nanorun.serving")

REQUESTS = "nanorun_serve_requests"  # prometheus_client adds the _total suffix of a counter
TIME_TO_FIRST_TOKEN = "nanorun_serve_time_to_first_token_seconds"
GENERATED_TOKENS = "nanorun_serve_generated_tokens"
REQUEST_SECONDS = "nanorun_serve_request_seconds"
INFLIGHT = "nanorun_serve_inflight_requests"
QUEUED = "nanorun_serve_queued_requests"
REFUSED = "nanorun_serve_refused_requests"  # counter: the _total suffix again
REFUSAL_REASONS = ("unauthorized", "too_large", "rate_limited")

SERIES = (  # the names Prometheus sees, as the dashboard queries them
    "nanorun_serve_requests_total",
    TIME_TO_FIRST_TOKEN,
    "nanorun_serve_generated_tokens_total",
    REQUEST_SECONDS,
    INFLIGHT,
    QUEUED,
    "nanorun_serve_refused_requests_total",
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    """The service's metrics in a registry of their own (so several apps in one process never clash)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            REQUESTS,
            "Chat completion requests by outcome (HTTP status code)",
            ["status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            TIME_TO_FIRST_TOKEN,
            "Seconds from request to first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            GENERATED_TOKENS, "Tokens generated for clients", registry=self.registry
        )
        self.request_seconds = Histogram(
            REQUEST_SECONDS,
            "Seconds per chat completion request",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            INFLIGHT, "Requests being generated (holding a KV-cache row)", registry=self.registry
        )
        self.queued = Gauge(QUEUED, "Requests waiting for a free KV-cache row", registry=self.registry)
        self.refused = Counter(
            REFUSED,
            "Requests refused before reaching a route, by reason (unauthorized, too_large, rate_limited)",
            ["reason"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:  # every reason's series exists from the start, at 0
            self.refused.labels(reason=reason)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_PROCESS_METRICS = ServeMetrics()


def serve_metrics() -> ServeMetrics:
    """This process's metrics: one per Ray Serve replica process.

    The app reaches them through this function, never through a module global of its own: Ray
    Serve's ingress serialises the route methods by value, which would give them a private copy."""
    return _PROCESS_METRICS


_exporter_lock = threading.Lock()
_exporter_port: int | None = None


def export_replica_metrics(port: int | None = None) -> int | None:
    """Serve this process's metrics on `port` (default `$NANORUN_SERVE_METRICS_PORT`; unset: not
    at all) of all interfaces, once per process. Returns the port served on, or None.

    A port already taken (a second replica on the same pod, which the operator's placement rules
    out) is logged and skipped: that replica's series stay on the app's `GET /metrics` only."""
    global _exporter_port
    if port is None:
        port = int(os.environ.get(SERVE_METRICS_PORT_ENV) or 0) or None
    with _exporter_lock:
        if port is None or _exporter_port is not None:
            return _exporter_port
        try:
            start_http_server(port, registry=_PROCESS_METRICS.registry)
        except OSError as err:
            log.warning("replica metrics not served on port %d: %s", port, err)
            return None
        _exporter_port = port
        log.info("replica metrics on :%d/metrics", port)
        return port
