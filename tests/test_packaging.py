"""What gets installed: one import name, and production roles free of dev tooling."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_wheel_installs_one_top_level_name(tmp_path: Path) -> None:
    # Built from a copy: the build leaves its own build/ folder behind.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("ingress", "workers", "shared", "llm_broker"):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=280,
    )
    (wheel,) = tmp_path.glob("llm_broker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"llm_broker"}
    # Every module of the repository's packages is in it, under llm_broker.
    for folder in ("ingress", "workers", "shared", "llm_broker"):
        for source in (REPO_ROOT / folder).rglob("*.py"):
            relative = source.relative_to(REPO_ROOT / folder).as_posix()
            prefix = "llm_broker" if folder == "llm_broker" else f"llm_broker/{folder}"
            assert f"{prefix}/{relative}" in names, relative


def test_production_roles_import_no_dev_tooling() -> None:
    code = (
        "import sys\n"
        "import llm_broker.cli, llm_broker.ingress.main, llm_broker.workers.main\n"
        "import llm_broker.workers.webhooks\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] == 'fakeredis' or m.startswith('llm_broker.mock'))\n"
        "print(' '.join(bad))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == ""


def test_mock_upstream_command_reads_the_mocks_own_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llm_broker", "mock-upstream", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.startswith("usage: llm-broker mock-upstream")
    assert "--latency-ms" in done.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "llm_broker", "keygen", "--latency-ms", "5"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "unrecognized arguments: --latency-ms 5" in refused.stderr
