"""The three Dockerfiles (trainer/, operator/, serving/) follow the image conventions. Images cannot
be built on this machine (no Docker, no registry access), so this reads them: pinned base images,
a non-root user, every COPY source present in the repository and not hidden by .dockerignore, no
secrets baked in, small layers, a `nanorun` command, and base images that carry the versions the
project needs (the serving image's Ray is the RayService's rayVersion)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
from nanorun.operator.api import DEFAULT_IMAGE, DEFAULT_RAY_VERSION
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {name: REPO / name / "Dockerfile" for name in ("trainer", "operator", "serving")}
SECRET_WORDS = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


@dataclass
class Stage:
    base: str
    alias: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args_of(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages with their instructions; comments dropped, continuation lines joined."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, args = line.strip().partition(" ")
        name, args = name.upper(), args.strip()
        if name == "FROM":
            words = [w for w in args.split() if not w.startswith("--platform")]
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], alias=alias))
        else:
            assert stages, f"{path}: {name} before FROM"
            stages[-1].instructions.append((name, args))
    return stages


def copy_sources(args: str) -> tuple[list[str], dict[str, str]]:
    """(sources, flags) of a COPY/ADD, in shell or JSON form."""
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], flags


def dockerignore_patterns() -> list[re.Pattern[str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "re-include patterns are not supported by this check"
        regex = ""
        for part in re.split(r"(\*\*/|\*|\?)", line.rstrip("/")):
            regex += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append(re.compile(regex))
    return patterns


def ignored(path: str, patterns: list[re.Pattern[str]]) -> bool:
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p.fullmatch(prefix) for p in patterns for prefix in prefixes)


def external_bases(stages: list[Stage]) -> list[str]:
    aliases = {s.alias for s in stages if s.alias}
    return [s.base for s in stages if s.base not in aliases]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement(extra: str, package: str) -> SpecifierSet:
    for req in pyproject()["project"]["optional-dependencies"][extra]:
        match = re.fullmatch(rf"{package}(?:\[[\w,]+\])?\s*(.*)", req)
        if match:
            return SpecifierSet(match.group(1))
    raise AssertionError(f"{package} is not in the [{extra}] extra")


@pytest.fixture(params=sorted(DOCKERFILES), scope="module")
def image(request: pytest.FixtureRequest) -> tuple[str, list[Stage]]:
    return request.param, parse_dockerfile(DOCKERFILES[request.param])


def test_dockerignore_check_matches_like_docker() -> None:
    patterns = [
        re.compile(r"(?:.*/)?__pycache__"),
        re.compile(r"rustbpe/target"),
        re.compile(r"[^/]*\.egg-info"),
    ]
    assert ignored("trainer/__pycache__/x.pyc", patterns)
    assert ignored("rustbpe/target/release/lib.so", patterns)
    assert ignored("nanorun.egg-info", patterns) and not ignored("trainer/nanorun.egg-info", patterns)
    assert not ignored("rustbpe/src/lib.rs", patterns)


def test_base_images_are_pinned_to_exact_versions(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    for base in external_bases(stages):
        reference, _, digest = base.partition("@")
        repository, _, tag = reference.rpartition(":")
        assert repository and "/" not in tag, f"{name}: base {base} has no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: base {base} is not an exact version"
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{name}: bad digest in {base}"


def test_final_stage_runs_as_a_non_root_user(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    users = stages[-1].args_of("USER")
    assert users, f"{name}: the final stage never sets USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"{name}: final USER is {users[-1]}"
    assert user.isdigit(), f"{name}: USER {user} should be numeric so runAsNonRoot can verify it"


def test_every_copied_file_exists_and_reaches_the_build_context(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    patterns = dockerignore_patterns()
    aliases = {s.alias for s in stages if s.alias}
    for stage in stages:
        for instruction, args in stage.instructions:
            if instruction not in ("COPY", "ADD"):
                continue
            assert instruction == "COPY", f"{name}: use COPY, not ADD ({args})"
            sources, flags = copy_sources(args)
            if "from" in flags:
                assert flags["from"] in aliases, f"{name}: COPY --from={flags['from']} names no stage"
                continue
            for source in sources:
                matches = (
                    list(REPO.glob(source.rstrip("/")))
                    if any(c in source for c in "*?[")
                    else [REPO / source]
                )
                assert matches and all(m.exists() for m in matches), f"{name}: COPY source {source} missing"
                assert not ignored(source, patterns), f"{name}: COPY source {source} is in .dockerignore"


def test_no_secrets_are_baked_into_the_image(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    for stage in stages:
        for instruction, args in stage.instructions:
            if instruction in ("ENV", "ARG"):
                for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S*)", args) or [(args.split()[0], "")]:
                    assert not (SECRET_WORDS.search(key) and value.strip('"')), (
                        f"{name}: {instruction} {key} has a value"
                    )
            if instruction == "COPY":
                sources, _ = copy_sources(args)
                assert not [s for s in sources if re.search(r"\.env$|\.pem$|\.key$|kubeconfig", s)], args


def test_layers_leave_no_package_caches(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    for stage in stages:
        for run in stage.args_of("RUN"):
            if "pip install" in run:
                assert "--no-cache-dir" in run, f"{name}: pip keeps its cache: {run}"
            if "apt-get install" in run:
                assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run, (
                    f"{name}: apt leaves its lists or recommends behind: {run}"
                )


def test_image_command_is_a_nanorun_entry_point(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    final = stages[-1]
    command = " ".join(final.args_of("ENTRYPOINT") + final.args_of("CMD"))
    assert "nanorun" in command, f"{name}: the image's command does not run nanorun: {command!r}"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        "rustbpe/target/release/x",
        ".git/config",
        "trainer/__pycache__/a.pyc",
        ".kube/config",
        "tests/test_images.py",
    ):
        assert ignored(path, patterns), f"{path} would be sent to the docker daemon"


def test_trainer_image_builds_the_rust_binding_on_a_cuda_pytorch_base() -> None:
    stages = parse_dockerfile(DOCKERFILES["trainer"])
    builder = next(s for s in stages if any("maturin build" in r for r in s.args_of("RUN")))
    assert builder.alias and builder is not stages[-1]
    assert "rustbpe/Cargo.toml" in " ".join(builder.args_of("RUN"))
    final = stages[-1]
    assert any(f"--from={builder.alias}" in c for c in final.args_of("COPY"))
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", final.base)
    assert match, f"trainer base {final.base} is not a CUDA PyTorch runtime image"
    assert match.group(1) in requirement("trainer", "torch"), (
        "the base image's torch does not satisfy [trainer]"
    )
    assert any('[trainer]"' in r for r in final.args_of("RUN"))
    assert DEFAULT_IMAGE.rsplit(":", 1)[1] == pyproject()["project"]["version"]


def test_operator_image_is_slim_python_without_torch() -> None:
    stages = parse_dockerfile(DOCKERFILES["operator"])
    assert all(re.fullmatch(r"python:[\d.]+-slim-\w+", base) for base in external_bases(stages))
    installs = " ".join(r for s in stages for r in s.args_of("RUN") if "pip install" in r)
    assert '[operator]"' in installs
    assert not re.search(r"\[(trainer|serving|dev)", installs) and "torch" not in installs
    project = pyproject()["project"]
    assert not [
        r for r in project["dependencies"] + project["optional-dependencies"]["operator"] if "torch" in r
    ]


def test_serving_image_runs_the_ray_version_of_the_rayservice() -> None:
    stages = parse_dockerfile(DOCKERFILES["serving"])
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-cu\d+", stages[-1].base)
    assert match, f"serving base {stages[-1].base} is not a pinned Ray GPU image"
    assert match.group(1) == DEFAULT_RAY_VERSION, (
        "KubeRay needs the image's Ray to equal spec.serving.rayVersion"
    )
    assert match.group(1) in requirement("serving", "ray"), "the base image's Ray does not satisfy [serving]"
    assert any('[serving]"' in r for r in stages[-1].args_of("RUN"))
