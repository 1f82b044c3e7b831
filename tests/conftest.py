"""Shared fixtures: settings in a tmp data dir, the app (no engines) with its real store, accounts with
their credentials, httpx clients, a real uvicorn server on a loopback port, and a throwaway
PostgreSQL cluster.

Quick reference::

    async def test_x(client, account):             # ASGI app, real SQLite store, no engines
        r = await client.get(f"{account.base}/Voiceagent/", auth=account.auth)

    async def test_y(live_server):                 # real uvicorn on 127.0.0.1:<free port>
        creds = await live_server.create_account("x")
        httpx.get(f"{live_server.base_url}{creds.base}/", auth=creds.auth)

    @pytest.fixture(scope="session")               # e.g. one engine-loaded server per session
    def warm_server(live_server_factory): return live_server_factory(load_engines=True)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI

from appliance.config import PROJECT_ROOT, Settings, load_settings
from appliance.server import create_app
from appliance.store.accounts import create_account, create_account_cli

pytest_plugins = ["tests.engine_fixtures"]

T = TypeVar("T")
POSTGRES_INSTALL_HINT = "apt-get install -y postgresql   (or: scripts/setup --test)"


# -- settings, app, accounts, clients ------------------------------------------------------------


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Project defaults (config.toml, env ignored) with the data dir moved; models stay the project's."""
    return load_settings(env={}, data_dir=data_dir, models_dir=PROJECT_ROOT / "models", **overrides)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest_asyncio.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The app with its lifespan running (store open and migrated), engines NOT loaded."""
    application = create_app(settings, load_engines=False)
    async with application.router.lifespan_context(application):
        yield application


@dataclass(frozen=True)
class Credentials:
    auth_id: str
    auth_token: str

    @property
    def auth(self) -> tuple[str, str]:
        return (self.auth_id, self.auth_token)

    @property
    def base(self) -> str:
        """The account's base path, ``/v1/Account/{auth_id}`` (no trailing slash)."""
        return f"/v1/Account/{self.auth_id}"


AccountFactory = Callable[[str], Awaitable[Credentials]]


@pytest.fixture
def account_factory(app: FastAPI) -> AccountFactory:
    async def make(name: str) -> Credentials:
        async with app.state.appliance.services["db"].sessions() as session:
            created = await create_account(session, name)
        return Credentials(created.auth_id, created.auth_token)

    return make


@pytest_asyncio.fixture
async def account(account_factory: AccountFactory) -> Credentials:
    return await account_factory("account A")


@pytest_asyncio.fixture
async def other_account(account_factory: AccountFactory) -> Credentials:
    return await account_factory("account B")


@pytest_asyncio.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the ASGI app, without credentials (pass ``auth=account.auth``). Server
    errors come back as 500 responses rather than exceptions, as a real client would see them."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest_asyncio.fixture
async def account_client(app: FastAPI, account: Credentials) -> AsyncIterator[httpx.AsyncClient]:
    """Like ``client`` but authenticated as ``account`` (paths still need ``account.base``)."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", auth=account.auth) as c:
        yield c


# -- a real uvicorn server ----------------------------------------------------------------------


@dataclass
class LiveServer:
    base_url: str  # http://127.0.0.1:<port>
    settings: Settings
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def ws_url(self) -> str:
        return "ws" + self.base_url[4:]

    async def create_account(self, name: str = "live") -> Credentials:
        # Own connection to the same database; the server's schema is already migrated.
        created = await create_account_cli(self.settings, name)
        return Credentials(created.auth_id, created.auth_token)


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def run_live_server(
    data_dir: Path, *, load_engines: bool = False, startup_timeout_s: float = 600.0, **overrides: Any
) -> Iterator[LiveServer]:
    """Serve a fresh app with uvicorn in a background thread on an already-bound loopback socket (no
    port race); ``public_base_url`` points at it. Stops the server (lifespan included) on exit."""
    sock = _loopback_socket()
    port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    settings = make_settings(data_dir, public_base_url=base_url, port=port, **overrides)
    application = create_app(settings, load_engines=load_engines)
    config = uvicorn.Config(application, log_level="warning", ws_max_size=1 << 20, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="live-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        # uvicorn offers no start-up event to wait on; `started` flips once the lifespan has run.
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {startup_timeout_s} s")
            time.sleep(0.02)
        yield LiveServer(base_url, settings, application, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A real server (no engines) with its own data dir, stopped after the test."""
    with run_live_server(tmp_path / "live-data") as live:
        yield live


@pytest.fixture(scope="session")
def live_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveServer]]:
    """``factory(load_engines=False, **settings_overrides)`` starts a server that runs until the end
    of the session; use it from session- or module-scoped fixtures."""
    with contextlib.ExitStack() as stack:

        def start(*, load_engines: bool = False, **overrides: Any) -> LiveServer:
            data_dir = tmp_path_factory.mktemp("live-data")
            return stack.enter_context(run_live_server(data_dir, load_engines=load_engines, **overrides))

        yield start


# -- PostgreSQL -------------------------------------------------------------------------------------


def _postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


@dataclass
class PostgresServer:
    """A PostgreSQL server for tests; each test gets a fresh database from :meth:`new_database`."""

    host: str
    port: int
    user: str
    password: str | None = None
    _counter: int = field(default=0)

    def url(self, database: str, driver: str = "postgresql+asyncpg") -> str:
        auth = self.user + (f":{self.password}" if self.password else "")
        return f"{driver}://{auth}@{self.host}:{self.port}/{database}"

    async def new_database(self) -> str:
        import asyncpg

        self._counter += 1
        name = f"appliance_test_{os.getpid()}_{self._counter}"
        conn = await asyncpg.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, database="postgres"
        )
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[PostgresServer]:
    """initdb + pg_ctl start a private cluster on a free loopback port (socket dir in tmp), trust auth;
    stopped and deleted on exit. As root the server runs as the ``postgres`` user (it refuses root)."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.fail(
            f"PostgreSQL binaries not found under /usr/lib/postgresql; install: {POSTGRES_INSTALL_HINT}"
        )
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
    data, sockdir = root / "data", root / "sock"
    sockdir.mkdir()
    if as_root:
        shutil.chown(root, "postgres")
        shutil.chown(sockdir, "postgres")
    sock = _loopback_socket()
    port = sock.getsockname()[1]
    sock.close()

    def run(*args: str) -> None:
        proc = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr or proc.stdout}")

    options = (
        f"-p {port} -k {sockdir} -c listen_addresses=127.0.0.1 "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
    )
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
        "-o", options, "start")  # fmt: skip
    try:
        yield PostgresServer(host="127.0.0.1", port=port, user="postgres")
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """``APPLIANCE_TEST_POSTGRES_URL`` (e.g. ``postgresql://user:pw@127.0.0.1:5432``) if set, else a
    throwaway cluster started here. Fails (never skips) when PostgreSQL is not installed."""
    external = os.environ.get("APPLIANCE_TEST_POSTGRES_URL")
    if external:
        parsed = httpx.URL(external)
        yield PostgresServer(
            host=parsed.host or "127.0.0.1", port=parsed.port or 5432, user=parsed.username or "postgres",
            password=parsed.password or None,
        )  # fmt: skip
        return
    with throwaway_postgres() as server:
        yield server


@pytest_asyncio.fixture
async def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the test PostgreSQL server (``postgresql+asyncpg://...``)."""
    return await postgres_server.new_database()


def run_coroutine_in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a private loop in another thread, for sync tests that must not touch the
    session's event loop. Exceptions propagate."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
