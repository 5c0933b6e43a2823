"""Build times and sizes of the three images (tools/images.sh, buildah) and how fast they start.

    python bench/images.py              # warm: a rebuild over buildah's cached layers
    python bench/images.py --cold       # also a build into empty builder storage (about 15 min)

Prints one JSON line: each image's size (MB, uncompressed, as `podman image inspect` reports it),
the seconds of a warm `tools/images.sh build` (every layer cached) in all and per image, with
--cold the same for a build from nothing but the base image into a fresh storage folder
(downloading every wheel and crate again), and the median seconds of `podman run --rm IMAGE true` (create, start and remove a
container) over five runs of each image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.images.containers import NAMES, REPO, image_ref, podman, ulimits  # noqa: E402


def timed_build(env: dict[str, str]) -> dict[str, float]:
    """Seconds of a `tools/images.sh build`: in all, and per image as the script prints them."""
    started = time.monotonic()
    out = subprocess.run(
        [str(REPO / "tools" / "images.sh"), "build"], env=env, check=True, capture_output=True, text=True
    ).stdout
    per_image = {m[0]: float(m[1]) for m in re.findall(r"built \S+/nanorun-(\w+):\S+ in (\d+) s", out)}
    return {"all": round(time.monotonic() - started, 1), **per_image}


def cold_build() -> dict[str, float]:
    """A build into an empty storage folder (only the base image copied in)."""
    base = subprocess.run(
        [
            "buildah",
            "images",
            "--noheading",
            "--format",
            "{{.Name}}:{{.Tag}}",
            "--filter",
            "reference=localhost/debian:*-minbase",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    with tempfile.TemporaryDirectory(prefix="nanorun-images-cold-", dir="/var/tmp") as tmp:
        conf = Path(tmp) / "storage.conf"
        conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{tmp}/graph"\nrunroot = "{tmp}/run"\n')
        env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}
        archive = Path(tmp) / "base.tar"
        podman("save", "--format", "oci-archive", "-o", str(archive), base, timeout=600)
        subprocess.run(["podman", "load", "-i", str(archive)], env=env, check=True, capture_output=True)
        archive.unlink()
        try:
            return timed_build(env)
        finally:
            subprocess.run(["buildah", "rm", "--all"], env=env, capture_output=True)
            subprocess.run(["podman", "system", "reset", "--force"], env=env, capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)


def start_seconds(ref: str, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.monotonic()
        podman("run", "--rm", *ulimits(), "--network", "none", "--entrypoint", "true", ref)
        times.append(time.monotonic() - started)
    return round(statistics.median(times), 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cold", action="store_true", help="also build into empty builder storage")
    args = p.parse_args()
    timed_build(dict(os.environ))  # make sure every layer is cached
    warm = timed_build(dict(os.environ))
    result = {
        "bench": "images",
        "size_mb": {
            name: round(json.loads(podman("image", "inspect", image_ref(name)).stdout)[0]["Size"] / 1e6)
            for name in NAMES
        },
        "build_warm_s": warm,
        "start_s": {name: start_seconds(image_ref(name)) for name in NAMES},
    }
    if args.cold:
        result["build_cold_s"] = cold_build()
    result |= {"cpus": os.cpu_count(), "machine": platform.machine()}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
