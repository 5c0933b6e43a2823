"""The project's images, built from the Dockerfile by tools/images.sh (`make images`), run as OCI
containers with podman and runc (Debian's packages).

Containers get explicit rlimits: podman's defaults ask for more than a container host may allow.
Each container this module starts carries the label `nanorun.test`, so a test run that was killed
leaves nothing that the next one cannot find and remove."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
REGISTRY = "ghcr.io/nanorun"
NAMES = ("operator", "trainer", "serving")
# The test cluster's test images (tests/kube/images/Dockerfile).
TEST_NAMES = ("fake-stage", "s3", "init")
LABEL = "nanorun.test=1"


def version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def image_ref(name: str) -> str:
    return f"{REGISTRY}/nanorun-{name}:{version()}"


def missing_tools() -> list[str]:
    return [tool for tool in ("buildah", "podman", "runc") if not shutil.which(tool)]


def build_images() -> dict[str, str]:
    """Builds (or, with unchanged sources and lock, reuses) the three images and the test images;
    name -> reference."""
    names = (*NAMES, *TEST_NAMES)
    out = subprocess.run(
        [str(REPO / "tools" / "images.sh"), "build"],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "IMAGES": " ".join(names)},
    )
    assert out.returncode == 0, f"tools/images.sh build failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return {name: image_ref(name) for name in names}


def ulimits() -> list[str]:
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return ["--ulimit", f"nofile={files}:{files}", "--ulimit", "nproc=8192:8192"]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        ["podman", "--runtime", "runc", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {out.returncode}:\n{out.stderr[-4000:]}")
    return out


@dataclass
class Container:
    """How to run a container, as podman flags."""

    image: str
    command: list[str] = field(default_factory=list)
    volumes: dict[str, str] = field(default_factory=dict)  # host path -> container path
    env: dict[str, str] = field(default_factory=dict)
    network: str = "none"
    shm_size: str | None = None
    publish: dict[int, int] = field(default_factory=dict)  # loopback port -> container port

    def flags(self) -> list[str]:
        flags = ["--label", LABEL, *ulimits(), "--network", self.network]
        for host, path in self.volumes.items():
            flags += ["--volume", f"{host}:{path}"]
        for key, value in self.env.items():
            flags += ["--env", f"{key}={value}"]
        if self.shm_size:
            flags += ["--shm-size", self.shm_size]
        for port, target in self.publish.items():
            flags += ["--publish", f"127.0.0.1:{port}:{target}"]
        return flags

    def run(self, timeout: float = 300) -> subprocess.CompletedProcess:
        """Runs to completion; the result carries the exit code and both streams."""
        return podman("run", "--rm", *self.flags(), self.image, *self.command, timeout=timeout, check=False)

    def start(self) -> str:
        """Starts in the background; returns the container's id."""
        return podman("run", "--detach", *self.flags(), self.image, *self.command).stdout.strip()


def logs(container: str) -> str:
    out = podman("logs", container, check=False)
    return out.stdout + out.stderr


def exec_in(container: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return podman("exec", container, *argv, timeout=timeout, check=False)


def remove(container: str) -> None:
    podman("rm", "--force", "--time", "2", container, check=False, timeout=60)


def remove_test_containers() -> None:
    ids = podman("ps", "--all", "--quiet", "--filter", f"label={LABEL}", check=False).stdout.split()
    if ids:
        podman("rm", "--force", "--time", "0", *ids, check=False, timeout=120)


def image_config(ref: str) -> dict:
    """The image's OCI config (User, Env, Cmd, Entrypoint, WorkingDir)."""
    return json.loads(podman("image", "inspect", ref).stdout)[0]["Config"]
