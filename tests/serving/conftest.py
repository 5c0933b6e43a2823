"""One Ray Serve chat service for the whole test session (starting Ray costs ~20 s on 2 cores).

`chat_service` starts a local Ray instance (2 CPUs, a small object store), starts Serve's HTTP proxy
on a free port, and deploys the chat application from a Serve config the way a RayService does
(`import_path` = `nanorun.serving.SERVE_IMPORT_PATH`, the checkpoint in `args` and `user_config`),
serving the random tiny model of `tiny_chat_run`. It yields a `ChatService` with the base URL, the
API key its keys file holds (`key`, `headers`), and a `deploy(checkpoint)` that changes only
`user_config`, as a checkpoint rollout does. The service has no rate limit (the tests make many
requests with one key); tests/serving/test_access.py covers the limits.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from nanorun.serving import SERVE_APP_NAME, SERVE_DEPLOYMENT_NAME, SERVE_IMPORT_PATH, checkpoint_digest

SLOTS = 16
API_KEY = "sk-nanorun-test-" + "0123456789abcdef" * 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_config(args_checkpoint: str, checkpoint: str, keys_file: str) -> dict:
    return {
        "applications": [
            {
                "name": SERVE_APP_NAME,
                "route_prefix": "/",
                "import_path": SERVE_IMPORT_PATH,
                "args": {
                    "checkpoint": args_checkpoint,
                    "slots": SLOTS,
                    "device": "cpu",
                    "api_keys_file": keys_file,
                    "rate_limit_per_minute": 0,
                },
                "deployments": [
                    {
                        "name": SERVE_DEPLOYMENT_NAME,
                        "num_replicas": 1,
                        "ray_actor_options": {"num_cpus": 1},
                        "user_config": {"checkpoint": checkpoint},
                    }
                ],
            }
        ]
    }


@dataclass
class ChatService:
    url: str
    args_checkpoint: str
    keys_file: str
    key: str = API_KEY

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def health(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=30).json()

    def post(self, path: str, body: dict, **kwargs) -> httpx.Response:
        """POST JSON to a route with the API key."""
        return httpx.post(f"{self.url}{path}", json=body, headers=self.headers, **{"timeout": 60, **kwargs})

    def deploy(self, checkpoint: str) -> None:
        """Apply a Serve config whose only change is `user_config.checkpoint` and wait until the
        replica reports that checkpoint (what the operator does when a new checkpoint lands)."""
        from nanorun.trainer.chat.engine import resolve_checkpoint
        from ray import serve
        from ray.serve.schema import ServeDeploySchema

        client = serve.context._get_global_client()
        # Not Serve's own blocking wait: it gives up after a fixed 60 s, which a loaded machine can
        # take to start a replica; the reported checkpoint is the condition that matters.
        client.deploy_apps(
            ServeDeploySchema(**serve_config(self.args_checkpoint, checkpoint, self.keys_file))
        )
        digest = checkpoint_digest(resolve_checkpoint(checkpoint))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                health = self.health()
                if health.get("ready") and health.get("checkpoint_digest") == digest:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"the service did not load {checkpoint}: {self.health()}")


@pytest.fixture(scope="session")
def chat_service(tiny_chat_run, tmp_path_factory) -> Iterator[ChatService]:
    ray = pytest.importorskip("ray")
    from ray import serve

    ray.init(
        num_cpus=2,
        object_store_memory=80 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    keys_file = tmp_path_factory.mktemp("api_keys") / "keys.txt"
    keys_file.write_text(f"{API_KEY}\n")
    service = ChatService(
        url=f"http://127.0.0.1:{port}", args_checkpoint=tiny_chat_run, keys_file=str(keys_file)
    )
    try:
        service.deploy(tiny_chat_run)
        yield service
    finally:
        serve.shutdown()
        ray.shutdown()
