"""Lint and types are part of the tests: ruff check, ruff format --check and
mypy --strict over the product and the tests (.ci/lint, which CI also runs first)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_ruff_and_mypy_strict_are_clean() -> None:
    done = subprocess.run(
        [str(REPO_ROOT / ".ci" / "lint")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
