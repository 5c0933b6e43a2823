"""nanorun.serving: the Ray Serve chat application (OpenAI-compatible API, batching, web UI).

`SERVE_IMPORT_PATH` names the application builder. The operator's RayService serveConfigV2,
`nanorun serve` and the tests all use this one constant. This module stays import-light (no torch,
no ray) because the operator imports it.

The numbers the operator and the replicas must agree on live here too:

- `SERVE_SLOTS`: KV-cache rows of a replica's continuous-batching scheduler (requests decoded
  together). A replica accepts `2 * SERVE_SLOTS` requests (a batch and a queue of the same size)
  and the autoscaler aims at `SERVE_SLOTS` per replica: a replica is scaled out once its batch is full.
- `SERVE_METRICS_PORT`: the port on which each replica serves its own `/metrics` when the pod sets
  `SERVE_METRICS_PORT_ENV` (the operator does, on the Ray worker pods). One replica per worker pod,
  so each pod's port is one replica and Prometheus keeps one series per replica (label `pod`).
- `SERVE_MAX_REQUEST_BYTES`, `SERVE_RATE_LIMIT_PER_MINUTE`: the access rules' defaults, the same
  for `spec.serving`, `build_app` and `nanorun serve`.
- `SERVE_API_KEYS_DIR`: where the operator mounts the API keys Secret on the worker pods, and so
  the `api_keys_file` the application reads them from.

`checkpoint_digest(uri)` is how the service names the checkpoint it serves in public (`/healthz`):
a digest, so no response reveals a bucket or a path, and whoever knows the URI can compare.
"""

import hashlib

SERVE_IMPORT_PATH = "nanorun.serving.app:build_app"
SERVE_APP_NAME = "chat"
SERVE_DEPLOYMENT_NAME = "ChatDeployment"
SERVE_SLOTS = 16
SERVE_METRICS_PORT = 8001
SERVE_METRICS_PORT_ENV = "NANORUN_SERVE_METRICS_PORT"
# The Ray custom resource a worker pod offers once and a replica takes: one replica per pod.
SERVE_REPLICA_RESOURCE = "nanorun_chat_replica"
# A request body's size cap (bytes) and each API key's requests per minute per replica, by default.
SERVE_MAX_REQUEST_BYTES = 1024 * 1024
SERVE_RATE_LIMIT_PER_MINUTE = 120
# Where a worker pod mounts the LLMRun's serving.apiKeysSecret (read-only), the replica's api_keys_file.
SERVE_API_KEYS_DIR = "/etc/nanorun/api-keys"


def checkpoint_digest(uri: str) -> str:
    """The first 16 hex digits of the SHA-256 of a checkpoint URI (without a trailing slash)."""
    return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
