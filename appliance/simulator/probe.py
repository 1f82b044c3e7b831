"""Plivo sometimes opens a second websocket for a call that has already ended (PLIVO.md §5).

:func:`second_connection` replays that: connect to the same stream URL again, send a ``start`` for
the same call, and report whether the server refused it (handshake rejected, or the socket closed
without the agent saying anything) or accepted it (still open, or agent audio arrived).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Literal

import websockets
from websockets.asyncio.client import connect

from appliance.telephony import protocol as proto
from appliance.telephony.signature import signature_headers

Outcome = Literal["refused", "accepted"]


async def second_connection(
    url: str,
    call_uuid: str,
    *,
    extra_headers: str = "",
    account_id: str = "MA00000000000000SIM1",
    auth_token: str | None = None,
    wait_s: float = 2.0,
) -> Outcome:
    headers = signature_headers("GET", url, auth_token) if auth_token else {}
    try:
        async with connect(url, additional_headers=headers, ping_interval=None) as ws:
            await ws.send(
                proto.encode_start(
                    sequence_number=1,
                    call_id=call_uuid,
                    stream_id=str(uuid.uuid4()),
                    account_id=account_id,
                    extra_headers=extra_headers,
                )
            )
            try:
                async with asyncio.timeout(wait_s):
                    async for message in ws:
                        if isinstance(message, str) and '"playAudio"' in message:
                            return "accepted"
            except TimeoutError:
                return "accepted"  # the server kept a finished call's socket open
            return "refused"
    except (websockets.InvalidHandshake, websockets.ConnectionClosed, OSError):
        return "refused"
