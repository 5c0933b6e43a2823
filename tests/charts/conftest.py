"""Fixtures for the chart tests: the pinned helm binary and a renderer of the chart.

helm is the one `make setup-kube` builds next to the test kube-apiserver (tests/kube/build.sh);
`NANORUN_HELM=/path/to/helm` points the tests at another build.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.binaries import bin_dir

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "nanorun"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.36.3"  # the test API server's version (tests/kube/go.mod)
MONITORING_API = "monitoring.coreos.com/v1"

Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def helm_bin() -> str:
    path = os.environ.get("NANORUN_HELM") or str(bin_dir() / "helm")
    if not os.access(path, os.X_OK):
        pytest.fail(f"helm is not built ({path} missing); run `make setup-kube`", pytrace=False)
    return path


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([helm, *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"`helm {' '.join(args)}` exited {out.returncode}:\n{out.stderr.strip()}")
    return out


def template_args(
    values: list[Path | str] = (),
    sets: list[str] = (),
    api_versions: list[str] = (),
    release: str = "nanorun",
    namespace: str = "nanorun-system",
) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    for path in values:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    for api in api_versions:
        args += ["--api-versions", api]
    return args


@pytest.fixture(scope="session")
def render(helm_bin: str) -> Render:
    """render(values=[...], sets=[...], api_versions=[...]) -> the chart's objects (hooks included)."""

    def _render(**kwargs: Any) -> list[dict[str, Any]]:
        text = run_helm(helm_bin, *template_args(**kwargs)).stdout
        return [doc for doc in yaml.safe_load_all(text) if doc]

    return _render


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = find(objects, kind)
    assert len(matches) == 1, f"expected one {kind}, got {[m['metadata']['name'] for m in matches]}"
    return matches[0]
