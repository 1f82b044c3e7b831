"""The code base stays ruff- and mypy-clean: CI fails on a regression, not a reviewer."""

import subprocess
import sys

from appliance.config import PROJECT_ROOT


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT_ROOT, capture_output=True, text=True)


def test_ruff_clean() -> None:
    result = _run("ruff", "check", "appliance", "tests", "scripts")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean() -> None:
    result = _run("mypy", "appliance")
    assert result.returncode == 0, result.stdout + result.stderr
