"""Function calls, barge-in, noise, DTMF, end_call, call_timeout through the real server and models."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx

from appliance.simulator.caller import Dtmf, Pause, Say
from tests.speech import noise_burst, recording

from .conftest import CallRig

LONG_WELCOME = (
    "Welcome to the city library information line. Our main branch is open from nine in the morning "
    "until eight in the evening on weekdays, and from ten until four on Saturdays. The children's "
    "reading room is on the second floor, and the study rooms can be booked at the front desk."
)
WAIT = 120_000


async def test_a_function_calling_turn_reaches_the_handler(rig: CallRig, speech_dir: Path) -> None:
    fn = await rig.function(
        name="deal_card", description="Deal the card the caller names", handler_url=rig.handler.url,
        user_parameters=[{"name": "card", "type": "string", "description": "the card, e.g. ten of clubs",
                          "required": True}],
    )  # fmt: skip
    agent = await rig.agent(
        prompt="You are the dealer at a card table. When the caller names a card, call deal_card with it.",
        function_ids=[fn],
    )
    before = len(rig.handler.calls)
    result = await rig.call(agent, [Say(speech_dir / "cards/003.wav", wait_for_agent=False, pause_ms=500)])
    assert not result.violations, result.violations
    record = await rig.record(result.call_uuid)
    assert len(rig.handler.calls) > before, record
    call = rig.handler.calls[-1]
    assert "club" in str(call).lower(), call
    assert record["function_calls"] and record["function_calls"][0]["name"] == "deal_card"
    assert record["function_calls"][0]["ok"]


async def test_barge_in_stops_the_agent_and_keeps_only_the_heard_words(
    rig: CallRig, speech_dir: Path
) -> None:
    agent = await rig.agent(welcome_message=LONG_WELCOME, prompt="Answer in one short sentence.")
    speech = recording(
        "librivox/sense_and_sensibility_01_austen_64kb-0880"
    )  # "he was not an ill disposed..."
    result = await rig.call(
        agent, [Say(speech.pcm, sample_rate=16000, barge_in_after_ms=3000, max_wait_ms=WAIT)],
        final_wait_ms=5_000,
    )  # fmt: skip
    assert not result.violations, result.violations
    (barge,) = result.barge_ins
    assert barge.cleared and barge.audio_stopped_ms is not None, barge
    print("barge-in reaction ms:", barge.reaction_ms)
    record = await rig.record(result.call_uuid)
    welcome = record["transcript"][0]
    assert welcome["who"] == "agent" and welcome["interrupted"], record["transcript"]
    heard = welcome["heard_text"]
    assert heard and LONG_WELCOME.startswith(heard) and len(heard) < len(LONG_WELCOME) // 2, heard
    # Once the barge-in is confirmed (clearAudio) the welcome is gone for good: its audio ends with
    # the clear (a tick or two) and nothing plays until the caller has finished. (Before the clear
    # the agent may have paused on a faint sound ahead of the words and resumed briefly: that is the
    # tentative hold, not this check's business.)
    (turn,) = result.turns
    clear, done = barge.clear_audio_ms, turn.last_voiced_ms
    assert clear is not None and done is not None and clear < done, (barge, turn)
    for seg in result.segments:
        if seg.wall_start_ms <= clear:
            assert seg.wall_end_ms <= clear + 40, (seg, barge)  # the caller drops its buffer at once
        else:
            assert seg.wall_start_ms > done, (seg, barge, turn)


async def test_a_noise_burst_during_agent_speech_does_not_cut_it_off(rig: CallRig) -> None:
    agent = await rig.agent(welcome_message=LONG_WELCOME)
    cough = noise_burst("cough", 8000, level_dbfs=-10.0)
    result = await rig.call(
        agent, [Say(cough, sample_rate=8000, barge_in_after_ms=2500, kind="noise", max_wait_ms=WAIT)],
        final_wait_ms=20_000,
    )  # fmt: skip
    assert not result.violations, result.violations
    assert result.clears == [], "a cough must not clear the agent's audio"
    record = await rig.record(result.call_uuid)
    welcome = record["transcript"][0]
    assert not welcome["interrupted"] and welcome["heard_text"] == LONG_WELCOME
    assert sum(s.end_ms - s.start_ms for s in result.segments) > 10_000  # the whole welcome played


async def test_dtmf_reaches_the_brain(rig: CallRig) -> None:
    agent = await rig.agent(prompt="When the caller presses a key, tell them which key they pressed.")
    result = await rig.call(agent, [Pause(500), Dtmf("5")])
    assert not result.violations, result.violations
    record = await rig.record(result.call_uuid)
    texts = [(t["who"], t["text"]) for t in record["transcript"]]
    assert ("caller", "[DTMF 5]") in texts, texts
    assert texts[-1][0] == "agent" and texts[-1][1], texts


async def test_end_call_hangs_up_through_plivo_rest(rig: CallRig) -> None:
    # Whether the small model picks end_call is the brain's business (tests/conversation) and not
    # fully deterministic; the prompt leaves little other choice, and every call where the model did
    # choose it (the record shows it) must end with a hang-up through Plivo's REST API.
    agent = await rig.agent(
        prompt=(
            "You are an automated line that only hangs up. For every caller message, call end_call. "
            "Never speak."
        )
    )
    for _ in range(3):
        result = await rig.call(agent, [Pause(500), Dtmf("9")])
        record = await rig.record(result.call_uuid)
        if any(f["name"] == "end_call" for f in record["function_calls"]):
            break
    else:
        raise AssertionError(f"the model never chose end_call in 3 calls: {record}")
    assert result.call_uuid in rig.plivo.hung_up, record
    assert record["hangup_cause"] == "agent_hangup"
    assert result.closed_by == "server" and result.segments  # goodbye was heard before hanging up


async def test_call_timeout_says_goodbye_and_ends_the_call(rig: CallRig) -> None:
    agent = await rig.agent(welcome_message="Hello.", call_timeout=10)
    result = await rig.call(agent, [Pause(40_000)])
    record = await rig.record(result.call_uuid)
    assert record["hangup_cause"] == "call_timeout", record
    assert result.call_uuid in rig.plivo.hung_up
    assert result.closed_by == "server" and result.duration_ms < 30_000
    goodbye = await rig.transcribe(result.segment_audio(result.segments[-1]))
    assert "time" in goodbye or "goodbye" in goodbye, goodbye


async def test_outbound_call_goes_through_plivo_and_connects_with_its_context(rig: CallRig) -> None:
    agent = await rig.agent(welcome_message="Hello, this is the library calling.")
    body = {"from": "+14155550100", "to": "+14155550177", "context": {"name": "Ada"}}
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{rig.api}/Voiceagent/{agent['id']}/Call/", json=body, auth=rig.account.auth)
    assert r.status_code == 201, r.text
    placed = rig.plivo.placed[-1]
    assert placed.params["answer_url"] == agent["call_url"]
    assert placed.request_uuid == r.json()["request_uuid"]
    # Plivo dials, the callee answers: Plivo fetches the answer URL and opens the stream.
    result = await rig.call(
        agent, [Pause(3000)], call_uuid=placed.call_uuid, direction="outbound",
        extra_form={"ALegRequestUUID": placed.request_uuid}, final_wait_ms=3000,
    )  # fmt: skip
    assert not result.violations, result.violations
    assert result.segments  # the callee heard the agent
    record = await rig.record(placed.call_uuid)
    assert record["direction"] == "outbound" and record["to"] == "+14155550199"


async def test_delete_hangs_up_a_live_call(rig: CallRig) -> None:
    agent = await rig.agent(welcome_message=LONG_WELCOME)
    opts_uuid = str(uuid.uuid4())
    call = asyncio.create_task(rig.call(agent, [Pause(30_000)], call_uuid=opts_uuid))
    async with httpx.AsyncClient(timeout=30) as client:
        async with asyncio.timeout(120):
            while True:
                r = await client.delete(f"{rig.api}/Call/{opts_uuid}/", auth=rig.account.auth)
                if r.status_code == 204:
                    break
                await asyncio.sleep(0.5)
    result = await asyncio.wait_for(call, 60)
    assert result.closed_by == "server"
    assert opts_uuid in rig.plivo.hung_up
    record = await rig.record(opts_uuid)
    assert record["hangup_cause"] == "api_hangup"
