"""The media websocket with a hand-driven peer: malformed frames, a second socket, message shapes."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from appliance.telephony import protocol as proto
from appliance.telephony.signature import signature_headers
from appliance.telephony.xml import parse_stream_xml

from .conftest import CallRig


async def answer(rig: CallRig, agent: dict[str, object], call_uuid: str) -> str:
    fields = {"CallUUID": call_uuid, "From": "+1555", "To": "+1666", "Direction": "inbound"}
    url = str(agent["call_url"])
    headers = signature_headers("POST", url, rig.plivo.auth_token, fields)
    async with httpx.AsyncClient() as client:
        r = await client.post(url, data=fields, headers=headers)
    return parse_stream_xml(r.content).url


def start_frame(call_uuid: str, stream_id: str) -> str:
    return proto.encode_start(sequence_number=1, call_id=call_uuid, stream_id=stream_id, account_id="MA1")


def media(stream_id: str, n: int, payload: bytes = b"\xff" * 160) -> str:
    return proto.encode_media(sequence_number=n + 1, stream_id=stream_id, chunk=n, timestamp_ms=n * 20,
                              payload=payload)  # fmt: skip


MALFORMED: dict[str, str | bytes] = {
    "bad_json": "{not json",
    "not_an_object": "[1, 2, 3]",
    "bad_base64": json.dumps({"event": "media", "media": {"payload": "@@@not base64@@@", "timestamp": "1"}}),
    "unknown_event": json.dumps({"event": "teleport", "sequenceNumber": 5}),
    "wrong_size": json.dumps(
        {"event": "media", "media": {"payload": base64.b64encode(b"\xff" * 16000).decode(), "timestamp": "1"}}
    ),
    "empty_payload": json.dumps({"event": "media", "media": {"payload": "", "timestamp": "1"}}),
    "missing_field": json.dumps({"event": "dtmf", "dtmf": {}}),
    "binary": b"\x00\x01\x02",
}


async def test_every_malformed_frame_kind_leaves_the_call_alive(rig: CallRig) -> None:
    agent = await rig.agent(welcome_message="Hello there, how can I help you today?")
    call_uuid = str(uuid.uuid4())
    stream_id = str(uuid.uuid4())
    url = await answer(rig, agent, call_uuid)
    received: list[proto.Command] = []
    async with connect(url) as ws:
        # Media before start: skipped, not fatal.
        await ws.send(media(stream_id, 0))
        await ws.send(start_frame(call_uuid, stream_id))
        for frame in MALFORMED.values():
            await ws.send(frame)
        # The call goes on: the welcome arrives, and every message Plivo gets has a documented shape.
        async with asyncio.timeout(120):
            n = 1
            while not any(isinstance(c, proto.Checkpoint) for c in received):
                await ws.send(media(stream_id, n))
                n += 1
                try:
                    async with asyncio.timeout(0.02):
                        message = await ws.recv()
                except TimeoutError:
                    continue
                received.append(proto.parse_command(message, stream_id))
        assert any(isinstance(c, proto.PlayAudio) for c in received)
        await ws.send(proto.encode_stop(sequence_number=999, stream_id=stream_id))
    record = await rig.record(call_uuid)
    assert record["status"] == "completed" and record["hangup_cause"] == "stop"

    # A second websocket for the finished call is refused.
    async with connect(url) as ws:
        await ws.send(start_frame(call_uuid, str(uuid.uuid4())))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(30):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_a_stream_without_a_valid_token_is_refused(rig: CallRig) -> None:
    agent = await rig.agent()
    call_uuid = str(uuid.uuid4())
    url = await answer(rig, agent, call_uuid)
    forged = url.split("?")[0] + "?token=AAAA"
    async with connect(forged) as ws:
        await ws.send(start_frame(call_uuid, str(uuid.uuid4())))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(30):
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
