"""The three Dockerfiles (trainer/, operator/, serving/) as plain `docker build` files for users: a
pinned default base, every dependency from the lock, a non-root user, every COPY source in the
build context, no secrets or package caches in the layers. tests/images/test_images.py builds and
runs them."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
from nanorun.operator.api import DEFAULT_IMAGE, DEFAULT_RAY_VERSION

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {name: REPO / name / "Dockerfile" for name in ("trainer", "operator", "serving")}
SECRET_WORDS = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


@dataclass
class Stage:
    base: str
    alias: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args_of(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARG defaults before the first FROM
    stages: list[Stage]


def parse_dockerfile(path: Path) -> Dockerfile:
    """Global ARGs and stages with their instructions; comments dropped, continuation lines joined."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, rest = line.strip().partition(" ")
        name, rest = name.upper(), rest.strip()
        if name == "FROM":
            words = [w for w in rest.split() if not w.startswith("--platform")]
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], alias=alias))
        elif not stages:
            assert name == "ARG", f"{path}: {name} before FROM"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((name, rest))
    return Dockerfile(args, stages)


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


@pytest.fixture(params=sorted(DOCKERFILES), scope="module")
def image(request: pytest.FixtureRequest) -> tuple[str, Dockerfile]:
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


def test_every_stage_starts_from_the_pinned_debian_base(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    default = dockerfile.args.get("BASE_IMAGE", "")
    assert re.fullmatch(r"debian:12\.\d+-slim", default), f"{name}: BASE_IMAGE defaults to {default!r}"
    aliases = {s.alias for s in dockerfile.stages if s.alias}
    for stage in dockerfile.stages:
        assert stage.base in ("${BASE_IMAGE}", *aliases), f"{name}: a stage starts from {stage.base}"


def test_every_dependency_comes_from_the_lock(image: tuple[str, Dockerfile]) -> None:
    """A pip install reads its extra's export of uv.lock, or installs nanorun itself with --no-deps:
    nothing is resolved anew, so the image runs the versions the tests ran."""
    name, dockerfile = image
    copied = {
        dest: sources[0]
        for stage in dockerfile.stages
        for args in stage.args_of("COPY")
        for sources, dest in [(copy_sources(args)[0], shlex.split(args)[-1])]
        if sources and sources[0].startswith("requirements/")
    }
    installs = [r for s in dockerfile.stages for r in s.args_of("RUN") if "pip install" in r]
    assert installs
    for run in installs:
        command = run[run.index("pip install") :].split("&&")[0]
        files = re.findall(r"(?:-r|-c)\s+(\S+)", command)
        assert files or "--no-deps" in command, f"{name}: `{command}` resolves dependencies anew"
        for f in files:
            assert copied.get(f, "").startswith("requirements/"), f"{name}: {f} is not a lock export"
    extra = "serving" if name == "serving" else name
    assert f"requirements/{extra}.txt" in copied.values(), f"{name}: never installs requirements/{extra}.txt"


def test_final_stage_runs_as_a_non_root_user(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    users = dockerfile.stages[-1].args_of("USER")
    assert users, f"{name}: the final stage never sets USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"{name}: final USER is {users[-1]}"
    assert user.isdigit(), f"{name}: USER {user} should be numeric so runAsNonRoot can verify it"


def test_every_copied_file_exists_and_reaches_the_build_context(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    patterns = dockerignore_patterns()
    aliases = {s.alias for s in dockerfile.stages if s.alias}
    for stage in dockerfile.stages:
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


def test_no_secrets_are_baked_into_the_image(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    for stage in dockerfile.stages:
        for instruction, args in stage.instructions:
            if instruction in ("ENV", "ARG"):
                for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S*)", args) or [(args.split()[0], "")]:
                    assert not (SECRET_WORDS.search(key) and value.strip('"')), (
                        f"{name}: {instruction} {key} has a value"
                    )
            if instruction == "COPY":
                sources, _ = copy_sources(args)
                assert not [s for s in sources if re.search(r"\.env$|\.pem$|\.key$|kubeconfig", s)], args


def test_layers_leave_no_package_caches(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    for stage in dockerfile.stages:
        for run in stage.args_of("RUN"):
            if "pip install" in run:
                assert "--no-cache-dir" in run, f"{name}: pip keeps its cache: {run}"
            if "apt-get install" in run:
                assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run, (
                    f"{name}: apt leaves its lists or recommends behind: {run}"
                )


def test_image_command_is_a_nanorun_entry_point(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    final = dockerfile.stages[-1]
    command = " ".join(final.args_of("ENTRYPOINT") + final.args_of("CMD"))
    assert "nanorun" in command, f"{name}: the image's command does not run nanorun: {command!r}"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        "rustbpe/target/release/x",
        "rustbpe/python/nanorun/_bpe.abi3.so",
        ".git/config",
        "trainer/__pycache__/a.pyc",
        ".kube/config",
        "tests/images/test_images.py",
    ):
        assert ignored(path, patterns), f"{path} would be sent to the builder"


def test_default_image_tags_are_the_project_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert DEFAULT_IMAGE.rsplit(":", 1)[1] == version


def test_the_rayservice_ray_version_is_the_serving_images_ray() -> None:
    """KubeRay needs the image's Ray to equal spec.serving.rayVersion; the image's Ray is the lock's."""
    pinned = re.search(r"^ray==(\S+)", (REPO / "requirements" / "serving.txt").read_text(), re.M)
    assert pinned and pinned.group(1) == DEFAULT_RAY_VERSION
