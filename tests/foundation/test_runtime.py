"""Process-wide runtime settings applied by ``serve``."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_settings_are_taken_by_glibc() -> None:
    # In a child process: the settings are process-wide and the test process should keep its own.
    code = "from appliance.runtime import configure_malloc; print(configure_malloc())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
