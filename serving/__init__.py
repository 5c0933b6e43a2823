"""nanorun.serving: the Ray Serve chat application (OpenAI-compatible API, batching, web UI).

`SERVE_IMPORT_PATH` names the application builder. The operator's RayService serveConfigV2,
`nanorun serve` and the tests all use this one constant. This module stays import-light (no torch,
no ray) because the operator imports it.
"""

SERVE_IMPORT_PATH = "nanorun.serving.app:build_app"
SERVE_APP_NAME = "chat"
SERVE_DEPLOYMENT_NAME = "ChatDeployment"
