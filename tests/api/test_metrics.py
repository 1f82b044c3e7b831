"""``GET /metrics``: Prometheus text that parses, counters fed by call events and the call manager,
engine queue depths read at scrape time, and the access rule (bearer token, or loopback only)."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fastapi import FastAPI

from appliance.api.errors import ApiError
from appliance.api.metrics_route import check_access, is_loopback
from appliance.call.records import (
    CallFinished,
    CallInfo,
    CallStarted,
    FunctionCallRecord,
    MemoryRecorder,
    TeeRecorder,
    TurnRecord,
)
from appliance.engines.tts import PhraseCache
from appliance.metrics import ApplianceMetrics, Registry
from appliance.server import create_app
from appliance.store.accounts import get_account
from appliance.store.agents import get_agent
from appliance.telephony.stream_token import StreamClaims
from tests.call.fakes import EnergyVad, ScriptedAsr, ScriptedTts, make_harness, tone
from tests.conftest import Credentials, LiveServer, make_settings

TOKEN = "metrics-token-0123456789"
NOW = datetime(2025, 1, 1, tzinfo=UTC)

# -- a small parser for the text format (0.0.4) -------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
_SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


@dataclass
class Family:
    help: str = ""
    type: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, name: str | None = None, **labels: str) -> float:
        hits = [v for n, ls, v in self.samples if (name is None or n == name) and ls == labels]
        assert len(hits) == 1, (name, labels, self.samples)
        return hits[0]


def _parse_value(text: str) -> float:
    return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(text) or float(text)


def parse(text: str) -> dict[str, Family]:
    """Every line is HELP, TYPE or a sample of the family declared just above it; else fail."""
    assert text.endswith("\n")
    families: dict[str, Family] = {}
    current: str | None = None
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"family {name} declared twice"
            families[name] = Family(help=help_text)
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and kind in _SUFFIXES, line
            families[name].type = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, raw_labels, raw_value = match.groups()
            assert current is not None and families[current].type
            family = families[current]
            assert name in {current + s for s in _SUFFIXES[family.type]}, (name, current)
            labels: dict[str, str] = {}
            if raw_labels:
                consumed = "".join(m.group(0) for m in _LABEL.finditer(raw_labels))
                assert consumed == raw_labels, f"bad labels in {line!r}"
                labels = {k: v for k, v in _LABEL.findall(raw_labels)}
            family.samples.append((name, labels, _parse_value(raw_value)))
    for name, family in families.items():
        if family.type == "histogram":
            _check_histogram(name, family)
    return families


def _check_histogram(name: str, family: Family) -> None:
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for sample, labels, value in family.samples:
        if sample.endswith("_bucket"):
            labels = dict(labels)
            le = labels.pop("le")
            series.setdefault(tuple(sorted(labels.items())), []).append((_parse_value(le), value))
    for key, buckets in series.items():
        bounds = [b for b, _ in buckets]
        counts = [c for _, c in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, (name, bounds)
        assert counts == sorted(counts), f"{name} buckets are not cumulative: {counts}"
        assert family.value(f"{name}_count", **dict(key)) == counts[-1]


EXPECTED = {
    "appliance_calls_active": "gauge",
    "appliance_calls_capacity": "gauge",
    "appliance_calls_started_total": "counter",
    "appliance_calls_finished_total": "counter",
    "appliance_calls_refused_total": "counter",
    "appliance_agent_turns_total": "counter",
    "appliance_barge_ins_total": "counter",
    "appliance_function_calls_total": "counter",
    "appliance_turn_stage_seconds": "histogram",
    "appliance_voice_to_voice_seconds": "histogram",
    "appliance_engines_ready": "gauge",
    "appliance_engine_queue_depth": "gauge",
    "appliance_engine_busy": "gauge",
    "appliance_tts_phrase_cache_lookups": "gauge",
    "appliance_engine_abandoned_background_work": "gauge",
    "appliance_process_resident_memory_bytes": "gauge",
    "appliance_process_open_fds": "gauge",
    "appliance_uptime_seconds": "gauge",
}


async def scrape(client: httpx.AsyncClient, **kwargs: Any) -> dict[str, Family]:
    r = await client.get("/metrics", **kwargs)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(r.text)


# -- the exposition ------------------------------------------------------------------------------------


async def test_metrics_parse_and_name_every_family_with_help_and_type(client: httpx.AsyncClient) -> None:
    families = await scrape(client)
    for name, kind in EXPECTED.items():
        assert name in families, name
        assert families[name].type == kind and families[name].help, name
    assert families["appliance_calls_active"].value() == 0
    assert families["appliance_calls_capacity"].value() == 8
    assert families["appliance_calls_started_total"].value() == 0
    assert families["appliance_engines_ready"].value() == 0  # engines are not loaded here
    assert families["appliance_process_resident_memory_bytes"].value() > 10_000_000
    assert families["appliance_process_open_fds"].value() >= 3
    assert families["appliance_uptime_seconds"].value() > 0
    assert families["appliance_voice_to_voice_seconds"].value("appliance_voice_to_voice_seconds_count") == 0


def test_rendering_escapes_label_values_and_help() -> None:
    registry = Registry()
    counter = registry.counter("x_total", "help with \\ and\nnewline", ["what"])
    counter.inc(2, what='a "quoted"\\ value\nhere')
    gauge = registry.gauge("y", "a gauge")
    gauge.set(0.25)
    families = parse(registry.render())
    assert families["x_total"].help == "help with \\\\ and\\nnewline"
    assert families["x_total"].samples == [("x_total", {"what": 'a \\"quoted\\"\\\\ value\\nhere'}, 2.0)]
    assert families["y"].value() == 0.25
    with pytest.raises(ValueError):
        counter.inc(1)  # its label is missing
    with pytest.raises(ValueError):
        counter.inc(-1, what="a")


# -- counters fed by calls ------------------------------------------------------------------------------


def _turn(
    seq: int, role: str, *, interrupted: bool = False, timings: dict[str, Any] | None = None
) -> TurnRecord:
    return TurnRecord(
        seq,
        role,
        "text",
        NOW,
        NOW,
        interrupted=interrupted,
        timings=timings or {},  # type: ignore[arg-type]
    )


async def test_call_events_move_counters_and_timing_histograms(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    metrics: ApplianceMetrics = app.state.appliance.metrics
    timings = {
        "end_of_turn_ms": 610.0, "transcript_ms": 700.5, "first_token_ms": 900.0,
        "first_clause_ms": 1100.0, "first_audio_ms": 1250.0, "asr_ms": 85.0,
    }  # fmt: skip
    # One call: an answered turn, a barge-in, a function call, and a reply cut by the hang-up.
    first = TeeRecorder(MemoryRecorder(), metrics.observe_call())
    for event in (
        CallStarted(CallInfo("c1", "acct", "agent"), NOW),
        _turn(1, "agent"),  # the welcome: no timings
        _turn(2, "caller"),
        _turn(3, "agent", timings=timings),
        _turn(4, "caller"),
        _turn(5, "agent", interrupted=True, timings=timings | {"first_audio_ms": 3000.0}),
        _turn(6, "caller"),
        FunctionCallRecord(6, "lookup", {}, {"ok": 1}, True, None, NOW),
        FunctionCallRecord(6, "lookup", {}, None, False, "timeout", NOW),
        _turn(7, "agent", interrupted=True, timings={"first_audio_ms": None}),
        CallFinished(NOW, "completed", "caller_hangup", speculations_committed=3, speculations_dropped=1),
    ):
        first.submit(event)
    second = metrics.observe_call()
    second.submit(CallStarted(CallInfo("c2", "acct", "agent"), NOW))
    second.submit(CallFinished(NOW, "failed", "internal_error"))

    families = await scrape(client)
    assert families["appliance_calls_started_total"].value() == 2
    finished = families["appliance_calls_finished_total"]
    assert finished.value(status="completed") == 1 and finished.value(status="failed") == 1
    assert families["appliance_agent_turns_total"].value() == 4
    assert families["appliance_barge_ins_total"].value() == 1  # turn 7 was cut by the hang-up
    calls = families["appliance_function_calls_total"]
    assert calls.value(outcome="ok") == 1 and calls.value(outcome="error") == 1
    speculative = families["appliance_speculative_replies_total"]
    assert speculative.value(outcome="committed") == 3 and speculative.value(outcome="dropped") == 1
    v2v = families["appliance_voice_to_voice_seconds"]
    assert v2v.value("appliance_voice_to_voice_seconds_count") == 2
    assert v2v.value("appliance_voice_to_voice_seconds_sum") == pytest.approx(4.25)
    assert v2v.value("appliance_voice_to_voice_seconds_bucket", le="1.5") == 1
    assert v2v.value("appliance_voice_to_voice_seconds_bucket", le="3") == 2
    assert v2v.value("appliance_voice_to_voice_seconds_bucket", le="0.05") == 0
    stages = families["appliance_turn_stage_seconds"]
    for stage in ("end_of_turn", "transcript", "first_token", "first_clause", "first_audio", "asr"):
        assert stages.value("appliance_turn_stage_seconds_count", stage=stage) == 2, stage
    assert stages.value("appliance_turn_stage_seconds_sum", stage="end_of_turn") == pytest.approx(1.22)
    assert stages.value("appliance_turn_stage_seconds_bucket", stage="asr", le="0.1") == 2


async def test_a_real_session_turn_lands_in_the_voice_to_voice_histogram() -> None:
    """The timings a scripted session records (reply.TurnTimings.as_ms) map onto the histograms."""
    h = make_harness(asr_script=lambda s: "what are your hours")
    metrics = ApplianceMetrics()
    await h.start()
    await h.feed(tone(800))
    await h.silence(3000)
    await h.stop()
    observer = metrics.observe_call()
    for event in h.recorder.events:
        observer.submit(event)
    (agent,) = [t for t in h.recorder.turns if t.role == "agent"]
    assert metrics.calls_started.value() == 1 and metrics.calls_finished.value(status="completed") == 1
    assert metrics.voice_to_voice.count() == 1
    for key in ("end_of_turn_ms", "transcript_ms", "first_token_ms", "first_clause_ms", "first_audio_ms"):
        assert metrics.stage_seconds.count(stage=key.removesuffix("_ms")) == 1, key
    families = parse(metrics.render())
    assert families["appliance_voice_to_voice_seconds"].value(
        "appliance_voice_to_voice_seconds_sum"
    ) == pytest.approx(agent.timings["first_audio_ms"] / 1000.0)


async def test_the_call_manager_counts_calls_refused_over_capacity(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    manager = app.state.appliance.services["calls"]
    capacity = app.state.appliance.settings.limits.max_concurrent_calls
    assert all(manager.reserve(f"call-{i}") for i in range(capacity))
    assert manager.reserve("call-0")  # the same call again holds its line
    assert not manager.reserve("one-too-many")
    assert not manager.reserve("and-another")
    families = await scrape(client)
    assert families["appliance_calls_refused_total"].value() == 2


class NullSink:
    async def play(self, mulaw: bytes) -> None:
        return None

    async def checkpoint(self, name: str) -> None:
        return None

    async def clear(self) -> None:
        return None


async def test_a_call_through_the_manager_is_counted_live_then_finished(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_call hands the session a recorder that feeds the metrics beside the record writer."""
    state = app.state.appliance
    fakes = {"vad": EnergyVad(), "asr": ScriptedAsr(lambda s: ""), "tts": ScriptedTts(), "llm": object()}

    async def fake_get(role: str, model_id: str | None = None) -> Any:
        return fakes[role]

    monkeypatch.setattr(state.engines, "get", fake_get)
    r = await client.post(f"{account.base}/Voiceagent/", json={"name": "Quiet"}, auth=account.auth)
    assert r.status_code == 201, r.text
    manager = state.services["calls"]
    async with state.services["db"].sessions() as db:
        owner = await get_account(db, account.auth_id)
        assert owner is not None
        agent = await get_agent(db, owner.id, r.json()["id"])
    claims = StreamClaims("call-metrics-1", agent.id, owner.id, "+1", "+2", "inbound")
    live = await manager.open_call(claims, "stream-1", NullSink(), owner, agent)
    families = await scrape(client)
    assert families["appliance_calls_active"].value() == 1
    assert families["appliance_calls_started_total"].value() == 0  # the session has not run yet
    runner = asyncio.create_task(manager.run(live))
    live.task = runner
    live.session.hangup("caller_hangup")
    await asyncio.wait_for(runner, 10)
    families = await scrape(client)
    assert families["appliance_calls_active"].value() == 0
    assert families["appliance_calls_started_total"].value() == 1
    assert families["appliance_calls_finished_total"].value(status="completed") == 1
    detail = await client.get(f"{account.base}/Call/call-metrics-1/", auth=account.auth)
    assert detail.status_code == 200 and detail.json()["status"] == "completed"  # the writer still writes


# -- engines, read at scrape time -----------------------------------------------------------------------


@dataclass
class FakeEngine:
    queue_depth: int = 0
    busy: bool | None = None


async def test_engine_queue_depths_are_read_at_scrape_time(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = app.state.appliance
    asr = FakeEngine(queue_depth=3)
    llm = FakeEngine(queue_depth=1, busy=True)
    loaded: dict[tuple[str, str], Any] = {
        ("asr", state.settings.models.asr): asr,
        ("llm", state.settings.models.llm): llm,
        ("tts", state.settings.models.tts): object(),  # no queue_depth: skipped
    }
    monkeypatch.setattr(state.engines, "peek", lambda role, model_id=None: loaded.get((role, model_id)))
    families = await scrape(client)
    depth = families["appliance_engine_queue_depth"]
    assert depth.value(role="asr", model=state.settings.models.asr) == 3
    assert depth.value(role="llm", model=state.settings.models.llm) == 1
    assert {s[1]["role"] for s in depth.samples} == {"asr", "llm"}
    busy = families["appliance_engine_busy"]
    assert busy.samples == [
        ("appliance_engine_busy", {"role": "llm", "model": state.settings.models.llm}, 1.0)
    ]
    asr.queue_depth, llm.busy = 0, False
    families = await scrape(client)
    assert families["appliance_engine_queue_depth"].value(role="asr", model=state.settings.models.asr) == 0
    assert families["appliance_engine_busy"].value(role="llm", model=state.settings.models.llm) == 0


async def test_phrase_cache_lookups_are_read_at_scrape_time(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = app.state.appliance
    tts_id = state.settings.models.tts
    voice = SimpleNamespace(phrases=PhraseCache(max_bytes=1000))
    loaded: dict[tuple[str, str], Any] = {("tts", tts_id): voice}
    monkeypatch.setattr(state.engines, "peek", lambda role, model_id=None: loaded.get((role, model_id)))
    key = ("You have", 1.0)
    voice.phrases.get(key)
    voice.phrases.put(key, [np.zeros(10, dtype=np.int16)])
    voice.phrases.get(key)
    voice.phrases.get(key)
    lookups = (await scrape(client))["appliance_tts_phrase_cache_lookups"]
    assert lookups.value(model=tts_id, outcome="hit") == 2
    assert lookups.value(model=tts_id, outcome="miss") == 1


async def test_abandoned_background_work_is_read_at_scrape_time(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = app.state.appliance
    llm_id, tts_id, asr_id = state.settings.models.llm, state.settings.models.tts, state.settings.models.asr
    loaded: dict[tuple[str, str], Any] = {
        ("llm", llm_id): SimpleNamespace(abandoned=3),
        ("tts", tts_id): SimpleNamespace(abandoned=5),
        ("asr", asr_id): SimpleNamespace(),  # abandons nothing: left out
    }
    monkeypatch.setattr(state.engines, "peek", lambda role, model_id=None: loaded.get((role, model_id)))
    abandoned = (await scrape(client))["appliance_engine_abandoned_background_work"]
    assert abandoned.value(role="llm", model=llm_id) == 3
    assert abandoned.value(role="tts", model=tts_id) == 5
    assert len(abandoned.samples) == 2


# -- access -------------------------------------------------------------------------------------------


def _client_for(app: FastAPI, host: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest_asyncio.fixture
async def token_app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    application = create_app(make_settings(tmp_path / "data", metrics_token=TOKEN), load_engines=False)
    async with application.router.lifespan_context(application):
        yield application


def _assert_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "api_id"} and body["error"]
    assert TOKEN not in r.text
    return str(body["error"])


async def test_with_a_token_configured_a_bearer_token_is_required(
    token_app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    for host in ("127.0.0.1", "203.0.113.7"):  # loopback gets no pass when a token is set
        async with _client_for(token_app, host) as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                            {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}):  # fmt: skip
                r = await c.get("/metrics", headers=headers)
                assert "Bearer <metrics_token>" in _assert_error(r, 401)
                assert r.headers["www-authenticate"].startswith("Bearer")
            families = await scrape(c, headers={"Authorization": f"Bearer {TOKEN}"})
            assert "appliance_calls_active" in families
            await scrape(c, headers={"Authorization": f"bearer  {TOKEN} "})
    assert TOKEN not in caplog.text


async def test_without_a_token_only_loopback_clients_are_served(app: FastAPI) -> None:
    async with _client_for(app, "203.0.113.7") as c:
        message = _assert_error(await c.get("/metrics"), 403)
        assert "loopback" in message and "APPLIANCE_METRICS_TOKEN" in message
    for host in ("127.0.0.1", "::1"):
        async with _client_for(app, host) as c:
            await scrape(c)


def test_the_access_decision() -> None:
    check_access("", None, "127.0.0.1")
    check_access("", None, "127.8.9.10")
    check_access("", None, "::1")
    check_access("", None, "::ffff:127.0.0.1")
    check_access("t", "Bearer t", "198.51.100.1")
    for token, header, host, status in (
        ("", None, "10.0.0.1", 403),
        ("", None, "::ffff:10.0.0.1", 403),
        ("", None, "testclient", 403),  # a name, not an address
        ("", None, None, 403),
        ("", "Bearer anything", "10.0.0.1", 403),
        ("t", None, "127.0.0.1", 401),
        ("t", "Bearer u", "127.0.0.1", 401),
        ("t", "Token t", "127.0.0.1", 401),
    ):
        with pytest.raises(ApiError) as caught:
            check_access(token, header, host)
        assert caught.value.status_code == status, (token, header, host)
    assert not is_loopback("localhost") and is_loopback("127.0.0.1")


async def test_a_real_server_serves_metrics_to_a_loopback_client(live_server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live_server.base_url) as c:
        families = await scrape(c)
        assert set(EXPECTED) <= set(families)
        doc = (await c.get("/openapi.json")).json()
    responses = doc["paths"]["/metrics"]["get"]["responses"]
    assert {"200", "401", "403"} <= set(responses)
