"""The README's first quick-start command: ./scripts/serve sets up (a no-op once done), creates the first
account once, and serves until /ready."""

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from appliance.config import PROJECT_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(tmp_path: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, APPLIANCE_PORT=str(port), APPLIANCE_DATA_DIR=str(tmp_path / "data"))
    return subprocess.Popen(
        [str(PROJECT_ROOT / "scripts" / "serve")],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve exited early:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready in {timeout}s:\n{log.read_text()[-3000:]}")


def test_serve_reaches_ready_and_prints_credentials_once(tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "serve1.log"
    proc = _start(tmp_path, port, log)
    try:
        _wait_ready(port, proc, log, 300)
        out = log.read_text()
        assert "Python packages: up to date" in out  # setup already done: skipped
        auth_id = re.search(r"auth_id:\s+(\S+)", out)
        token = re.search(r"auth_token:\s+(\S+)", out)
        assert auth_id and token, out
        r = httpx.get(
            f"http://127.0.0.1:{port}/v1/Account/{auth_id[1]}/Model/", auth=(auth_id[1], token[1]), timeout=10
        )
        assert r.status_code == 200, r.text
    finally:
        _stop(proc)
    log2 = tmp_path / "serve2.log"
    proc = _start(tmp_path, port, log2)
    try:
        _wait_ready(port, proc, log2, 300)
        assert "auth_token" not in log2.read_text()  # shown once only
    finally:
        _stop(proc)
