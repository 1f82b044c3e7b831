"""Shared pieces of the call benchmarks (``scripts/bench_load``, ``scripts/soak``; ``bench_call`` later).

- a real server in this process: :func:`start_server` (uvicorn on a loopback port, every engine),
  :func:`wait_ready`, :func:`create_agent`, :func:`fetch_records`, :func:`missing_models`;
- the recorded speech the callers say (:func:`speech_paths`) and a few-turn call (:func:`turn_script`);
- measuring the process: RSS, open FDs, threads and CPU time from ``/proc/self``
  (:func:`proc_sample`, :class:`CpuMeter`, :class:`PeakRss`);
- the arithmetic the scripts report, kept here so it is unit-tested: :func:`pct`,
  :func:`summarize_level`, :func:`capacity`, :func:`slope_per_hour`, :func:`soak_verdict`,
  :func:`busy_problems`.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from appliance.config import Settings, load_settings
from appliance.model_manifest import ROLES, Manifest, ModelError
from appliance.server import create_app
from appliance.simulator.caller import CallerOptions, Say, ScriptItem
from appliance.simulator.report import CallResult
from appliance.store.accounts import create_account_cli

SPEECH_DIR = Path("/usr/share/pocketsphinx/test/data")
SPEECH_HINT = "apt-get install -y pocketsphinx-testdata (scripts/setup --test does it)"
STAGES = ("end_of_turn_ms", "transcript_ms", "first_token_ms", "first_clause_ms", "first_audio_ms")

# The agent the load benchmarks call: a short welcome so the calls spend their time on turns.
WELCOME = "Card table line. Which cards do you hold?"
PROMPT = (
    "You are the dealer at a card table, on the phone. The caller names playing cards. Reply with one "
    "short sentence that names the same cards, for example: 'You have the ten of clubs.'"
)


# ------------------------------------------------------------------------------ percentiles


def pct(values: Iterable[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in 0..1), rounded to 0.1; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 1)


# ------------------------------------------------------------------------------ speech


def speech_paths(corpus: str | None = None) -> list[Path]:
    """Recorded human speech (``cards``: short phrases, ``librivox``: read sentences; None: both)."""
    corpora = ("cards", "librivox") if corpus is None else (corpus,)
    paths = [p for name in corpora for p in sorted((SPEECH_DIR / name).glob("*.wav"))]
    if not paths:
        raise SystemExit(f"no recorded speech under {SPEECH_DIR}: {SPEECH_HINT}")
    return paths


def turn_script(
    rng: random.Random,
    turns: int,
    *,
    paths: Sequence[Path] | None = None,
    pause_ms: tuple[int, int] = (300, 1500),
    max_wait_ms: int = 30_000,
) -> list[ScriptItem]:
    """``turns`` utterances of real speech, each said after the agent's reply (the welcome first)
    and a caller's pause drawn from ``pause_ms``; mostly short card phrases, now and then a sentence."""
    paths = list(paths or speech_paths())
    cards = [p for p in paths if p.parent.name == "cards"]
    sentences = [p for p in paths if p.parent.name != "cards"]
    script: list[ScriptItem] = []
    for _ in range(turns):
        pool = sentences if sentences and (not cards or rng.random() < 0.25) else cards
        path = rng.choice(pool)
        script.append(
            Say(
                path,
                pause_ms=rng.randint(*pause_ms),
                max_wait_ms=max_wait_ms,
                label=f"{path.parent.name}/{path.stem}",
            )
        )
    return script


def caller_options(call_url: str, seed: int, max_call_s: float) -> CallerOptions:
    return CallerOptions(
        answer_url=call_url, seed=seed, final_wait_ms=30_000, agent_settle_ms=1500, max_call_s=max_call_s
    )


# ------------------------------------------------------------------------------ server


def missing_models(settings: Settings) -> list[str]:
    """Why the default models cannot load (one line each, naming the install command); [] when ready."""
    try:
        manifest = Manifest.load(settings.models_dir)
    except ModelError as exc:
        return [str(exc)]
    problems = []
    for role in ROLES:
        model_id = getattr(settings.models, role)
        try:
            manifest.path(model_id, role, verify=False)
        except ModelError as exc:
            problems.append(str(exc))
    return problems


@dataclass
class BenchServer:
    """A real uvicorn server with the appliance in a thread of this process, on a loopback port."""

    server: uvicorn.Server
    thread: threading.Thread
    base_url: str
    settings: Settings
    app: FastAPI

    @property
    def manager(self) -> Any:
        """The live :class:`~appliance.call.manager.CallManager` (after start-up)."""
        return self.app.state.appliance.services["calls"]

    def live_calls(self) -> int:
        services = self.app.state.appliance.services
        return len(services["calls"].live) if "calls" in services else 0

    def set_max_calls(self, n: int) -> None:
        self.settings.limits.max_concurrent_calls = n

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout_s)


def start_server(data_dir: Path, **overrides: Any) -> BenchServer:
    """Start the appliance (engines load in the background; see :func:`wait_ready`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    settings = load_settings(data_dir=data_dir, public_base_url=base, port=port, **overrides)
    problems = missing_models(settings)
    if problems:
        sock.close()
        raise SystemExit("models missing:\n  " + "\n  ".join(problems))
    app = create_app(settings, load_engines=True)
    server = uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", lifespan="on", ws_max_size=1 << 20, ws_per_message_deflate=False
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("server failed to start")
        time.sleep(0.05)
    return BenchServer(server, thread, base, settings, app)


async def wait_ready(
    base: str, timeout_s: float = 900.0, progress: Callable[[float], None] | None = None
) -> float:
    """Until ``/ready`` is 200; returns the seconds it took. ``progress(elapsed)`` about every 10 s."""
    started = time.monotonic()
    last = started
    async with httpx.AsyncClient() as client:
        while True:
            r = await client.get(f"{base}/ready")
            if r.status_code == 200:
                return time.monotonic() - started
            if r.json().get("error"):
                raise SystemExit(f"engines failed: {r.json()['error']}")
            now = time.monotonic()
            if now - started > timeout_s:
                raise SystemExit(f"engines not ready after {timeout_s:.0f} s")
            if progress is not None and now - last >= 10:
                last = now
                progress(now - started)
            await asyncio.sleep(0.5)


async def poll_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    """Check ``predicate`` (state another thread owns, so no event to await) until true or timed out."""
    end = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        await asyncio.sleep(interval_s)


@dataclass
class BenchAgent:
    api: str  # .../v1/Account/{auth_id}
    auth: tuple[str, str]
    call_url: str  # the answer URL Plivo would fetch


async def create_agent(
    server: BenchServer, name: str = "bench", welcome: str = WELCOME, prompt: str = PROMPT
) -> BenchAgent:
    creds = await create_account_cli(server.settings, name)
    auth = (creds.auth_id, creds.auth_token)
    api = f"{server.base_url}/v1/Account/{creds.auth_id}"
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(
            f"{api}/Voiceagent/", auth=auth, json={"name": name, "welcome_message": welcome, "prompt": prompt}
        )
        r.raise_for_status()
        return BenchAgent(api, auth, r.json()["call_url"])


async def fetch_records(agent: BenchAgent, call_uuids: Iterable[str]) -> list[dict[str, Any]]:
    """The appliance's record of each call ({} where there is none)."""
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=60) as client:
        for uuid in call_uuids:
            r = await client.get(f"{agent.api}/Call/{uuid}/", auth=agent.auth)
            out.append(r.json() if r.status_code == 200 else {})
    return out


def record_stages(records: Iterable[dict[str, Any]]) -> dict[str, list[float]]:
    """Per stage, the server's ms after the caller's last voiced frame, over every answered turn."""
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for rec in records:
        for turn in rec.get("transcript", []):
            timings = turn.get("timings") or {}
            if turn.get("who") == "agent" and timings.get("first_audio_ms") is not None:
                for s in STAGES:
                    if timings.get(s) is not None:
                        stages[s].append(float(timings[s]))
    return stages


# ------------------------------------------------------------------------------ calls


def call_summary(result: CallResult) -> dict[str, Any]:
    """What the benchmarks keep of a call (never the agent's audio: the soak must not grow by it)."""
    turns = [t for t in result.turns if not t.barge_in]
    return {
        "call_uuid": result.call_uuid,
        "answer_status": result.answer_status,
        "closed_by": result.closed_by,
        "duration_s": round(result.duration_ms / 1000.0, 2),
        "voice_to_voice_ms": [t.voice_to_voice_ms for t in turns if t.voice_to_voice_ms is not None],
        "turns": [[t.label, t.voice_to_voice_ms] for t in turns],
        "unanswered": sum(1 for t in turns if t.voice_to_voice_ms is None),
        "agent_segments": len(result.segments),
        "violations": [f"{v.kind}: {v.reason}" for v in result.violations[:5]],
        "violation_count": len(result.violations),
        "late_ticks": result.late_ticks,
    }


def busy_problems(result: CallResult, busy_message: str) -> list[str]:
    """Why a call refused for capacity was not refused cleanly: it must get 200 with spoken busy XML
    (``<Speak>`` the message, then ``<Hangup/>``), no ``<Stream>``, and no protocol violation."""
    problems = []
    xml = result.answer_xml
    if result.answer_status != 200:
        problems.append(f"answer URL returned HTTP {result.answer_status}")
    if busy_message not in xml or "<Speak" not in xml:
        problems.append(f"no spoken busy message in {xml[:200]!r}")
    if "<Hangup" not in xml:
        problems.append("no <Hangup/> after the busy message")
    if "<Stream" in xml or result.stream_url:
        problems.append("a stream was opened although every line was taken")
    problems.extend(f"violation {v.kind}: {v.reason}" for v in result.violations)
    return problems


# ------------------------------------------------------------------------------ process


def _status_fields() -> dict[str, str]:
    out: dict[str, str] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _kb_to_mb(text: str) -> float:
    return round(int(text.split()[0]) / 1024.0, 1)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + system) of one thread of this process, from /proc/self/task/<tid>/stat."""
    try:
        with open(f"/proc/self/task/{native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After "pid (comm)": state is field 3, utime 14 and stime 15 (1-based) -> indexes 11, 12 here.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_sample() -> dict[str, float]:
    """This process now: RSS and its peak (MB), open file descriptors, threads, CPU seconds."""
    status = _status_fields()
    return {
        "rss_mb": _kb_to_mb(status.get("VmRSS", "0 kB")),
        "hwm_mb": _kb_to_mb(status.get("VmHWM", "0 kB")),
        "fds": float(len(os.listdir("/proc/self/fd"))),
        "threads": float(int(status.get("Threads", "0"))),
        "cpu_s": round(process_cpu_s(), 2),
    }


def max_rss_mb() -> float:
    """Peak RSS of the process over its whole life."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


class CpuMeter:
    """CPU used by the process (and by one thread of it) between start() and stop(), as % of the
    machine's cores: 100% = every core busy."""

    def __init__(self, thread_id: int | None = None) -> None:
        self.thread_id = thread_id if thread_id is not None else threading.get_native_id()
        self.cores = cpu_cores()
        self._t0 = self._p0 = self._c0 = 0.0

    def start(self) -> None:
        self._t0, self._p0, self._c0 = time.monotonic(), process_cpu_s(), thread_cpu_s(self.thread_id)

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self._t0, 1e-6)
        process = process_cpu_s() - self._p0
        thread = thread_cpu_s(self.thread_id) - self._c0
        return {
            "wall_s": round(wall, 1),
            "cpu_pct": round(100.0 * process / wall / self.cores, 1),
            "thread_cpu_pct": round(100.0 * thread / wall / self.cores, 1),
        }


class PeakRss:
    """Samples VmRSS in a background thread; ``reset()`` starts a new window, ``peak_mb`` is its max."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def reset(self) -> None:
        self.peak_mb = _kb_to_mb(_status_fields().get("VmRSS", "0 kB"))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, _kb_to_mb(_status_fields().get("VmRSS", "0 kB")))


# ------------------------------------------------------------------------------ summaries


def summarize_level(
    level: int,
    calls: Sequence[dict[str, Any]],
    *,
    cpu: dict[str, float] | None = None,
    peak_rss_mb: float | None = None,
) -> dict[str, Any]:
    """One concurrency level from its :func:`call_summary` dicts."""
    v2v = [float(v) for c in calls for v in c["voice_to_voice_ms"]]
    return {
        "level": level,
        "calls": len(calls),
        "turns": len(v2v) + sum(int(c["unanswered"]) for c in calls),
        "answered": len(v2v),
        "unanswered": sum(int(c["unanswered"]) for c in calls),
        "voice_to_voice_p50_ms": pct(v2v, 0.5),
        "voice_to_voice_p95_ms": pct(v2v, 0.95),
        "voice_to_voice_max_ms": max(v2v) if v2v else None,
        "violations": sum(int(c["violation_count"]) for c in calls),
        "cut_calls": sum(1 for c in calls if c["closed_by"] not in ("caller", "server")),
        "late_ticks": sum(int(c["late_ticks"]) for c in calls),
        "cpu_pct": (cpu or {}).get("cpu_pct"),
        "caller_cpu_pct": (cpu or {}).get("thread_cpu_pct"),
        "wall_s": (cpu or {}).get("wall_s"),
        "peak_rss_mb": peak_rss_mb,
    }


def capacity(levels: Sequence[dict[str, Any]], factor: float = 1.5, target: int = 4) -> dict[str, Any]:
    """The highest concurrency whose p95 voice-to-voice stays within ``factor`` x the baseline p95
    (the single-call level, else the lowest level with answered turns), with every turn answered, and
    every lower level passing too: a level above a failed one does not count."""
    ordered = sorted(levels, key=_level)
    base = next((lv for lv in ordered if lv.get("voice_to_voice_p95_ms") is not None), None)
    result: dict[str, Any] = {
        "baseline_level": None, "baseline_p95_ms": None, "factor": factor, "limit_ms": None,
        "max_level": None, "target": target, "target_met": False, "per_level": {},
    }  # fmt: skip
    if base is None:
        return result
    limit = round(float(base["voice_to_voice_p95_ms"]) * factor, 1)
    best: int | None = None
    per_level: dict[int, bool] = {}
    failed = False
    for lv in ordered:
        if _level(lv) < _level(base):
            continue
        p95 = lv.get("voice_to_voice_p95_ms")
        ok = p95 is not None and float(p95) <= limit and int(lv.get("unanswered", 0)) == 0
        per_level[_level(lv)] = ok
        failed = failed or not ok
        if not failed:
            best = _level(lv)
    result.update(
        baseline_level=_level(base), baseline_p95_ms=base["voice_to_voice_p95_ms"], limit_ms=limit,
        max_level=best, target_met=best is not None and best >= target, per_level=per_level,
    )  # fmt: skip
    return result


def _level(lv: dict[str, Any]) -> int:
    return int(lv["level"])


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour; None for fewer than 2 distinct times."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx <= 0:
        return None
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return round(sxy / sxx * 3600.0, 2)


@dataclass
class SoakLimits:
    rss_mb_per_hour: float = 20.0  # RSS slope after warm-up above this = growing
    rss_idle_delta_mb: float = 16.0  # idle RSS at the end vs idle after warm-up
    fds_per_hour: float = 20.0
    fd_idle_delta: int = 2
    thread_idle_delta: int = 2
    min_span_s: float = 600.0  # a shorter post-warm-up window gives no slope verdict


def soak_verdict(
    samples: Sequence[dict[str, float]],
    warmup_end_s: float,
    baseline: dict[str, float] | None,
    final: dict[str, float] | None,
    limits: SoakLimits | None = None,
) -> dict[str, Any]:
    """Is the server's memory, FD and thread use flat after warm-up?

    ``samples`` carry ``t_s`` (seconds since the soak started), ``rss_mb``, ``fds``, ``threads``;
    ``baseline`` and ``final`` are samples taken with no call live, right after the warm-up and at
    the end. Slopes are fitted to the samples after ``warmup_end_s``. Verdict: ``growing`` if an idle
    delta exceeds its tolerance or (on a long enough window) a slope exceeds its limit; ``flat`` if
    neither, on a window of at least ``min_span_s``; else ``inconclusive``.
    """
    lim = limits or SoakLimits()
    after = [s for s in samples if s["t_s"] >= warmup_end_s]
    span = (after[-1]["t_s"] - after[0]["t_s"]) if len(after) >= 2 else 0.0
    rss_slope = slope_per_hour([(s["t_s"], s["rss_mb"]) for s in after])
    fd_slope = slope_per_hour([(s["t_s"], s["fds"]) for s in after])
    thread_slope = slope_per_hour([(s["t_s"], s["threads"]) for s in after])

    def delta(key: str) -> float | None:
        if baseline is None or final is None:
            return None
        return round(final[key] - baseline[key], 1)

    rss_d, fd_d, thr_d = delta("rss_mb"), delta("fds"), delta("threads")
    conclusive = span >= lim.min_span_s
    reasons: list[str] = []
    if rss_d is not None and rss_d > lim.rss_idle_delta_mb:
        reasons.append(f"idle RSS grew {rss_d:+.1f} MB (tolerance {lim.rss_idle_delta_mb:g})")
    if fd_d is not None and fd_d > lim.fd_idle_delta:
        reasons.append(f"idle FDs grew {fd_d:+.0f} (tolerance {lim.fd_idle_delta})")
    if thr_d is not None and thr_d > lim.thread_idle_delta:
        reasons.append(f"idle threads grew {thr_d:+.0f} (tolerance {lim.thread_idle_delta})")
    if conclusive and rss_slope is not None and rss_slope > lim.rss_mb_per_hour:
        reasons.append(f"RSS slope {rss_slope:+.1f} MB/h (limit {lim.rss_mb_per_hour:g})")
    if conclusive and fd_slope is not None and fd_slope > lim.fds_per_hour:
        reasons.append(f"FD slope {fd_slope:+.1f}/h (limit {lim.fds_per_hour:g})")
    if reasons:
        verdict = "growing"
    elif conclusive:
        verdict = "flat"
    else:
        verdict = "inconclusive"
        reasons.append(
            f"post-warm-up window {span / 60:.1f} min < {lim.min_span_s / 60:.0f} min: slopes not judged"
        )
    return {
        "verdict": verdict,
        "reasons": reasons,
        "warmup_end_s": round(warmup_end_s, 1),
        "window_s": round(span, 1),
        "samples_after_warmup": len(after),
        "rss_mb_per_hour": rss_slope,
        "fds_per_hour": fd_slope,
        "threads_per_hour": thread_slope,
        "idle_rss_delta_mb": rss_d,
        "idle_fd_delta": fd_d,
        "idle_thread_delta": thr_d,
        "limits": asdict(lim),
    }
