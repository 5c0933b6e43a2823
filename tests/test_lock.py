"""One pinned environment: uv.lock resolves pyproject.toml's dependencies, requirements/<extra>.txt
are its exports (what `make setup` and the three images install), and this checkout's environment
holds exactly those versions. `make lock` rewrites all of them."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).parent / "uv"
EXTRAS = ("operator", "trainer", "serving", "dev")


def uv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(UV), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def pins(path: Path) -> dict[str, str]:
    """name -> version of the lines of a requirements export whose markers hold here."""
    found = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                (spec,) = req.specifier
                assert spec.operator == "==", f"{path.name}: {line} is not pinned"
                found[canonicalize_name(req.name)] = spec.version
    return found


def test_the_lock_resolves_pyproject() -> None:
    out = uv("lock", "--check", "--offline")
    assert out.returncode == 0, f"uv.lock does not match pyproject.toml; run `make lock`:\n{out.stderr}"


@pytest.mark.parametrize("extra", EXTRAS)
def test_each_requirements_file_is_the_locks_export(extra: str, tmp_path: Path) -> None:
    exported = tmp_path / f"{extra}.txt"
    out = uv(
        "export", "-q", "--frozen", "--no-hashes", "--no-emit-project", "--extra", extra, "-o", str(exported)
    )
    assert out.returncode == 0, out.stderr
    assert pins(REPO / "requirements" / f"{extra}.txt") == pins(exported), (
        f"requirements/{extra}.txt is not uv.lock's export; run `make lock`"
    )


def test_the_exports_nest_like_the_extras() -> None:
    """serving holds trainer, dev holds every other; a package shared by two holds one version."""
    sets = {extra: pins(REPO / "requirements" / f"{extra}.txt") for extra in EXTRAS}
    assert sets["trainer"].items() <= sets["serving"].items()
    for extra in ("operator", "trainer", "serving"):
        assert sets[extra].items() <= sets["dev"].items(), extra
    assert "torch" not in sets["operator"] and "ray" in sets["serving"]


def test_this_environment_holds_the_locked_versions() -> None:
    locked = pins(REPO / "requirements" / "dev.txt")
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    wrong = {name: (installed.get(name), v) for name, v in locked.items() if installed.get(name) != v}
    assert not wrong, f"(installed, locked) differ, run `make setup`: {wrong}"
