"""Session-wide fixtures of the knowledge tests, importable from other test directories: the real
embedding engine and a real ``chroma run`` server on loopback (one of each per test process)."""

from __future__ import annotations

import contextlib
import functools
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.config import load_settings
from appliance.engines.embed import MiniLmEmbedder
from appliance.model_manifest import Manifest

CHROMA_START_TIMEOUT_S = 120.0  # the box is shared by many agents; a cold start can be slow


@functools.cache
def load_embedder() -> MiniLmEmbedder:
    settings = load_settings()
    path = Manifest.load(settings.models_dir).path(settings.models.embed, "embed")
    return MiniLmEmbedder(settings.models.embed, path, threads=settings.threads.embed)


@pytest.fixture(scope="session")
def embedder() -> MiniLmEmbedder:
    return load_embedder()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _ChromaServer:
    def __init__(self) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="chroma-server-")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(self.folder.name) / "server.log"
        chroma = Path(sys.executable).with_name("chroma")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(chroma), "run", "--path", str(Path(self.folder.name) / "data"),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + CHROMA_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"`chroma run` exited with {self.proc.returncode}:\n{self._log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/api/v2/heartbeat", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"`chroma run` did not answer within {CHROMA_START_TIMEOUT_S}s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.folder.cleanup()


_server: _ChromaServer | None = None


@pytest.fixture(scope="session")
def chroma_server_url() -> Iterator[str]:
    """A real Chroma server on a free loopback port, stopped when the session ends. Shared by every
    module that imports this fixture."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _ChromaServer()
    server = _server
    yield server.url
    if _server is server:
        _server = None
        server.stop()
