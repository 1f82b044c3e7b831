import asyncio
import json
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from appliance.simulator.audio import save_wav
from appliance.simulator.caller import CallerOptions, Dtmf, Pause, Say, run_call, save_result
from appliance.telephony import protocol as proto
from appliance.telephony.rest import PlivoRest
from tests.fakes.plivo_rest import FakePlivo
from tests.fakes.server import serve_asgi
from tests.simulator.fake_agent import FakeAgent, build_app, voice

TOKEN = "plivo-auth-token"
ROOT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture
async def agent() -> AsyncIterator[FakeAgent]:
    fake = FakeAgent()
    async with serve_asgi(build_app(fake)) as base_url:
        fake.base_url = base_url
        yield fake


def _options(agent: FakeAgent, **kw: object) -> CallerOptions:
    defaults: dict[str, object] = {"agent_settle_ms": 300, "final_wait_ms": 3000, "max_call_s": 60}
    defaults.update(kw)
    return CallerOptions(answer_url=agent.base_url + "/talk", **defaults)  # type: ignore[arg-type]


async def test_answer_and_start_exactly_like_plivo_with_valid_signatures(agent: FakeAgent) -> None:
    agent.auth_token = TOKEN
    options = _options(agent, auth_token=TOKEN, call_uuid="call-123", account_id="MA0000000000000000AB")
    result = await run_call(options, [Pause(100)])
    form = agent.forms[0]
    assert form["CallUUID"] == "call-123" and form["Direction"] == "inbound"
    assert form["From"] == options.from_number and form["To"] == options.to_number and form["CallStatus"]
    assert [v.ok for v in agent.answer_verdicts] == [True]
    assert [v.ok for v in agent.ws_verdicts] == [True]
    start = agent.events[0][1]
    assert isinstance(start, proto.Start)
    assert start.call_id == "call-123" and start.stream_id == result.stream_id
    assert start.account_id == "MA0000000000000000AB" and start.tracks == ("inbound",)
    assert start.media_format == proto.MediaFormat("audio/x-mulaw", 8000)
    assert start.extra_headers == {"token": "T0K3N", "agentId": "a1"}
    assert isinstance(agent.events[-1][1], proto.Stop)
    assert result.closed_by == "caller" and result.violations == [] and agent.errors == []


async def test_media_is_paced_in_real_time_with_a_noise_floor(agent: FakeAgent) -> None:
    result = await run_call(_options(agent), [Pause(1000)])
    times = agent.media_times
    assert len(times) >= 40
    # Never faster than real time (a lower bound: a slow machine cannot make this fail).
    assert times[-1] - times[0] >= (len(times) - 1) * 0.020 * 0.8
    assert result.violations == []


async def test_turn_timing_and_played_stream_waits_for_playout(agent: FakeAgent) -> None:
    agent.paced = False  # the whole 600 ms reply arrives at once; the ack must still wait for playout
    result = await run_call(_options(agent), [Say(voice(500), pause_ms=100, wait_for_agent=False)])
    (turn,) = result.turns
    assert turn.last_voiced_ms is not None and turn.voice_to_voice_ms is not None
    assert turn.first_agent_audio_ms is not None and turn.first_agent_audio_ms > turn.last_voiced_ms
    assert result.checkpoints == ["turn-1"] and result.acknowledged == ["turn-1"]
    (acked,) = [t for t, e in agent.events if isinstance(e, proto.PlayedStream)]
    assert acked - agent.checkpoint_sent_at["turn-1"] >= 0.5  # after the 600 ms played (lower bound only)
    assert result.max_playback_lead_ms >= 500
    (segment,) = result.segments
    assert 560 <= segment.end_ms - segment.start_ms <= 640
    assert float(np.abs(result.segment_audio(segment)).mean()) > 1000


async def test_played_stream_arrives_after_the_audio_duration(agent: FakeAgent) -> None:
    agent.paced = False
    agent.reply_ms = 1000
    await run_call(_options(agent), [Say(voice(400), pause_ms=0, wait_for_agent=False)])
    (ack_time,) = [t for t, e in agent.events if isinstance(e, proto.PlayedStream)]
    assert ack_time - agent.checkpoint_sent_at["turn-1"] >= 0.9  # 1000 ms of audio had to play first


async def test_clear_audio_drops_playback_and_is_acknowledged(agent: FakeAgent) -> None:
    agent.paced = False
    agent.reply_ms = 4000
    agent.clear_on_barge_in = True
    script = [
        Say(voice(400), wait_for_agent=False, pause_ms=0, label="ask"),
        Say(voice(600), barge_in_after_ms=500, label="interrupt"),
    ]
    result = await run_call(_options(agent), script)
    assert any(isinstance(e, proto.ClearedAudio) for _, e in agent.events)
    assert "turn-1" in result.checkpoints and "turn-1" not in result.acknowledged  # never acked after a clear
    (barge,) = result.barge_ins
    assert barge.cleared and barge.onset_ms is not None and barge.reaction_ms is not None
    assert barge.clear_audio_ms is not None and barge.clear_audio_ms >= barge.onset_ms
    first = result.segments[0]
    assert first.end_ms - first.start_ms < 3000  # the 4 s reply was cut short
    assert result.turns[1].barge_in


async def test_noise_burst_is_not_a_turn_and_pauses_are_measured(agent: FakeAgent) -> None:
    agent.reply_ms = 1500
    script = [
        Say(voice(400), wait_for_agent=False, pause_ms=0),
        Say(voice(100), barge_in_after_ms=300, kind="noise", label="cough"),
    ]
    result = await run_call(_options(agent), script)
    assert len(result.turns) == 1
    (barge,) = result.barge_ins
    assert barge.kind == "noise" and not barge.cleared and barge.clear_audio_ms is None


async def test_wav_output_and_json(agent: FakeAgent, tmp_path: Path) -> None:
    agent.welcome_ms = 400
    src = tmp_path / "q16k.wav"
    save_wav(src, np.repeat(voice(500), 2), rate=16000)  # any input rate is resampled to 8 kHz
    result = await run_call(_options(agent), [Say(src, pause_ms=50), Dtmf("5")])
    save_result(result, tmp_path / "agent.wav", tmp_path / "call.json")
    with wave.open(str(tmp_path / "agent.wav")) as w:
        assert w.getframerate() == 8000 and w.getnchannels() == 1
        assert w.getnframes() == len(result.agent_audio) > 8000
    data = json.loads((tmp_path / "call.json").read_text())
    assert data["turns"][0]["label"] == "q16k.wav" and data["turns"][0]["voice_to_voice_ms"] is not None
    assert "welcome" in data["acknowledged"] and len(data["segments"]) >= 2
    assert any(isinstance(e, proto.Dtmf) and e.digit == "5" for _, e in agent.events)


@pytest.mark.parametrize(
    ("command", "kind"),
    [
        (
            '{"event":"playAudio","media":{"contentType":"audio/x-mulaw","sampleRate":8000,"payload":"/w=="}}',
            "bad_size",
        ),
        ('{"event":"speak","text":"hi"}', "unknown_event"),
        ('{"event":"checkpoint","streamId":"wrong","name":"x"}', "bad_field"),
        ("not json", "bad_json"),
    ],
)
async def test_server_messages_off_spec_are_recorded(agent: FakeAgent, command: str, kind: str) -> None:
    agent.extra_commands = [command, proto.encode_checkpoint("STREAM", "ok")]
    result = await run_call(_options(agent), [Pause(100)])
    assert [v.kind for v in result.violations] == [kind]
    assert result.acknowledged == ["ok"]  # the call went on


async def test_apology_answer_means_no_stream(agent: FakeAgent) -> None:
    agent.apology = True
    result = await run_call(_options(agent), [Pause(100)])
    assert result.closed_by == "no-stream" and result.stream_url is None and result.violations == []
    assert "<Hangup" in result.answer_xml


def test_cli_script_items_parse(tmp_path: Path) -> None:
    import argparse

    from appliance.simulator.cli import parse_item

    wav = str(tmp_path / "q.wav")
    assert parse_item(wav, 300) == Say(Path(wav), pause_ms=300)
    assert parse_item("pause:700", 0) == Pause(700)
    assert parse_item("dtmf:12#", 0).digits == "12#"  # type: ignore[union-attr]
    barge = parse_item(f"barge:800:{wav}", 0)
    assert isinstance(barge, Say) and barge.barge_in_after_ms == 800 and barge.kind == "speech"
    noise = parse_item(f"noise:500:{wav}", 0)
    assert isinstance(noise, Say) and noise.kind == "noise"
    with pytest.raises(argparse.ArgumentTypeError):
        parse_item("barge:x:file.wav", 0)


async def test_cli_end_to_end(agent: FakeAgent, tmp_path: Path) -> None:
    import asyncio
    import sys

    src = tmp_path / "q.wav"
    save_wav(src, voice(500))
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / "scripts" / "simulate_call"),
        "--answer-url",
        agent.base_url + "/talk",
        "--settle",
        "300",
        "--out-wav",
        str(tmp_path / "out.wav"),
        f"now:{src}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:] + sys.executable
    report = json.loads(out)
    assert report["turns"][0]["voice_to_voice_ms"] is not None and report["violations"] == []
    assert (tmp_path / "out.wav").stat().st_size > 1000


async def test_outbound_call_placed_through_fake_plivo_and_hung_up_by_rest(
    agent: FakeAgent, fake_plivo: FakePlivo
) -> None:
    agent.auth_token = fake_plivo.auth_token
    rest = PlivoRest(fake_plivo.auth_id, fake_plivo.auth_token, api_base_url=fake_plivo.base_url)
    fired = await rest.make_call("+14155550100", "+14155550123", agent.base_url + "/talk")
    (placed,) = fake_plivo.placed
    options = fake_plivo.caller_options(placed, max_call_s=30)

    async def hang_up_soon() -> None:
        await asyncio.sleep(0.5)
        assert await rest.hangup(placed.call_uuid)

    async with asyncio.TaskGroup() as group:
        call = group.create_task(run_call(options, [Pause(20_000)]))
        group.create_task(hang_up_soon())
    result = call.result()
    assert result.closed_by == "hangup" and result.duration_ms < 20_000
    form = agent.forms[0]
    assert form["Direction"] == "outbound" and form["To"] == "+14155550123"
    assert form["CallUUID"] == placed.call_uuid and form["ALegRequestUUID"] == fired.request_uuid
    assert [v.ok for v in agent.answer_verdicts + agent.ws_verdicts] == [True, True]
    assert isinstance(agent.events[-1][1], proto.Stop)


async def test_refused_websocket_and_dead_answer_url_are_reported_not_raised(agent: FakeAgent) -> None:
    agent.refuse_ws = True
    result = await run_call(_options(agent), [Pause(100)])
    assert result.closed_by == "connect-failed" and [v.kind for v in result.violations] == ["connect"]
    dead = await run_call(CallerOptions(answer_url="http://127.0.0.1:9/talk", http_timeout_s=2), [Pause(10)])
    assert dead.closed_by == "answer-failed" and dead.violations[0].kind == "answer"


async def test_second_connection_probe(agent: FakeAgent) -> None:
    from appliance.simulator.probe import second_connection

    url = agent.base_url.replace("http", "ws", 1) + "/ws?token=T0K3N"
    assert await second_connection(url, "c1", wait_s=0.5) == "accepted"  # the fake keeps it open
    agent.refuse_ws = True
    assert await second_connection(url, "c1", wait_s=0.5) == "refused"
