"""scripts/bench_load and scripts/soak: their arithmetic (percentiles per level, the capacity decision,
soak slopes and verdict, the busy-call check) on synthetic numbers, the process probes, the server
process helper (started without model weights: it serves, is measured and stops), ``--help``, and
one short real load run (one level, one call, one turn, plus the over-capacity check)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.api.talk import BUSY_MESSAGE
from appliance.config import PROJECT_ROOT, load_settings
from appliance.simulator.benchkit import (
    SPEECH_DIR,
    CpuMeter,
    ServerProcess,
    SoakLimits,
    SpeechDeck,
    busy_problems,
    call_summary,
    capacity,
    missing_models,
    pct,
    pool_levels,
    proc_sample,
    round_plan,
    slope_per_hour,
    soak_verdict,
    summarize_level,
    turn_script,
    wait_ready,
)
from appliance.simulator.caller import Say
from appliance.simulator.report import CallResult, Segment, Turn, Violation
from appliance.telephony.xml import apology_xml, stream_xml

SCRIPTS = PROJECT_ROOT / "scripts"


def _call(v2v: list[float], unanswered: int = 0, closed_by: str = "caller", **kw: Any) -> dict[str, Any]:
    return {
        "voice_to_voice_ms": v2v,
        "unanswered": unanswered,
        "closed_by": closed_by,
        "violation_count": kw.get("violations", 0),
        "late_ticks": kw.get("late_ticks", 0),
    }


def _level(level: int, p95: float | None, unanswered: int = 0) -> dict[str, Any]:
    return {"level": level, "voice_to_voice_p95_ms": p95, "unanswered": unanswered}


# -- percentiles and levels -------------------------------------------------------------------------


def test_pct_interpolates_and_handles_empty() -> None:
    assert pct([], 0.5) is None
    assert pct([5.0], 0.95) == 5.0
    assert pct([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert pct(range(1, 101), 0.9) == 90.1


def test_summarize_level_pools_the_turns_of_every_call() -> None:
    calls = [
        _call([1000.0, 2000.0], closed_by="caller"),
        _call([3000.0], unanswered=1, closed_by="timeout", violations=2, late_ticks=3),
    ]
    s = summarize_level(
        2, calls, cpu={"cpu_pct": 80.0, "thread_cpu_pct": 5.0, "wall_s": 60.0}, peak_rss_mb=900.0
    )
    assert s["level"] == 2 and s["calls"] == 2
    assert s["turns"] == 4 and s["answered"] == 3 and s["unanswered"] == 1
    assert s["voice_to_voice_p50_ms"] == 2000.0 and s["voice_to_voice_p95_ms"] == 2900.0
    assert s["voice_to_voice_max_ms"] == 3000.0
    assert s["violations"] == 2 and s["cut_calls"] == 1 and s["late_ticks"] == 3
    assert s["cpu_pct"] == 80.0 and s["caller_cpu_pct"] == 5.0 and s["peak_rss_mb"] == 900.0
    empty = summarize_level(6, [])
    assert empty["turns"] == 0 and empty["voice_to_voice_p95_ms"] is None and empty["cpu_pct"] is None


# -- capacity decision ------------------------------------------------------------------------------


def test_capacity_is_the_highest_level_within_the_factor_of_the_single_call_p95() -> None:
    levels = [_level(1, 2000), _level(2, 2400), _level(3, 2900), _level(4, 3000), _level(6, 3100)]
    cap = capacity(levels, 1.5, target=4)
    assert cap["baseline_level"] == 1 and cap["limit_ms"] == 3000.0
    assert cap["max_level"] == 4 and cap["target_met"]
    assert cap["per_level"] == {1: True, 2: True, 3: True, 4: True, 6: False}


def test_capacity_stops_at_the_first_failing_level_and_counts_unanswered_turns() -> None:
    # Level 3 answers fast but drops a turn: it fails, and level 4 above it does not count.
    levels = [_level(4, 2100), _level(1, 2000), _level(2, 2500), _level(3, 2200, unanswered=1)]
    cap = capacity(levels, 1.5, target=4)
    assert cap["max_level"] == 2 and not cap["target_met"]
    assert cap["per_level"] == {1: True, 2: True, 3: False, 4: True}


def test_capacity_uses_the_lowest_measured_level_when_there_is_no_single_call_level() -> None:
    cap = capacity([_level(2, 1000), _level(4, 1600), _level(3, None)], 1.5, target=4)
    assert cap["baseline_level"] == 2 and cap["max_level"] == 2  # level 3 answered nothing: it fails
    assert cap["per_level"] == {2: True, 3: False, 4: False}
    nothing = capacity([_level(1, None)])
    assert nothing["max_level"] is None and not nothing["target_met"]


# -- rounds ---------------------------------------------------------------------------------------


def test_round_plan_goes_up_the_levels_then_down_then_up() -> None:
    assert round_plan([1, 2, 4], 1) == [(0, 1), (0, 2), (0, 4)]
    plan = round_plan([4, 1, 2], 3)
    assert plan == [(0, 1), (0, 2), (0, 4), (1, 4), (1, 2), (1, 1), (2, 1), (2, 2), (2, 4)]
    # Over an even number of rounds every level sits at the same mean position in the run.
    even = round_plan([1, 2, 3, 4], 2)
    mean_position = {lv: sum(i for i, (_, x) in enumerate(even) if x == lv) / 2 for lv in (1, 2, 3, 4)}
    assert set(mean_position.values()) == {3.5}


def _round(level: int, rnd: int, *, cpu: float, caller: float | None, wall: float, rss: float | None) -> dict:
    return {
        "level": level, "round": rnd, "cpu_pct": cpu, "caller_cpu_pct": caller, "wall_s": wall,
        "peak_rss_mb": rss,
    }  # fmt: skip


def test_pool_levels_decides_on_every_rounds_turns_together() -> None:
    calls = [
        {**_call([500.0, 600.0]), "level": 1, "round": 0},
        {**_call([900.0]), "level": 1, "round": 1},
        {**_call([1000.0, 3000.0], unanswered=1), "level": 2, "round": 0},
        {**_call([1100.0]), "level": 2, "round": 1},
    ]
    rounds = [  # as run: up, then down
        _round(1, 0, cpu=10.0, caller=2.0, wall=100.0, rss=900.0),
        _round(2, 0, cpu=30.0, caller=4.0, wall=60.0, rss=950.0),
        _round(2, 1, cpu=20.0, caller=2.0, wall=20.0, rss=990.0),
        _round(1, 1, cpu=16.0, caller=None, wall=50.0, rss=None),
    ]
    one, two = pool_levels(rounds, calls)
    assert one["level"] == 1 and one["rounds"] == 2 and one["calls"] == 2
    assert one["answered"] == 3 and one["voice_to_voice_p50_ms"] == 600.0
    assert one["cpu_pct"] == 12.0  # (10 x 100 + 16 x 50) / 150 s
    assert one["caller_cpu_pct"] == 2.0 and one["peak_rss_mb"] == 900.0 and one["wall_s"] == 150.0
    assert two["level"] == 2 and two["turns"] == 4 and two["unanswered"] == 1
    assert two["voice_to_voice_max_ms"] == 3000.0 and two["cpu_pct"] == 27.5 and two["peak_rss_mb"] == 990.0
    # The verdict rests on the pooled turns: level 2 dropped a turn in one round, so it fails.
    cap = capacity([one, two], 1.5, target=2)
    assert cap["baseline_p95_ms"] == one["voice_to_voice_p95_ms"] and cap["max_level"] == 1
    assert pool_levels([], []) == []


# -- soak -------------------------------------------------------------------------------------------


def _samples(minutes: float, rss_per_hour: float, fds_per_hour: float = 0.0, every_s: float = 5.0) -> list:
    rng = random.Random(3)
    out = []
    for i in range(int(minutes * 60 / every_s) + 1):
        t = i * every_s
        out.append(
            {
                "t_s": t,
                "rss_mb": 1000.0 + rss_per_hour * t / 3600 + rng.uniform(-2, 2),
                "fds": 40.0 + round(fds_per_hour * t / 3600),
                "threads": 24.0,
            }
        )
    return out


def test_a_call_summary_keeps_when_each_turn_was_spoken_and_when_the_agent_played() -> None:
    result = CallResult("c1", "s1", 200, "<Response/>")
    result.turns = [
        Turn("cards/001", speech_onset_ms=1000.04, last_voiced_ms=1900.0, ended_ms=2100.0,
             first_agent_audio_ms=2700.0, voice_to_voice_ms=800.0),
        Turn("cards/004", speech_onset_ms=5000.0, last_voiced_ms=5800.0, ended_ms=6000.0),
    ]  # fmt: skip
    result.segments = [Segment(0.0, 1500.0, 10.0, 1510.0), Segment(2700.0, 4200.0, 2700.0, 4200.0)]
    summary = call_summary(result)
    assert summary["unanswered"] == 1 and summary["turns"] == [["cards/001", 800.0], ["cards/004", None]]
    timeline = summary["timeline_ms"]
    # An unanswered turn shows when it was spoken against when the agent played.
    assert timeline["turns"] == [
        ["cards/001", 1000.0, 1900.0, 2100.0, 2700.0],
        ["cards/004", 5000.0, 5800.0, 6000.0, None],
    ]
    assert timeline["agent"] == [[10.0, 1510.0], [2700.0, 4200.0]]
    json.dumps(summary)  # written as JSON by every benchmark


def test_slope_per_hour_fits_a_line() -> None:
    assert slope_per_hour([(0, 10.0), (1800, 20.0), (3600, 30.0)]) == 20.0
    assert slope_per_hour([(0, 5.0), (60, 5.0)]) == 0.0
    assert slope_per_hour([(0, 5.0)]) is None
    assert slope_per_hour([(10, 5.0), (10, 7.0)]) is None


def test_soak_verdict_flat_when_idle_deltas_and_slopes_are_small() -> None:
    samples = _samples(30, rss_per_hour=0.0)
    base = {"rss_mb": 1000.0, "fds": 40.0, "threads": 24.0}
    final = {"rss_mb": 1004.0, "fds": 41.0, "threads": 24.0}
    v = soak_verdict(samples, 360.0, base, final)
    assert v["verdict"] == "flat", v["reasons"]
    assert abs(v["rss_mb_per_hour"]) < 5 and v["fds_per_hour"] == 0.0
    assert v["idle_rss_delta_mb"] == 4.0 and v["idle_fd_delta"] == 1.0 and v["idle_thread_delta"] == 0.0
    assert v["samples_after_warmup"] == len([s for s in samples if s["t_s"] >= 360.0])
    assert v["window_s"] == 1440.0


def test_soak_verdict_growing_on_a_slope_or_an_idle_delta() -> None:
    base = {"rss_mb": 1000.0, "fds": 40.0, "threads": 24.0}
    leaking = soak_verdict(_samples(30, rss_per_hour=60.0), 360.0, base, dict(base))
    assert leaking["verdict"] == "growing" and 50 < leaking["rss_mb_per_hour"] < 70
    assert any("RSS slope" in r for r in leaking["reasons"])
    fd_leak = soak_verdict(_samples(30, 0.0, fds_per_hour=100.0), 360.0, base, dict(base, fds=80.0))
    assert fd_leak["verdict"] == "growing"
    assert any("idle FDs grew +40" in r for r in fd_leak["reasons"])
    assert any("FD slope" in r for r in fd_leak["reasons"])
    # An idle delta counts even on a short run; slopes on a short run do not.
    short = soak_verdict(_samples(2, rss_per_hour=3000.0), 30.0, base, dict(base, threads=30.0))
    assert short["verdict"] == "growing"
    assert [r for r in short["reasons"] if "slope" in r] == []
    assert any("threads grew +6" in r for r in short["reasons"])


def test_soak_verdict_inconclusive_on_a_short_window_or_without_baseline() -> None:
    base = {"rss_mb": 1000.0, "fds": 40.0, "threads": 24.0}
    v = soak_verdict(_samples(2, rss_per_hour=3000.0), 30.0, base, dict(base))
    assert v["verdict"] == "inconclusive" and v["rss_mb_per_hour"] > 1000
    assert "slopes not judged" in v["reasons"][0]
    none = soak_verdict(_samples(2, 0.0), float("inf"), None, None)
    assert none["verdict"] == "inconclusive" and none["idle_rss_delta_mb"] is None
    assert none["samples_after_warmup"] == 0 and none["rss_mb_per_hour"] is None
    strict = soak_verdict(_samples(12, 0.0), 60.0, base, dict(base), SoakLimits(min_span_s=60))
    assert strict["verdict"] == "flat"


# -- busy calls -------------------------------------------------------------------------------------


def test_busy_problems_accepts_only_a_spoken_busy_message_and_a_hangup() -> None:
    ok = CallResult("c1", "s1", 200, apology_xml(BUSY_MESSAGE), closed_by="no-stream")
    assert busy_problems(ok, BUSY_MESSAGE) == []
    streamed = CallResult("c2", "s2", 200, stream_xml("ws://127.0.0.1/x"), stream_url="ws://127.0.0.1/x")
    problems = busy_problems(streamed, BUSY_MESSAGE)
    assert any("busy message" in p for p in problems) and any("stream" in p for p in problems)
    silent = CallResult("c3", "s3", 200, "<Response><Hangup/></Response>")
    assert any("busy message" in p for p in busy_problems(silent, BUSY_MESSAGE))
    other = CallResult("c4", "s4", 200, apology_xml())  # the unknown-agent apology is not the busy one
    assert busy_problems(other, BUSY_MESSAGE)
    failed = CallResult("c5", "s5", 500, "", violations=[Violation(0.0, "answer", "HTTP 500", "")])
    assert len(busy_problems(failed, BUSY_MESSAGE)) >= 3


# -- speech script and process probes --------------------------------------------------------------


def test_turn_script_says_real_recordings_with_caller_pauses() -> None:
    paths = [Path("/x/cards/001.wav"), Path("/x/cards/002.wav"), Path("/x/librivox/s-0870.wav")]
    one = turn_script(random.Random(5), 40, paths=paths, pause_ms=(300, 900))
    again = turn_script(random.Random(5), 40, paths=paths, pause_ms=(300, 900))
    assert len(one) == 40 and all(isinstance(s, Say) for s in one)
    said = [s for s in one if isinstance(s, Say)]
    assert [s.audio for s in said] == [s.audio for s in again if isinstance(s, Say)]
    assert all(300 <= s.pause_ms <= 900 and s.wait_for_agent and s.kind == "speech" for s in said)
    assert {s.audio for s in said} == set(paths)  # cards mostly, a read sentence now and then
    assert sum(1 for s in said if "librivox" in str(s.audio)) < 20
    assert said[0].label.startswith(("cards/", "librivox/"))


def test_a_speech_deck_deals_every_recording_in_a_fixed_share() -> None:
    cards = [Path(f"/x/cards/00{i}.wav") for i in range(1, 6)]
    sentences = [Path(f"/x/librivox/s-08{i}0.wav") for i in range(7, 10)] + [Path("/x/librivox/s-0920.wav")]
    deck = SpeechDeck(cards + sentences, random.Random(1))
    # A quarter sentences: each card 12 times and each sentence 5 (4 x 5 = 20 of the 80).
    assert deck.size == 80
    dealt = [deck.deal() for _ in range(160)]
    for first in (dealt[:80], dealt[80:]):  # every full deck holds the same mix
        assert {p: first.count(p) for p in cards} == {p: 12 for p in cards}
        assert {p: first.count(p) for p in sentences} == {p: 5 for p in sentences}
    assert dealt[:80] != dealt[80:]  # shuffled again, not replayed
    again = SpeechDeck(cards + sentences, random.Random(1))
    assert [again.deal() for _ in range(160)] == dealt  # the same seed deals the same
    other = SpeechDeck(cards + sentences, random.Random(2))
    assert [other.deal() for _ in range(80)] != dealt[:80]
    half = SpeechDeck(cards[:2] + sentences[:3], random.Random(3), sentence_share=0.5)
    assert half.size == 12 and sum(1 for _ in range(12) if half.deal() in sentences) == 6
    only_cards = SpeechDeck(cards, random.Random(4))
    assert only_cards.size == 5 and {only_cards.deal() for _ in range(5)} == set(cards)
    with pytest.raises(ValueError):
        SpeechDeck([], random.Random(5))


def test_turn_script_says_what_the_deck_deals() -> None:
    paths = [Path("/x/cards/001.wav"), Path("/x/cards/002.wav"), Path("/x/librivox/s-0870.wav")]
    deck, mirror = SpeechDeck(paths, random.Random(7)), SpeechDeck(paths, random.Random(7))
    said = turn_script(random.Random(8), 10, paths=paths, deck=deck)
    assert [s.audio for s in said if isinstance(s, Say)] == [mirror.deal() for _ in range(10)]


def test_proc_sample_and_cpu_meter_read_this_process() -> None:
    s = proc_sample()
    assert s["rss_mb"] > 10 and s["hwm_mb"] >= s["rss_mb"] and s["fds"] >= 3 and s["threads"] >= 1
    meter = CpuMeter()
    meter.start()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    used = meter.stop()
    assert used["cpu_pct"] > 5 and used["thread_cpu_pct"] > 5 and used["wall_s"] >= 0.3


def test_proc_sample_and_cpu_meter_read_another_process() -> None:
    busy = "import time\nprint('go', flush=True)\nend = time.monotonic() + 0.6\n"
    busy += "while time.monotonic() < end:\n    pass\n"
    child = subprocess.Popen([sys.executable, "-c", busy], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "go\n"
        meter = CpuMeter(pid=child.pid)
        meter.start()
        s = proc_sample(child.pid)
        assert s["rss_mb"] > 1 and s["fds"] >= 3 and s["threads"] == 1
        time.sleep(0.4)
        used = meter.stop()
        assert used["cpu_pct"] > 5  # the child's busy loop
        assert used["caller_cpu_pct"] < used["cpu_pct"]  # this process mostly slept
    finally:
        child.kill()
        child.wait()


def test_server_process_serves_on_loopback_is_measured_and_stops(tmp_path: Path) -> None:
    """``python -m appliance serve`` as a child: without weights its engines fail at once, but it
    answers /health and /metrics; its figures are its own; SIGTERM stops it gracefully."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "manifest.toml").write_text((PROJECT_ROOT / "models" / "manifest.toml").read_text())
    env = {**os.environ, "APPLIANCE_MODELS_DIR": str(models)}
    with pytest.raises(SystemExit, match="models missing"):
        ServerProcess(tmp_path / "refused", env=env)
    server = ServerProcess(tmp_path / "data", env=env, max_calls=3, require_models=False)

    async def probe() -> tuple[int, str, int]:
        with pytest.raises(SystemExit, match="engines failed"):
            await wait_ready(server.base_url, 60, check=server.check)
        async with httpx.AsyncClient(timeout=10) as client:
            health = await client.get(f"{server.base_url}/health")
        return health.status_code, health.text, await server.live_calls()

    try:
        assert server.base_url.startswith("http://127.0.0.1:") and server.pid != os.getpid()
        assert server.mode == "process" and server.max_calls == 3
        status, body, live = asyncio.run(probe())
        assert status == 200 and "ok" in body and live == 0
        s = server.sample()
        mine = proc_sample()
        assert s["rss_mb"] > 30 and s["fds"] >= 3 and s["threads"] >= 2 and s["cpu_s"] > 0
        assert s != mine
        server.set_max_calls(3)
        with pytest.raises(RuntimeError, match="max_calls=5"):
            server.set_max_calls(5)
    finally:
        code = server.stop(timeout_s=30)
    assert code in (0, -signal.SIGTERM) and not server.killed  # uvicorn re-raises the SIGTERM it handled
    assert server.proc.poll() is not None and server.stop() == code
    assert server.peak_rss_mb() >= s["rss_mb"]
    info = server.describe()
    assert info["mode"] == "process" and info["returncode"] == code
    assert info["command"].startswith("python -m appliance serve --host 127.0.0.1 --port ")
    assert "engines not ready" in server.log_path.read_text()
    with pytest.raises(SystemExit, match="exited with code"):
        server.check()


def test_missing_models_names_the_install_command(tmp_path: Path) -> None:
    (tmp_path / "manifest.toml").write_text((PROJECT_ROOT / "models" / "manifest.toml").read_text())
    settings = load_settings(env={}, models_dir=tmp_path)
    problems = missing_models(settings)
    assert len(problems) == 5 and all("models install" in p for p in problems)
    assert missing_models(load_settings(env={}, models_dir=tmp_path / "nowhere"))[0].startswith(
        "models manifest not found"
    )


# -- the scripts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["bench_load", "soak"])
def test_help_explains_the_script(script: str) -> None:
    r = subprocess.run([str(SCRIPTS / script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--max-seconds" in r.stdout and "--in-process" in r.stdout
    assert "python -m appliance serve" in r.stdout
    if script == "bench_load":
        assert "--levels" in r.stdout and "--over-capacity" in r.stdout and "p95" in r.stdout
    else:
        assert "--minutes" in r.stdout and "RSS" in r.stdout and "file descriptors" in r.stdout


def test_bench_load_rejects_bad_levels() -> None:
    r = subprocess.run([str(SCRIPTS / "bench_load"), "--levels", "0,x"], capture_output=True, text=True)
    assert r.returncode == 2 and "--levels" in r.stderr
    r = subprocess.run([str(SCRIPTS / "bench_load"), "--rounds", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--rounds" in r.stderr


@pytest.mark.slow
def test_bench_load_one_short_real_run(tmp_path: Path) -> None:
    if not SPEECH_DIR.is_dir():
        pytest.skip(f"{SPEECH_DIR} missing")
    if missing_models(load_settings(env={})):
        pytest.skip("default models not installed")
    out = tmp_path / "load.json"
    cmd = [
        str(SCRIPTS / "bench_load"), "--levels", "1", "--turns", "1", "--level-seconds", "1", "--rounds", "2",
        "--over-capacity", "1", "--extra-calls", "1", "--max-seconds", "300", "--out", str(out),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=380, cwd=PROJECT_ROOT)
    print(r.stdout)  # the run's log and table (pytest -s)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    # Two server processes (the busy check's, with 1 line, then the ramp's), each stopped by SIGTERM.
    assert data["server_mode"] == "process"
    assert [s["role"] for s in data["servers"]] == ["over-capacity", "ramp"]
    for server in data["servers"]:
        assert server["returncode"] in (0, -15) and not server["killed"] and server["peak_rss_mb"] > 100
        assert server["base_url"].startswith("http://127.0.0.1:")
        assert not Path(f"/proc/{server['pid']}").exists()  # stopped and reaped
    assert data["max_rss_mb"] > data["bench_max_rss_mb"]  # the figures are the server's, not the callers'
    assert "python -m appliance serve" in r.stdout
    assert data["baseline_seconds"] == 2.0  # level 1, every level's yardstick, runs twice as long
    # Two rounds of one call each, pooled into the level the verdict rests on.
    assert data["rounds"] == 2 and [lv["round"] for lv in data["round_levels"]] == [0, 1]
    assert data["speech"] == "deck"
    assert sorted(c["round"] for c in data["calls"]) == [0, 1]
    for one_round in data["round_levels"]:
        assert one_round["calls"] == 1 and one_round["answered"] == 1 and one_round["unanswered"] == 0
    (level,) = data["levels"]
    assert level["level"] == 1 and level["rounds"] == 2 and level["calls"] == 2 and level["turns"] == 2
    assert level["answered"] == 2 and level["unanswered"] == 0 and level["violations"] == 0
    assert 0 < level["voice_to_voice_p95_ms"] < 30_000
    assert 0 < level["cpu_pct"] <= 100 and level["peak_rss_mb"] > 100
    assert data["capacity"]["max_level"] == 1 and data["round_capacity"] == [1, 1]
    assert "capacity by round: 1, 1" in r.stdout
    busy = data["over_capacity"]
    assert busy["ok"], busy["problems"]
    assert busy["extras"][0]["answer_xml"].count(BUSY_MESSAGE) == 1
    assert "capacity:" in r.stdout and "over capacity" in r.stdout
