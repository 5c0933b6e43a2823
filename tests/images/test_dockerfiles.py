"""The Dockerfile as a plain `docker build` file for users, one target per image (trainer, serving,
operator): a pinned default base, every dependency from the lock, a non-root user, every COPY source
in the build context, no secrets or package caches in the layers. tests/images/test_images.py builds
and runs the images."""

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
DOCKERFILE = REPO / "Dockerfile"
TARGETS = ("trainer", "serving", "operator")
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

    def chain(self, target: str) -> list[Stage]:
        """The stages a target's image is made of, from the base up (not those it copies from)."""
        by_alias = {s.alias: s for s in self.stages if s.alias}
        stages = [by_alias[target]]
        while stages[0].base in by_alias:
            stages.insert(0, by_alias[stages[0].base])
        return stages

    def needed(self, target: str) -> list[Stage]:
        """Every stage a build of the target runs: its chain and the stages it copies from."""
        by_alias = {s.alias: s for s in self.stages if s.alias}
        seen: list[Stage] = []
        todo = [target]
        while todo:
            stage = by_alias[todo.pop()]
            if stage in seen:
                continue
            seen.append(stage)
            if stage.base in by_alias:
                todo.append(stage.base)
            todo += [copy_sources(a)[1]["from"] for a in stage.args_of("COPY") if "--from=" in a]
        return seen


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


Pattern = tuple[re.Pattern[str], bool]  # a .dockerignore line; False for a `!` (re-include) line


def pattern(line: str) -> Pattern:
    excludes = not line.startswith("!")
    regex = ""
    for part in re.split(r"(\*\*/|\*|\?)", line.lstrip("!").rstrip("/")):
        regex += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
    return re.compile(regex), excludes


def dockerignore_patterns() -> list[Pattern]:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    return [pattern(line) for line in lines if line and not line.startswith("#")]


def ignored(path: str, patterns: list[Pattern]) -> bool:
    """Whether Docker leaves `path` out of the context: the last pattern that matches it or a folder
    above it decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for regex, excludes in patterns:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = excludes
    return excluded


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(params=TARGETS, scope="module")
def image(request: pytest.FixtureRequest, dockerfile: Dockerfile) -> tuple[str, Dockerfile]:
    return request.param, dockerfile


def test_dockerignore_check_matches_like_docker() -> None:
    patterns = [
        pattern(line) for line in ("**/__pycache__", "rustbpe/target", "*.egg-info", "tests/", "!tests/a/")
    ]
    assert ignored("trainer/__pycache__/x.pyc", patterns)
    assert ignored("rustbpe/target/release/lib.so", patterns)
    assert ignored("nanorun.egg-info", patterns) and not ignored("trainer/nanorun.egg-info", patterns)
    assert not ignored("rustbpe/src/lib.rs", patterns)
    assert ignored("tests/b/x.py", patterns) and not ignored("tests/a/x.py", patterns)


def test_every_stage_starts_from_the_pinned_debian_base(dockerfile: Dockerfile) -> None:
    default = dockerfile.args.get("BASE_IMAGE", "")
    assert re.fullmatch(r"debian:12\.\d+-slim", default), f"BASE_IMAGE defaults to {default!r}"
    earlier: set[str] = set()
    for stage in dockerfile.stages:
        assert stage.base in ("${BASE_IMAGE}", *earlier), f"stage {stage.alias} starts from {stage.base}"
        earlier.add(stage.alias or "")
    assert {s.alias for s in dockerfile.stages} >= set(TARGETS)
    assert dockerfile.stages[-1].alias == "trainer", "a plain `docker build .` builds the trainer image"


def test_every_dependency_comes_from_the_lock(image: tuple[str, Dockerfile]) -> None:
    """A pip install reads its extra's export of uv.lock (-r, or -c for the build tools), or
    installs nanorun's own wheels with --no-deps: nothing is resolved anew, so the image runs the
    versions the tests ran."""
    name, dockerfile = image
    for stage in dockerfile.needed(name):
        copied = {
            shlex.split(args)[-1]: copy_sources(args)[0][0]
            for args in stage.args_of("COPY")
            if copy_sources(args)[0][0].startswith("requirements/")
        }
        for run in stage.args_of("RUN"):
            for command in re.findall(r"pip (?:install|wheel)[^&]*", run):
                files = re.findall(r"(?:-r|-c)\s+(\S+)", command)
                assert files or "--no-deps" in command, f"{name}: `{command}` resolves dependencies anew"
                for f in files:
                    assert copied.get(f, "").startswith("requirements/"), f"{name}: {f} is not a lock export"
    installed = [
        copy_sources(args)[0][0]
        for stage in dockerfile.chain(name)
        for args in stage.args_of("COPY")
        if copy_sources(args)[0][0].startswith("requirements/")
    ]
    assert f"requirements/{name}.txt" in installed, f"{name}: never installs requirements/{name}.txt"
    if name == "operator":
        assert installed == ["requirements/operator.txt"], f"the operator image installs {installed}"


def test_final_stage_runs_as_a_non_root_user(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    users = [u for stage in dockerfile.chain(name) for u in stage.args_of("USER")]
    assert users, f"{name}: never sets USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"{name}: final USER is {users[-1]}"
    assert user.isdigit(), f"{name}: USER {user} should be numeric so runAsNonRoot can verify it"


def test_every_copied_file_exists_and_reaches_the_build_context(dockerfile: Dockerfile) -> None:
    patterns = dockerignore_patterns()
    earlier: set[str] = set()
    checked = {"from": 0, "context": 0}
    for stage in dockerfile.stages:
        for instruction, args in stage.instructions:
            if instruction not in ("COPY", "ADD"):
                continue
            assert instruction == "COPY", f"use COPY, not ADD ({args})"
            sources, flags = copy_sources(args)
            if "from" in flags:
                assert flags["from"] in earlier, f"COPY --from={flags['from']} names no earlier stage"
                checked["from"] += 1
                continue
            for source in sources:
                checked["context"] += 1
                matches = (
                    list(REPO.glob(source.rstrip("/")))
                    if any(c in source for c in "*?[")
                    else [REPO / source]
                )
                assert matches and all(m.exists() for m in matches), f"COPY source {source} missing"
                assert not ignored(source, patterns), f"COPY source {source} is in .dockerignore"
        earlier.add(stage.alias or "")
    assert checked["from"] and checked["context"], checked  # the parse found both kinds of COPY


def test_no_secrets_are_baked_into_the_images(dockerfile: Dockerfile) -> None:
    for key, value in dockerfile.args.items():  # the ARGs before the first FROM
        assert not (SECRET_WORDS.search(key) and value.strip('"')), f"ARG {key} has a value"
    variables, copies = list(dockerfile.args), 0
    for stage in dockerfile.stages:
        for instruction, args in stage.instructions:
            if instruction in ("ENV", "ARG"):
                for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S*)", args) or [(args.split()[0], "")]:
                    assert not (SECRET_WORDS.search(key) and value.strip('"')), (
                        f"{instruction} {key} has a value"
                    )
                    variables.append(key)
            if instruction == "COPY":
                sources, _ = copy_sources(args)
                assert not [s for s in sources if re.search(r"\.env$|\.pem$|\.key$|kubeconfig", s)], args
                copies += 1
    assert {"BASE_IMAGE", "PATH", "HOME"} <= set(variables) and copies, (variables, copies)  # all were read


def test_layers_leave_no_package_caches(dockerfile: Dockerfile) -> None:
    pips = apts = 0
    for stage in dockerfile.stages:
        for run in stage.args_of("RUN"):
            for command in re.findall(r"pip (?:install|wheel)[^&]*", run):
                assert "--no-cache-dir" in command, f"pip keeps its cache: {run}"
                pips += 1
            if "apt-get install" in run:
                assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run, (
                    f"apt leaves its lists or recommends behind: {run}"
                )
                apts += 1
    assert pips and apts, (pips, apts)  # the RUN lines were read


def test_image_command_is_a_nanorun_entry_point(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    commands = [
        c for stage in dockerfile.chain(name) for c in stage.args_of("ENTRYPOINT") + stage.args_of("CMD")
    ]
    assert commands and "nanorun" in commands[-1], f"{name}: the image's command does not run nanorun"


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
