"""``python -m appliance accounts ...`` as an operator runs it, in a fresh data dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from appliance.config import PROJECT_ROOT


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APPLIANCE_DATA_DIR": str(data_dir), "APPLIANCE_DATABASE_URL": ""}
    return subprocess.run(
        [sys.executable, "-m", "appliance", "accounts", *args],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_create_set_plivo_and_list(tmp_path: Path) -> None:
    data = tmp_path / "data"
    created = cli(data, "create", "--name", "Acme", "--json")
    assert created.returncode == 0, created.stderr
    creds = json.loads(created.stdout)
    assert creds["auth_id"].startswith("MA") and len(creds["auth_token"]) == 40

    ok = cli(
        data,
        "set-plivo",
        creds["auth_id"],
        "--plivo-auth-id",
        "MAPLIVO123456789ABCD",
        "--plivo-auth-token",
        "tok-0123456789",
    )
    assert ok.returncode == 0, ok.stderr
    assert "tok-0123456789" not in ok.stdout
    bad = cli(data, "set-plivo", "MANOSUCH", "--plivo-auth-id", "x", "--plivo-auth-token", "y")
    assert bad.returncode == 1 and "MANOSUCH" in bad.stderr

    rows = json.loads(cli(data, "list", "--json").stdout)
    assert rows == [
        {
            "auth_id": creds["auth_id"], "name": "Acme", "created_at": rows[0]["created_at"],
            "plivo_auth_id": "****ABCD", "plivo_auth_token": "****6789",
        }
    ]  # fmt: skip
    # ensure-first does nothing once an account exists.
    again = cli(data, "ensure-first")
    assert again.returncode == 0 and again.stdout == ""
