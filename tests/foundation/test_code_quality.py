"""The code base stays ruff- and mypy-clean: CI fails on a regression, not a reviewer."""

import subprocess
import sys

from appliance.config import PROJECT_ROOT


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT_ROOT, capture_output=True, text=True)


def _python_scripts() -> list[str]:
    """Executable Python scripts without a .py suffix: ruff only finds *.py files by itself."""
    found = []
    for path in sorted((PROJECT_ROOT / "scripts").iterdir()):
        if path.is_file() and path.suffix == "" and "python" in path.open(errors="replace").readline():
            found.append(str(path.relative_to(PROJECT_ROOT)))
    return found


def test_ruff_clean() -> None:
    scripts = _python_scripts()
    assert "scripts/bench_call" in scripts
    result = _run("ruff", "check", "appliance", "tests", "scripts", *scripts)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean() -> None:
    result = _run("mypy", "appliance")
    assert result.returncode == 0, result.stdout + result.stderr
