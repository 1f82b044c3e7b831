"""Shared pieces of the call benchmarks (``scripts/bench_load``, ``scripts/soak``, ``scripts/bench_call``).

- a real server with every engine on a loopback port: :class:`ServerProcess` (``python -m appliance
  serve`` in its own process, the default: the callers do not share its GIL) or :func:`start_server`
  (a thread of this process, ``--in-process``), both through :func:`launch_server`;
  :func:`wait_ready`, :func:`create_agent`, :func:`fetch_records`, :func:`missing_models`;
- the recorded speech the callers say (:func:`speech_paths`), dealt in a fixed mix
  (:class:`SpeechDeck`), and a few-turn call (:func:`turn_script`);
- measuring a process: RSS, open FDs, threads and CPU time from ``/proc/<pid>`` (the server's
  process) or ``/proc/self`` (:func:`proc_sample`, :class:`CpuMeter`, :class:`PeakRss`);
- the arithmetic the scripts report, kept here so it is unit-tested: :func:`pct`,
  :func:`summarize_level`, :func:`capacity`, :func:`slope_per_hour`, :func:`soak_verdict`,
  :func:`busy_problems`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import random
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeAlias

import httpx
import uvicorn
from fastapi import FastAPI

from appliance.config import PROJECT_ROOT, Settings, load_settings
from appliance.model_manifest import ROLES, Manifest, ModelError
from appliance.server import create_app
from appliance.simulator.caller import CallerOptions, Say, ScriptItem
from appliance.simulator.report import CallResult, Turn
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


SENTENCE_SHARE = 0.25  # of the turns a caller says: read sentences; the rest short card phrases


def _cards_and_sentences(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    cards = [p for p in paths if p.parent.name == "cards"]
    return cards, [p for p in paths if p.parent.name != "cards"]


class SpeechDeck:
    """Recordings dealt like cards from a shuffled deck, reshuffled when it runs out: read sentences
    make up ``sentence_share`` of the deck and card phrases the rest, each recording as often as
    the others of its kind.

    Drawn independently at random, the recordings of one benchmark level are not those of another:
    one read sentence ("... than he was.") waited 1.1 s for the end of its turn (its last word was
    taken for more to come); at 5% of the turns it sat right at the p95, and a level that drew it
    a little more or less often than another moved its p95 by half a second, with no change in
    load. Dealt from one deck per level, every level says every recording in the same proportions
    (to within one deck), so its latencies differ from another level's by the load alone."""

    def __init__(self, paths: Sequence[Path], rng: random.Random, sentence_share: float = SENTENCE_SHARE):
        cards, sentences = _cards_and_sentences(paths)
        if not cards or not sentences:
            self._pattern = list(cards or sentences)
        else:
            # Copies of each card c and each sentence s with s*S / (c*C + s*S) = the share.
            share = Fraction(sentence_share).limit_denominator(20)
            card_copies = (share.denominator - share.numerator) * len(sentences)
            sentence_copies = share.numerator * len(cards)
            unit = math.gcd(card_copies, sentence_copies)
            self._pattern = cards * (card_copies // unit) + sentences * (sentence_copies // unit)
        if not self._pattern:
            raise ValueError("no recordings to deal")
        self._rng = rng
        self._deck: list[Path] = []

    @property
    def size(self) -> int:
        return len(self._pattern)

    def deal(self) -> Path:
        if not self._deck:
            self._deck = list(self._pattern)
            self._rng.shuffle(self._deck)
        return self._deck.pop()


def turn_script(
    rng: random.Random,
    turns: int,
    *,
    paths: Sequence[Path] | None = None,
    deck: SpeechDeck | None = None,
    pause_ms: tuple[int, int] = (300, 1500),
    max_wait_ms: int = 30_000,
) -> list[ScriptItem]:
    """``turns`` utterances of real speech, each said after the agent's reply (the welcome first)
    and a caller's pause drawn from ``pause_ms``; mostly short card phrases, now and then a sentence:
    dealt from ``deck``, else drawn from ``paths`` at random (a sentence for ``SENTENCE_SHARE`` of
    the turns)."""
    cards, sentences = _cards_and_sentences(list(paths or speech_paths()))
    script: list[ScriptItem] = []
    for _ in range(turns):
        if deck is not None:
            path = deck.deal()
        else:
            pool = sentences if sentences and (not cards or rng.random() < SENTENCE_SHARE) else cards
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


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _scrape_live_calls(base_url: str, settings: Settings) -> int:
    """``appliance_calls_active`` from the server's ``/metrics`` (loopback, or its bearer token)."""
    token = settings.metrics_token.get_secret_value()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10) as client:  # a fresh connection: no idle socket kept open
        r = await client.get(f"{base_url}/metrics", headers=headers)
    r.raise_for_status()
    for line in r.text.splitlines():
        if line.startswith("appliance_calls_active"):
            return int(float(line.split()[-1]))
    raise RuntimeError("the server's /metrics has no appliance_calls_active")


@dataclass
class BenchServer:
    """A real uvicorn server with the appliance in a thread of this process, on a loopback port
    (``--in-process``: the callers share its interpreter, GIL and RSS)."""

    server: uvicorn.Server
    thread: threading.Thread
    base_url: str
    settings: Settings
    app: FastAPI

    mode = "in-process"

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def manager(self) -> Any:
        """The live :class:`~appliance.call.manager.CallManager` (after start-up)."""
        return self.app.state.appliance.services["calls"]

    @property
    def max_calls(self) -> int:
        return self.settings.limits.max_concurrent_calls

    def check(self) -> None:
        """Raise SystemExit if the server has stopped."""
        if not self.thread.is_alive():
            raise SystemExit("the in-process server stopped")

    async def live_calls(self) -> int:
        services = self.app.state.appliance.services
        return len(services["calls"].live) if "calls" in services else 0

    def set_max_calls(self, n: int) -> None:
        self.settings.limits.max_concurrent_calls = n

    def sample(self) -> dict[str, float]:
        return proc_sample()

    def peak_rss_mb(self) -> float:
        return max_rss_mb()

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "pid": self.pid, "base_url": self.base_url}

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout_s)


def start_server(
    data_dir: Path, *, env: Mapping[str, str] | None = None, max_calls: int | None = None, **overrides: Any
) -> BenchServer:
    """Start the appliance in this process (engines load in the background; see :func:`wait_ready`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    settings = load_settings(env=env, data_dir=data_dir, public_base_url=base, port=port, **overrides)
    problems = missing_models(settings)
    if problems:
        sock.close()
        raise SystemExit("models missing:\n  " + "\n  ".join(problems))
    if max_calls is not None:
        settings.limits.max_concurrent_calls = max_calls
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


# Runs ``python -m appliance serve ...`` after asking the kernel to SIGTERM it when the benchmark
# dies (even by SIGKILL), so a 2 GB server never outlives the run; a parent already gone: exit.
_LAUNCHER = (
    "import ctypes, os, runpy, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv.pop(1)):\n"
    "    sys.exit(1)\n"
    "runpy.run_module('appliance', run_name='__main__', alter_sys=True)\n"
)


class ServerProcess:
    """``python -m appliance serve`` in its own process on a loopback port, as in production: the
    simulated callers (Plivo's side) then do not share the server's interpreter, GIL, event loop or
    RSS. Its RSS, FDs, threads and CPU are read from ``/proc/<pid>`` (:meth:`sample`).

    ``env`` is the server's environment (default: this process's); ``max_calls`` sets
    ``limits.max_concurrent_calls`` (fixed for the process's life: restart to change it). The
    server's output is appended to ``log_path`` (default ``data_dir/server.log``). :meth:`stop` (SIGTERM,
    then SIGKILL after ``timeout_s``) must run on every way out; the process also gets SIGTERM from
    the kernel if this one dies first.
    """

    mode = "process"

    def __init__(
        self,
        data_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        max_calls: int | None = None,
        log_path: Path | None = None,
        require_models: bool = True,
    ) -> None:
        port = _free_loopback_port()
        self.base_url = f"http://127.0.0.1:{port}"
        child_env = dict(os.environ if env is None else env)
        child_env.update(
            APPLIANCE_DATA_DIR=str(data_dir), APPLIANCE_PUBLIC_BASE_URL=self.base_url,
            APPLIANCE_HOST="127.0.0.1", APPLIANCE_PORT=str(port),
            APPLIANCE_LOG_LEVEL=child_env.get("APPLIANCE_LOG_LEVEL", "warning"),
        )  # fmt: skip
        if max_calls is not None:
            child_env["APPLIANCE_LIMITS_MAX_CONCURRENT_CALLS"] = str(max_calls)
        self.settings = load_settings(env=child_env)
        if require_models and (problems := missing_models(self.settings)):
            raise SystemExit("models missing:\n  " + "\n  ".join(problems))
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path or data_dir / "server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        serve = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        self.command = [sys.executable, "-m", "appliance", *serve]
        self._log = open(self.log_path, "ab")  # closed by stop()
        self._log.write(f"== {' '.join(self.command)} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._log.flush()
        self._peak_rss_mb = 0.0
        self.returncode: int | None = None
        self.killed = False  # stop() had to SIGKILL it
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *serve],
            cwd=PROJECT_ROOT, env=child_env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,  # Ctrl-C reaches us; we stop it in order
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def max_calls(self) -> int:
        return self.settings.limits.max_concurrent_calls

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check(self) -> None:
        """Raise SystemExit (with the end of its log) if the server process has exited."""
        code = self.proc.poll()
        if code is not None:
            raise SystemExit(
                f"the server process exited with code {code}; the end of {self.log_path}:\n{self.log_tail()}"
            )

    async def live_calls(self) -> int:
        try:
            return await _scrape_live_calls(self.base_url, self.settings)
        except httpx.TransportError:
            self.check()
            raise

    def set_max_calls(self, n: int) -> None:
        if n != self.max_calls:
            raise RuntimeError(
                f"the server process serves {self.max_calls} calls at most; start another with max_calls={n}"
            )

    def sample(self) -> dict[str, float]:
        """The server process now (see :func:`proc_sample`)."""
        s = proc_sample(self.pid)
        self._peak_rss_mb = max(self._peak_rss_mb, s["hwm_mb"])
        return s

    def peak_rss_mb(self) -> float:
        """The server process's peak RSS (VmHWM), kept after it has stopped."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.sample()
        return self._peak_rss_mb

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "pid": self.pid, "base_url": self.base_url,
            "command": "python " + " ".join(self.command[1:]), "returncode": self.returncode,
            "killed": self.killed,
        }  # fmt: skip

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (uvicorn's graceful shutdown: live calls hung up, records written; it then exits by
        that signal, code -15), SIGKILL after ``timeout_s``; returns the exit code. Safe to call twice."""
        if self.returncode is None:
            self.peak_rss_mb()
            if self.proc.poll() is None:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait()
            self.returncode = self.proc.returncode
            self._log.close()
        return self.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


AnyServer: TypeAlias = BenchServer | ServerProcess


def launch_server(
    data_dir: Path,
    *,
    in_process: bool = False,
    env: Mapping[str, str] | None = None,
    max_calls: int | None = None,
    log_path: Path | None = None,
) -> AnyServer:
    """The appliance as its own process (default), or in this one with ``in_process``."""
    if in_process:
        return start_server(data_dir, env=env, max_calls=max_calls)
    return ServerProcess(data_dir, env=env, max_calls=max_calls, log_path=log_path)


async def wait_ready(
    base: str,
    timeout_s: float = 900.0,
    progress: Callable[[float], None] | None = None,
    check: Callable[[], None] | None = None,
) -> float:
    """Until ``/ready`` is 200; returns the seconds it took. ``progress(elapsed)`` about every 10 s;
    ``check()`` (e.g. :meth:`ServerProcess.check`) on every poll, to fail fast if the server died."""
    started = time.monotonic()
    last = started
    async with httpx.AsyncClient() as client:
        while True:
            if check is not None:
                check()
            try:
                r = await client.get(f"{base}/ready")
            except httpx.TransportError:  # a server process still starting
                r = None
            if r is not None and r.status_code == 200:
                return time.monotonic() - started
            if r is not None and r.json().get("error"):
                raise SystemExit(f"engines failed: {r.json()['error']}")
            now = time.monotonic()
            if now - started > timeout_s:
                raise SystemExit(f"engines not ready after {timeout_s:.0f} s")
            if progress is not None and now - last >= 10:
                last = now
                progress(now - started)
            await asyncio.sleep(0.5)


async def poll_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout_s: float, interval_s: float = 0.2
) -> bool:
    """Check ``predicate`` (sync, or async such as a server's live calls) until true or timed out."""
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
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
    server: AnyServer, name: str = "bench", welcome: str = WELCOME, prompt: str = PROMPT
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
        # When the caller spoke and the agent's audio played (ms since the call started, one wall
        # clock): enough to see why a turn went unanswered or which reply it overlapped.
        "timeline_ms": {
            "turns": [_turn_times(t) for t in result.turns],  # label, onset, last voiced, end, answer
            "agent": [[_ms(s.wall_start_ms), _ms(s.wall_end_ms)] for s in result.segments],
        },
    }


def _turn_times(turn: Turn) -> list[str | float | None]:
    times = (turn.speech_onset_ms, turn.last_voiced_ms, turn.ended_ms, turn.first_agent_audio_ms)
    return [turn.label, *(_ms(t) for t in times)]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


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
#
# ``pid`` None reads this process (``/proc/self``); a server's pid reads that process, e.g. a
# :class:`ServerProcess` child, whose figures are then the server's alone, without the callers.


def _proc(pid: int | None) -> str:
    return "/proc/self" if pid is None else f"/proc/{pid}"


def _status_fields(pid: int | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(f"{_proc(pid)}/status") as f:
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


def _stat_cpu_s(path: str) -> float:
    """user + system CPU seconds from a ``/proc/.../stat`` file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After "pid (comm)": state is field 3, utime 14 and stime 15 (1-based) -> indexes 11, 12 here.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, every thread) of this process, or of process ``pid``."""
    if pid is None or pid == os.getpid():
        t = os.times()
        return t.user + t.system
    return _stat_cpu_s(f"/proc/{pid}/stat")


def thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + system) of one thread of this process, from /proc/self/task/<tid>/stat."""
    try:
        return _stat_cpu_s(f"/proc/self/task/{native_id}/stat")
    except OSError:
        return 0.0


def proc_sample(pid: int | None = None) -> dict[str, float]:
    """This process (or process ``pid``) now: RSS and its peak (MB), open file descriptors, threads,
    CPU seconds."""
    status = _status_fields(pid)
    return {
        "rss_mb": _kb_to_mb(status.get("VmRSS", "0 kB")),
        "hwm_mb": _kb_to_mb(status.get("VmHWM", "0 kB")),
        "fds": float(len(os.listdir(f"{_proc(pid)}/fd"))),
        "threads": float(int(status.get("Threads", "0"))),
        "cpu_s": round(process_cpu_s(pid), 2),
    }


def max_rss_mb() -> float:
    """Peak RSS of this process since it started this program. (``getrusage``'s ``ru_maxrss``
    survives ``exec``: a benchmark started by a big test process would report that one's peak.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


class CpuMeter:
    """CPU used between start() and stop(), as % of the machine's cores (100% = every core busy):
    ``cpu_pct`` by the server (process ``pid``; None: this process, when the server runs in it),
    ``thread_cpu_pct`` by one thread of this process (default: the calling one, the callers' loop),
    and ``caller_cpu_pct`` by the callers: this whole process when the server is another one, else
    that thread."""

    def __init__(self, thread_id: int | None = None, pid: int | None = None) -> None:
        self.thread_id = thread_id if thread_id is not None else threading.get_native_id()
        self.pid = None if pid == os.getpid() else pid
        self.cores = cpu_cores()
        self._t0 = self._p0 = self._c0 = self._s0 = 0.0

    def start(self) -> None:
        self._t0, self._p0 = time.monotonic(), process_cpu_s(self.pid)
        self._c0, self._s0 = thread_cpu_s(self.thread_id), process_cpu_s()

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self._t0, 1e-6)
        process = process_cpu_s(self.pid) - self._p0
        thread = thread_cpu_s(self.thread_id) - self._c0
        callers = (process_cpu_s() - self._s0) if self.pid is not None else thread

        def share(seconds: float) -> float:
            return round(100.0 * seconds / wall / self.cores, 1)

        return {
            "wall_s": round(wall, 1),
            "cpu_pct": share(process),
            "thread_cpu_pct": share(thread),
            "caller_cpu_pct": share(callers),
        }


class PeakRss:
    """Samples VmRSS of this process (or of process ``pid``) in a background thread; ``reset()``
    starts a new window, ``peak_mb`` is its max."""

    def __init__(self, interval_s: float = 0.25, pid: int | None = None) -> None:
        self.interval_s = interval_s
        self.pid = pid
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _rss(self) -> float:
        try:
            return _kb_to_mb(_status_fields(self.pid).get("VmRSS", "0 kB"))
        except OSError:  # the process has exited
            return 0.0

    def reset(self) -> None:
        self.peak_mb = self._rss()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self._rss())


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
        "caller_cpu_pct": (cpu or {}).get("caller_cpu_pct", (cpu or {}).get("thread_cpu_pct")),
        "wall_s": (cpu or {}).get("wall_s"),
        "peak_rss_mb": peak_rss_mb,
    }


def round_plan(levels: Sequence[int], rounds: int) -> list[tuple[int, int]]:
    """(round, level) in the order a ramp of ``rounds`` rounds runs them: up the levels, then down,
    then up again. Over an even number of rounds each level then sits at the same mean time into the
    run, so a VM that speeds up or slows down during it does not tilt the pooled figures towards the
    first or the last levels."""
    ordered = sorted(levels)
    plan: list[tuple[int, int]] = []
    for rnd in range(rounds):
        plan.extend((rnd, level) for level in (ordered if rnd % 2 == 0 else ordered[::-1]))
    return plan


def pool_levels(rounds: Sequence[dict[str, Any]], calls: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per level over every round: the turns of all its calls pooled (the calls carry
    ``level``), CPU weighted by each round's wall time, RSS the highest peak. ``rounds`` are the
    per-round level summaries."""
    pooled = []
    for level in sorted({int(r["level"]) for r in rounds}):
        mine = [r for r in rounds if int(r["level"]) == level]
        timed = [r for r in mine if r.get("cpu_pct") is not None and r.get("wall_s")]
        wall = sum(float(r["wall_s"]) for r in timed)

        def weighted(key: str, timed: list[dict[str, Any]] = timed) -> float | None:
            values = [(float(r[key]), float(r["wall_s"])) for r in timed if r.get(key) is not None]
            seconds = sum(w for _, w in values)
            return round(sum(v * w for v, w in values) / seconds, 1) if seconds else None

        peaks = [float(r["peak_rss_mb"]) for r in mine if r.get("peak_rss_mb") is not None]
        figures = {"cpu_pct": weighted("cpu_pct"), "caller_cpu_pct": weighted("caller_cpu_pct")}
        cpu = {k: v for k, v in figures.items() if v is not None} | {"wall_s": round(wall, 1)}
        summary = summarize_level(
            level,
            [c for c in calls if int(c["level"]) == level],
            cpu=cpu if timed else None,
            peak_rss_mb=max(peaks) if peaks else None,
        )
        summary["rounds"] = len(mine)
        pooled.append(summary)
    return pooled


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
