"""Answer URL, outbound calls and call records over the real app and store (no engines)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from appliance.call.records import CallFinished, CallInfo, CallStarted, FunctionCallRecord, TurnRecord
from appliance.config import Settings
from appliance.store.accounts import get_account, set_plivo_credentials
from appliance.store.calls import CallRecordWriter, close_stale_calls
from appliance.store.db import utcnow
from appliance.telephony.signature import signature_headers
from appliance.telephony.xml import parse_stream_xml
from tests.conftest import Credentials, make_settings
from tests.fakes.plivo_rest import FakePlivo, running_fake_plivo


@pytest_asyncio.fixture
async def plivo() -> AsyncIterator[FakePlivo]:
    async with running_fake_plivo() as fake:
        yield fake


@pytest.fixture
def settings(tmp_path: Path, plivo: FakePlivo) -> Settings:
    return make_settings(
        tmp_path / "data", plivo_api_base_url=plivo.base_url, limits={"max_concurrent_calls": 2}
    )


async def make_agent(client: httpx.AsyncClient, account: Credentials, **fields: object) -> str:
    body = {"name": "Front desk", "welcome_message": "Hello!", **fields}
    r = await client.post(f"{account.base}/Voiceagent/", json=body, auth=account.auth)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def form(call_uuid: str = "call-0001", **extra: str) -> dict[str, str]:
    return {"CallUUID": call_uuid, "From": "+14155550100", "To": "+14155550199", "Direction": "inbound",
            "CallStatus": "in-progress", "BillRate": "0.01", **extra}  # fmt: skip


async def give_plivo_creds(app: FastAPI, account: Credentials, fake: FakePlivo) -> None:
    async with app.state.appliance.services["db"].sessions() as session:
        await set_plivo_credentials(session, account.auth_id, fake.auth_id, fake.auth_token)


async def test_answer_url_returns_stream_xml_with_a_signed_token(app, client, account) -> None:
    agent_id = await make_agent(client, account)
    r = await client.post(f"{account.base}/Voiceagent/{agent_id}/talk/", data=form("call-abc"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/xml")
    stream = parse_stream_xml(r.content)
    assert stream.attributes["bidirectional"] == "true"
    assert stream.attributes["keepCallAlive"] == "true"
    assert stream.attributes["audioTrack"] == "inbound"
    assert stream.attributes["contentType"] == "audio/x-mulaw;rate=8000"
    url = urlsplit(stream.url)
    assert url.scheme == "ws" and url.path == f"{account.base}/Voiceagent/{agent_id}/connect/"
    token = parse_qs(url.query)["token"][0]
    assert stream.extra_headers["token"] == token
    claims = app.state.appliance.services["calls"].tokens.verify(token)
    assert (claims.call_uuid, claims.agent_id) == ("call-abc", agent_id)
    assert (claims.from_number, claims.to_number, claims.direction) == (
        "+14155550100",
        "+14155550199",
        "inbound",
    )
    # GET works too (Plivo's answer_method may be GET).
    r = await client.get(f"{account.base}/Voiceagent/{agent_id}/talk/", params=form("call-abd"))
    assert parse_stream_xml(r.content).url


async def test_unknown_agent_gets_a_spoken_apology_not_an_error(client, account) -> None:
    r = await client.post(
        f"{account.base}/Voiceagent/00000000-0000-0000-0000-000000000000/talk/", data=form()
    )
    assert r.status_code == 200
    assert "<Speak" in r.text and "<Hangup" in r.text and "<Stream" not in r.text
    r = await client.post("/v1/Account/MANOSUCHACCOUNT00000/Voiceagent/x/talk/", data=form())
    assert r.status_code == 200 and "<Speak" in r.text


async def test_signature_is_checked_when_the_account_has_plivo_credentials(
    app,
    client,
    account,
    plivo: FakePlivo,
    settings: Settings,
) -> None:
    agent_id = await make_agent(client, account)
    await give_plivo_creds(app, account, plivo)
    path = f"{account.base}/Voiceagent/{agent_id}/talk/"
    fields = form("call-signed")
    r = await client.post(path, data=fields)
    assert r.status_code == 403
    bad = signature_headers("POST", settings.base_url + path, "not-the-token", fields)
    assert (await client.post(path, data=fields, headers=bad)).status_code == 403
    good = signature_headers("POST", settings.base_url + path, plivo.auth_token, fields)
    r = await client.post(path, data=fields, headers=good)
    assert r.status_code == 200 and parse_stream_xml(r.content).url
    # The same nonce again is a replay.
    assert (await client.post(path, data=fields, headers=good)).status_code == 403


async def test_over_capacity_calls_get_a_polite_busy_message(client, account) -> None:
    agent_id = await make_agent(client, account)
    path = f"{account.base}/Voiceagent/{agent_id}/talk/"
    for n in range(2):
        assert "<Stream" in (await client.post(path, data=form(f"c{n}"))).text
    # A retry of an answered call keeps its line; a third call does not get one.
    assert "<Stream" in (await client.post(path, data=form("c1"))).text
    busy = await client.post(path, data=form("c3"))
    assert busy.status_code == 200 and "busy" in busy.text and "<Stream" not in busy.text


async def test_outbound_call_goes_to_plivo_with_the_agents_call_url(
    app,
    client,
    account,
    plivo: FakePlivo,
) -> None:
    agent_id = await make_agent(client, account)
    body = {"from": "+14155550100", "to": "+14155550123", "context": {"name": "Ada"}}
    r = await client.post(f"{account.base}/Voiceagent/{agent_id}/Call/", json=body, auth=account.auth)
    assert r.status_code == 409  # no Plivo credentials yet
    await give_plivo_creds(app, account, plivo)
    r = await client.post(f"{account.base}/Voiceagent/{agent_id}/Call/", json=body, auth=account.auth)
    assert r.status_code == 201, r.text
    assert r.json()["message"] == "call fired"
    placed = plivo.placed[-1]
    agent = (await client.get(f"{account.base}/Voiceagent/{agent_id}/", auth=account.auth)).json()
    assert placed.params["answer_url"] == agent["call_url"]
    assert placed.params["from"] == "+14155550100" and placed.params["to"] == "+14155550123"
    assert r.json()["request_uuid"] == placed.request_uuid
    # When Plivo fetches the answer URL for that call, the context is attached to the call.
    manager = app.state.appliance.services["calls"]
    fields = form(placed.call_uuid, Direction="outbound", ALegRequestUUID=placed.request_uuid)
    headers = signature_headers("POST", agent["call_url"], plivo.auth_token, fields)
    r = await client.post(f"{account.base}/Voiceagent/{agent_id}/talk/", data=fields, headers=headers)
    assert "<Stream" in r.text
    assert manager._contexts[placed.call_uuid] == {"name": "Ada"}
    # Unknown agent -> 404; missing field -> 422.
    r = await client.post(f"{account.base}/Voiceagent/nope/Call/", json=body, auth=account.auth)
    assert r.status_code == 404
    r = await client.post(f"{account.base}/Voiceagent/{agent_id}/Call/", json={"to": "1"}, auth=account.auth)
    assert r.status_code == 422 and "from" in r.json()["error"]


async def write_record(app: FastAPI, account: Credentials, call_uuid: str, *, finish: bool = True) -> None:
    async with app.state.appliance.services["db"].sessions() as session:
        acct = await get_account(session, account.auth_id)
    assert acct is not None
    db = app.state.appliance.services["db"]
    writer = CallRecordWriter(db.sessions, call_uuid)
    t0 = utcnow()
    writer.submit(CallStarted(CallInfo(call_uuid, acct.id, "agent-1", "inbound", "+1555", "+1666"), t0))
    writer.submit(TurnRecord(1, "agent", "Hello, how can I help?", t0, t0 + timedelta(seconds=2),
                             heard_text="Hello, how can I help?"))  # fmt: skip
    writer.submit(TurnRecord(2, "caller", "book monday", t0, t0, timings={}))
    writer.submit(FunctionCallRecord(3, "book", {"day": "monday"}, {"booked": True}, True, None, t0))
    writer.submit(TurnRecord(3, "agent", "Booked for Monday. Anything else?", t0, t0,
                             heard_text="Booked for Monday.", interrupted=True,
                             timings={"end_of_turn_ms": 610.0, "first_audio_ms": 1100.0}))  # fmt: skip
    if finish:
        writer.submit(CallFinished(t0 + timedelta(seconds=9), "completed", "caller_hangup"))
        await writer.run()
    else:
        # Without CallFinished the writer would wait for more: write what is there, then stop.
        while not writer._queue.empty():
            await writer._write(writer._queue.get_nowait())


async def test_call_records_list_and_detail(app, client, account, other_account) -> None:
    await write_record(app, account, "rec-1")
    r = await client.get(f"{account.base}/Call/", auth=account.auth)
    assert r.status_code == 200
    page = r.json()
    assert page["meta"]["total_count"] == 1 and page["objects"][0]["call_uuid"] == "rec-1"
    r = await client.get(f"{account.base}/Call/rec-1/", auth=account.auth)
    rec = r.json()
    assert rec["from"] == "+1555" and rec["to"] == "+1666" and rec["direction"] == "inbound"
    assert rec["status"] == "completed" and rec["hangup_cause"] == "caller_hangup"
    assert rec["duration"] == 9.0
    assert [t["who"] for t in rec["transcript"]] == ["agent", "caller", "agent"]
    last = rec["transcript"][-1]
    assert last["interrupted"] and last["heard_text"] == "Booked for Monday."
    assert last["timings"]["first_audio_ms"] == 1100.0
    assert rec["function_calls"][0]["result"] == {"booked": True}
    # Another account sees nothing of it.
    assert (await client.get(f"{other_account.base}/Call/rec-1/", auth=other_account.auth)).status_code == 404
    assert (await client.get(f"{account.base}/Call/nope/", auth=account.auth)).status_code == 404
    assert (await client.delete(f"{account.base}/Call/rec-1/", auth=account.auth)).status_code == 404


async def test_calls_left_live_by_a_dead_process_are_closed_as_failed(app, client, account) -> None:
    await write_record(app, account, "rec-live", finish=False)
    rec = (await client.get(f"{account.base}/Call/rec-live/", auth=account.auth)).json()
    assert rec["status"] == "live" and len(rec["transcript"]) == 3  # written as the call went
    async with app.state.appliance.services["db"].sessions() as session:
        assert await close_stale_calls(session) == 1
    rec = (await client.get(f"{account.base}/Call/rec-live/", auth=account.auth)).json()
    assert rec["status"] == "failed" and rec["hangup_cause"] == "appliance_restart" and rec["end_time"]


async def test_transfer_sends_plivo_to_signed_dial_xml(app, client, account, plivo: FakePlivo) -> None:
    from appliance.call.manager import PlivoCallControl
    from appliance.telephony.rest import PlivoRest
    from appliance.telephony.stream_token import StreamClaims

    agent_id = await make_agent(client, account)
    manager = app.state.appliance.services["calls"]
    token = manager.tokens.issue(StreamClaims("call-t", agent_id, "acct", direction="transfer"))
    transfer_url = f"http://testserver{account.base}/Voiceagent/{agent_id}/transfer/?token={token}"
    plivo.add_live_call("call-t")
    rest = PlivoRest(plivo.auth_id, plivo.auth_token, api_base_url=plivo.base_url)
    await PlivoCallControl(rest, "call-t", transfer_url).transfer("+14155550142")
    (request,) = plivo.transfers
    aleg_url = request.body["aleg_url"]
    assert request.call_uuid == "call-t" and aleg_url.startswith(transfer_url)
    # What Plivo then fetches: a Dial to the number, only with a valid transfer token.
    r = await client.post(aleg_url.removeprefix("http://testserver"))
    assert r.status_code == 200 and "<Dial" in r.text and "+14155550142</Number>" in r.text
    forged = f"{account.base}/Voiceagent/{agent_id}/transfer/?token=AAAA&to=%2B19005550000"
    assert (await client.post(forged)).status_code == 403
    stream_token = manager.tokens.issue(StreamClaims("call-t", agent_id, "acct", direction="inbound"))
    wrong_kind = f"{account.base}/Voiceagent/{agent_id}/transfer/?token={stream_token}&to=%2B19005550000"
    assert (await client.post(wrong_kind)).status_code == 403
