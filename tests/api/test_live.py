"""Through a real uvicorn server on loopback (the shared ``live_server`` fixture), on SQLite and on
PostgreSQL: the same requests a customer's ``requests``/``httpx`` code would make."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import LiveServer, PostgresServer, run_live_server


async def _round_trip(live: LiveServer) -> None:
    creds = await live.create_account("live")
    async with httpx.AsyncClient(base_url=live.base_url, auth=creds.auth, timeout=30) as http:
        fn = (
            await http.post(f"{creds.base}/Function/", json={"name": "f", "handler_url": "http://h.test/"})
        ).json()
        r = await http.post(f"{creds.base}/Voiceagent/", json={"name": "Live", "function_ids": [fn["id"]]})
        assert r.status_code == 201, r.text
        agent = r.json()
        assert agent["call_url"] == f"{live.base_url}{creds.base}/Voiceagent/{agent['id']}/talk/"
        assert agent["websocket_url"].startswith(live.ws_url)
        listed = (await http.get(f"{creds.base}/Voiceagent/")).json()
        assert [o["id"] for o in listed["objects"]] == [agent["id"]]
        assert (await http.delete(f"{creds.base}/Function/{fn['id']}/")).status_code == 204
        assert (await http.get(f"{creds.base}/Voiceagent/{agent['id']}/")).json()["function_ids"] == []
        r = await http.get(f"{creds.base}/Voiceagent/", auth=(creds.auth_id, "wrong"))
        assert r.status_code == 401 and set(r.json()) == {"error", "api_id"}


async def test_round_trip_through_a_real_server(live_server: LiveServer) -> None:
    await _round_trip(live_server)
    assert live_server.thread.is_alive()


async def test_round_trip_through_a_real_server_on_postgresql(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    url = await postgres_server.new_database()
    with run_live_server(tmp_path / "data", database_url=url) as live:
        await _round_trip(live)
    assert not live.thread.is_alive()  # stopped, lifespan finished
