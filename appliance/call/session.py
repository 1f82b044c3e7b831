"""One live call: caller audio in, agent audio out. No HTTP here; the websocket edge feeds it.

Two priorities of work. *Control* runs in the audio task and never waits behind anything
cancellable: decode, resample, VAD, turn detection, pausing/resuming/clearing the playout, hang-up.
*Cancellable work* (transcription, the brain's turn, synthesis) runs in per-turn tasks that control
cancels on barge-in or hang-up. Every task belongs to the session's TaskGroup.

Speculation: at a short pause the utterance so far is transcribed; its words set how long a silence
ends this turn (``EndpointPolicy``), and the reply starts at once — brain and TTS run behind a closed
gate (``Reply.gate``), so when the silence holds, the first clause is ready to play. If the caller
goes on talking, the speculative reply is cancelled and the brain's history restored. A speculative
reply never dispatches a function or records anything before it is committed.

Reading ahead: during a long utterance (no pause to transcribe at), what was said so far is
transcribed every ``read_ahead_ms`` of speech while the cores are free, and the brain reads those
words into the LLM's prompt cache; the turn then reads only its last words when it ends.

Barge-in: caller speech while the agent is busy pauses the playout at once (a "candidate"). It is
confirmed (brain and TTS cancelled, ``clearAudio`` sent, history cut to what was heard) when the
speech carries real words or lasts long; a short noise or a backchannel resumes the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import numpy as np

from ..audio import mulaw
from ..audio.resample import StreamResampler
from ..conversation.types import (
    EndCall,
    FunctionCallFinished,
    FunctionCallStarted,
    TextDelta,
    Transfer,
    TurnDone,
)
from ..conversation.types import TurnEvent as BrainEvent
from ..engines.priority import CPU
from ..engines.types import AsrEngine, FloatArray, Int16Array, TtsEngine, VadModel
from ..store.db import utcnow
from .chunker import ClauseChunker, fixed_text_clauses
from .clock import Clock, MonotonicClock
from .endpoint import EndpointPolicy
from .playout import AudioSink, Playout
from .records import CallFinished, CallInfo, CallRecorder, CallStarted, FunctionCallRecord, TurnRecord
from .reply import Reply, ReplyKind, Voice
from .turns import (
    SpeechDiscarded,
    SpeechPaused,
    SpeechProgress,
    SpeechStarted,
    TurnDetector,
    TurnEnded,
    TurnEvent,
    UtteranceBuffer,
)

log = logging.getLogger(__name__)

# A window this likely to be speech pauses the agent at once; speech must follow within HOLD_S.
HOLD_PROB = 0.3
HOLD_S = 0.15
INBOUND_MAX_FRAMES = 250  # 5 s of 20 ms frames: beyond that the session is hopelessly behind
# Fewer words said so far are not worth reading ahead: the turn reads them in a few ms itself.
READ_AHEAD_MIN_WORDS = 4
# Words a caller says while listening; they never interrupt the agent.
BACKCHANNELS = frozenset(
    "mm mmm hmm mhm mm-hm mm-hmm uh-huh uh huh um ah oh ok okay yeah yep yes right sure alright "
    "i see got it great cool".split()
)
_WORD = re.compile(r"[a-z0-9']+(?:-[a-z0-9']+)*")


class Brain(Protocol):
    """What the session needs from ``appliance.conversation``."""

    def turn(self, text: str) -> AsyncIterator[BrainEvent]: ...

    def record_heard(self, text: str, interrupted: bool = True) -> None:
        """Replace the last spoken reply in history with what the caller heard."""
        ...

    def add_assistant_message(self, text: str) -> None:
        """Something the agent said outside a brain turn (welcome, goodbye)."""
        ...

    # Optional (looked up with getattr): ``snapshot() -> object`` and ``restore(state)``, which let a
    # speculative turn be undone (a brain without them is never asked to speculate); ``end()``, told
    # when the call is over; ``async read_ahead(words)``, given the words of a turn still being
    # spoken, to read into its prompt cache (a saving only: nothing is answered or recorded).


class CallControl(Protocol):
    """Call control outside the media stream (Plivo REST)."""

    async def hangup(self) -> None: ...

    async def transfer(self, number: str) -> None: ...


@dataclass(frozen=True)
class SessionConfig:
    welcome_message: str = ""
    call_timeout_s: float = 0.0  # 0: no limit
    end_of_turn_silence_ms: int = 600
    min_utterance_ms: int = 200
    barge_in_min_speech_ms: int = 300
    # Speech this long while the agent talks interrupts it whatever the words.
    barge_in_confirm_ms: int = 1200
    playout_lead_ms: int = 100
    tts_speed: float = 1.0
    language: str | None = "en"
    # Below this RMS (int16 units, ~-47 dBFS) a frame is never speech: echo residue and line hiss.
    min_speech_rms: float = 150.0
    # Start transcribing after this much silence, before the end of the turn is certain; already
    # after ``quick_pause_ms`` when the cores are free at that moment (0: never).
    pause_ms: int = 200
    quick_pause_ms: int = 120
    # Adapt the end-of-turn silence to the words so far (see appliance/call/endpoint.py).
    smart_end_of_turn: bool = True
    # Start the reply at the pause, held back until the end of the turn is certain.
    speculative: bool = True
    # Words that say more is coming (a trailing "and", half a number) make the end of the turn wait
    # longer (``EndpointPolicy``): their reply starts, held back, once the end is this close, so that
    # it is ready when the silence holds (0: only words that look final start one).
    speculate_within_ms: int = 700
    # While the caller goes on talking, transcribe what they said so far after each this much more
    # speech and let the brain read those words into its prompt cache (``read_ahead``), so a long
    # turn leaves only its last words to read when it ends (0: never).
    read_ahead_ms: int = 2000
    # The first clause of a generated reply may end before a phrase-opening word once it has this
    # many words (see ``ClauseChunker``); 0: at punctuation only.
    first_phrase_words: int = 2
    # ...and before any word nothing binds to once it has this many words (0: never).
    first_clause_max_words: int = 5
    goodbye_message: str = "Goodbye."
    timeout_message: str = "I'm sorry, we have reached the time limit for this call. Goodbye."


@dataclass(eq=False)
class _Speculation:
    """A reply started before the end of the turn was certain."""

    text: str
    reply: Reply
    brain_state: object
    carry: str  # ``CallSession._carry`` before this reply took it
    transcript_at: float
    asr_ms: float


@dataclass
class _BargeIn:
    onset: float
    confirmed: bool = False
    checking: asyncio.Task[None] | None = None


def is_backchannel(text: str) -> bool:
    """Empty, or only listener noises ("mm-hm", "okay", "yeah right")."""
    words = _WORD.findall(text.lower())
    return all(w in BACKCHANNELS for w in words)


class CallSession:
    def __init__(
        self,
        info: CallInfo,
        config: SessionConfig,
        *,
        vad: VadModel,
        asr: AsrEngine,
        tts: TtsEngine,
        brain: Brain,
        sink: AudioSink,
        control: CallControl,
        recorder: CallRecorder,
        clock: Clock | None = None,
        vad_executor: Executor | None = None,
    ):
        self.info = info
        self.config = config
        self.asr = asr
        self.brain = brain
        self.control = control
        self.recorder = recorder
        self.clock: Clock = clock or MonotonicClock()
        self._vad = vad.stream(8000)
        self._vad_executor = vad_executor
        self.playout = Playout(sink, self.clock, lead_ms=config.playout_lead_ms)
        self.voice = Voice(tts, self.playout, speed=config.tts_speed)
        self.detector = TurnDetector(
            end_of_turn_silence_ms=config.end_of_turn_silence_ms, min_utterance_ms=config.min_utterance_ms,
            pause_ms=config.pause_ms, quick_pause_ms=config.quick_pause_ms,
        )  # fmt: skip
        self.endpoint = EndpointPolicy(default_ms=config.end_of_turn_silence_ms)
        self.utterance = UtteranceBuffer(16000, max_seconds=30.0, preroll_ms=400.0)
        self._up = StreamResampler(8000, 16000, dtype=np.int16)
        self._inbound: asyncio.Queue[bytes] = asyncio.Queue(maxsize=INBOUND_MAX_FRAMES)
        self._ended = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._reply: Reply | None = None
        self._listen: asyncio.Task[None] | None = None
        self._early: tuple[int, asyncio.Task[str]] | None = None  # (buffer length, transcription)
        self._utterance_seq = 0  # counts utterances; the open one is ``_open_utterance``
        self._open_utterance: int | None = None
        self._spec: _Speculation | None = None
        self._spec_timer: asyncio.Task[object] | None = None  # a speculation waiting for its moment
        self._rollback: asyncio.Task[None] | None = None  # restoring the brain after a dropped spec
        self._read_ahead: asyncio.Task[object] | None = None  # words so far, into the brain's cache
        self._read_ahead_voiced = 0.0  # voiced ms of the open utterance when it last started
        self.read_aheads = 0
        self.speculations = 0
        self.speculations_committed = 0
        self.speculations_dropped = 0
        self._leave_cause = "agent_hangup"
        self._carry = ""  # caller words whose reply was cut before the brain saw them
        self._barge: _BargeIn | None = None
        self._hold_until: float | None = None  # a tentative pause on a first voiced window
        self._next_reply = 0
        self._turn_seq = 0
        self._closing = False  # goodbye in progress: no new turns
        self.status = "completed"
        self.hangup_cause = "caller_hangup"
        self.dropped_frames = 0
        self.barge_ins = 0
        self.resumes = 0
        self.started_mono = 0.0
        self.started_at = utcnow()

    # -- inputs from the websocket edge (synchronous, cheap) ---------------------------------
    def feed_media(self, mulaw_frame: bytes) -> None:
        if self._ended.is_set():
            return
        try:
            self._inbound.put_nowait(mulaw_frame)
        except asyncio.QueueFull:
            # Falling behind: drop the oldest audio rather than grow without bound.
            self._inbound.get_nowait()
            self._inbound.put_nowait(mulaw_frame)
            self.dropped_frames += 1

    def feed_dtmf(self, digit: str) -> None:
        if self._ended.is_set() or self._closing or self._tg is None:
            return
        self._tg.create_task(self._on_dtmf(digit), name=f"dtmf-{self.info.call_uuid}")

    def played(self, name: str) -> None:
        self.playout.on_played(name)

    def cleared(self) -> None:
        log.debug("call %s: clearedAudio acknowledged", self.info.call_uuid)

    def hangup(self, cause: str = "caller_hangup", status: str | None = None) -> None:
        """The call is over (``stop``, socket closed, REST hang-up): cancel everything."""
        if not self._ended.is_set():
            self.hangup_cause = cause
            if status is not None:
                self.status = status
            self._ended.set()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    # -- lifetime -----------------------------------------------------------------------------
    async def _prewarm_brain(self) -> None:
        """Let the brain evaluate its prompt prefix while the welcome plays: the first turn then
        pays only for the caller's words (seconds saved on a CPU). Optional for a brain; a failure
        costs only that saving."""
        prewarm = getattr(self.brain, "prewarm", None)
        if prewarm is None:
            return
        try:
            await prewarm()
        except Exception:
            log.warning("call %s: brain prewarm failed", self.info.call_uuid, exc_info=True)

    async def run(self) -> None:
        self.started_mono = self.clock.now()
        self.recorder.submit(CallStarted(self.info, self.started_at))
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                workers = [
                    tg.create_task(self._audio_loop(), name="call-audio"),
                    tg.create_task(self.playout.run(), name="call-playout"),
                ]
                if self.config.call_timeout_s > 0:
                    workers.append(tg.create_task(self._timeout_watch(), name="call-timeout"))
                if self.config.welcome_message.strip():
                    self._start_reply("welcome", fixed_text=self.config.welcome_message.strip())
                workers.append(tg.create_task(self._prewarm_brain(), name="call-prewarm"))
                await self._ended.wait()
                self._tg = None
                for task in workers:
                    task.cancel()
                self._cancel_cancellable()
        except Exception:
            self.status = "failed"
            self.hangup_cause = "internal_error"
            log.exception("call %s failed", self.info.call_uuid)
            raise
        finally:
            self._tg = None
            reply = self._reply
            if reply is not None and not reply.finalized:
                self.playout.refresh()
                self._finalize_reply(reply, interrupted=True)
            end = getattr(self.brain, "end", None)
            if end is not None:
                end()
            self.recorder.submit(
                CallFinished(
                    utcnow(),
                    self.status,
                    self.hangup_cause,
                    self.speculations_committed,
                    self.speculations_dropped,
                )
            )

    def _cancel_cancellable(self) -> None:
        if self._reply is not None and self._reply.task is not None:
            self._reply.task.cancel()
        spec = self._spec.reply.task if self._spec is not None else None
        early = self._early[1] if self._early else None
        for task in (self._listen, early, spec, self._spec_timer, self._read_ahead):
            if task is not None:
                task.cancel()
        if self._barge is not None and self._barge.checking is not None:
            self._barge.checking.cancel()

    def _spawn(self, coro: object, name: str) -> asyncio.Task[object] | None:
        if self._tg is None:
            coro.close()  # type: ignore[attr-defined]
            return None
        return self._tg.create_task(coro, name=name)  # type: ignore[arg-type]

    # -- control: audio, VAD, turns, barge-in --------------------------------------------------
    async def _audio_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame = await self._inbound.get()
            pcm8 = mulaw.decode(frame)
            up = self._up.process(pcm8)
            if up.size:
                self.utterance.append(up.astype(np.float32) / 32768.0)
            if self._vad_executor is not None:
                probs = await loop.run_in_executor(self._vad_executor, self._vad.push, pcm8)
            else:
                probs = self._vad.push(pcm8)
            if not probs:
                continue
            quiet = _rms(pcm8) < self.config.min_speech_rms
            now = self.clock.now()
            for prob in probs:
                gated = 0.0 if quiet else prob
                self._maybe_hold(gated, now)
                for event in self.detector.push(gated, now):
                    await self._on_turn_event(event)
            self._maybe_release(now)

    def _maybe_hold(self, prob: float, now: float) -> None:
        """Pause the agent on the first likely-voiced window, before speech is certain: every
        window waited for is heard by the caller as the agent talking over them."""
        if (
            self._hold_until is None
            and self._barge is None
            and not self.detector.in_speech
            and prob >= HOLD_PROB
            and not self._closing
            and self._busy()
        ):
            self.playout.pause()
            self._hold_until = now + HOLD_S

    def _maybe_release(self, now: float) -> None:
        """A hold that did not turn into speech was a blip: carry on talking."""
        if self._hold_until is None:
            return
        if self._barge is not None:
            self._hold_until = None  # speech started: the barge-in logic owns the pause now
        elif self.detector.in_speech or now >= self._hold_until:
            # A blip; or speech that started after the agent had finished, with nothing to interrupt:
            # a pause nobody owns would keep the answer to these words from ever being heard.
            self._hold_until = None
            self.playout.resume()

    def _busy(self) -> bool:
        return (self._reply is not None and self._reply.running) or self.playout.speaking()

    async def _on_turn_event(self, event: TurnEvent) -> None:
        cfg = self.config
        if isinstance(event, SpeechStarted):
            self.utterance.start()
            self._utterance_seq += 1
            self._open_utterance = self._utterance_seq
            self._read_ahead_voiced = 0.0
            self._drop_early()
            if self._busy() and self._barge is None and not self._closing:
                self.playout.pause()
                self._barge = _BargeIn(event.onset)
        elif isinstance(event, SpeechProgress):
            self._drop_early()
            self._maybe_read_ahead(event.voiced_ms)
            barge = self._barge
            if barge is None or barge.confirmed:
                return
            if event.voiced_ms >= cfg.barge_in_confirm_ms:
                await self._confirm_barge_in()
            elif event.voiced_ms >= cfg.barge_in_min_speech_ms and barge.checking is None:
                barge.checking = self._spawn(self._check_words(barge), "barge-check")  # type: ignore[assignment]
        elif isinstance(event, SpeechPaused):
            # A quick pause is often only a gap between words: transcribing there is worth it when
            # it takes nothing from other work (no transcription, synthesis or first clause under
            # way); otherwise the usual pause follows if the silence goes on.
            if self._early is None and (not event.quick or not (CPU.working_now or CPU.latency_critical_now)):
                snapshot = self.utterance.snapshot()
                task = self._spawn(self._early_transcript(snapshot, self._utterance_seq), "early-asr")
                if task is not None:
                    self._early = (len(self.utterance), task)  # type: ignore[assignment]
        elif isinstance(event, SpeechDiscarded):
            self._open_utterance = None
            self.utterance.stop()
            self._drop_early()
            self._resume_after_noise()
        elif isinstance(event, TurnEnded):
            self._open_utterance = None
            self._cancel_spec_timer()
            self._stop_read_ahead()
            audio = self.utterance.take()
            barge = self._barge
            if barge is not None and not barge.confirmed and event.voiced_ms < cfg.barge_in_min_speech_ms:
                self._drop_early()
                self._resume_after_noise()
                return
            # An early transcription survives only if the caller did not speak again after it.
            early = self._early[1] if self._early is not None else None
            self._early = None
            spec, self._spec = self._spec, None
            if self._closing:
                if spec is not None:
                    self._spec = spec
                    self._drop_speculation()
                return
            # Utterances are answered in order: a slow transcription of the previous one must not
            # be overtaken (or dropped) by the next.
            previous = self._listen
            self._listen = self._spawn(self._on_utterance(audio, event, early, previous, spec), "listen")  # type: ignore[assignment]

    def _drop_early(self) -> None:
        if self._early is not None:
            self._early[1].cancel()
            self._early = None
        self._cancel_spec_timer()
        self._drop_speculation()

    def _cancel_spec_timer(self) -> None:
        if self._spec_timer is not None:
            self._spec_timer.cancel()
            self._spec_timer = None

    async def _early_transcript(self, audio: FloatArray, utterance: int) -> str:
        """Transcribe at a pause; while the utterance is still open (the caller silent since),
        let its words set the end-of-turn silence and start the reply speculatively."""
        started = self.clock.now()
        text = await self._transcribe_safely(audio)
        if self._open_utterance != utterance or not text:
            return text  # the turn already ended (it uses this text) or was noise
        wait_ms = self.endpoint.silence_ms(text)
        if self.config.smart_end_of_turn:
            self.detector.set_turn_silence(wait_ms)
        if not self.config.speculative:
            return text
        if self.endpoint.looks_final(text):
            if self._can_speculate():
                self._speculate(text, started)
        elif self.config.smart_end_of_turn and self.config.speculate_within_ms > 0:
            # The turn waits long for more words; if none come, the reply should be ready by then.
            lead_ms = self.config.speculate_within_ms + self.detector.silence_ms
            deadline = self.clock.now() + max(0.0, wait_ms - lead_ms) / 1000.0
            self._cancel_spec_timer()
            timer = self._speculate_at(deadline, text, started, utterance)
            self._spec_timer = self._spawn(timer, "spec-timer")
        return text

    async def _speculate_at(self, deadline: float, text: str, started: float, utterance: int) -> None:
        await self.clock.sleep_until(deadline)
        if self._spec_timer is asyncio.current_task():
            self._spec_timer = None
        if self._open_utterance == utterance and self._can_speculate():
            self._speculate(text, started)

    def _maybe_read_ahead(self, voiced_ms: float) -> None:
        """A long turn's words are read by the LLM while the caller still speaks: every
        ``read_ahead_ms`` of speech, once nobody else waits on the cores, what was said so far is
        transcribed and the brain reads it into its prompt cache. When the turn ends only its last
        words are left to read (a 6 s sentence is ~25 prompt tokens, ~0.3 s of reading on 2 cores
        and far more beside other calls)."""
        every = self.config.read_ahead_ms
        if every <= 0 or voiced_ms - self._read_ahead_voiced < every or self._read_ahead is not None:
            return
        if CPU.latency_critical_now or not self._can_speculate():
            return  # the cores are someone's now, or the agent is busy: the next window asks again
        if not callable(getattr(self.brain, "read_ahead", None)):
            return
        self._read_ahead_voiced = voiced_ms
        snapshot = self.utterance.snapshot()
        self._read_ahead = self._spawn(self._read_words_ahead(snapshot, self._utterance_seq), "read-ahead")

    def _stop_read_ahead(self) -> None:
        """A reply for these words starts now: a read-ahead still waiting for the LLM would only run
        after it, and overwrite the reply's cells with words it has read already. (What a running
        one has read stays in the cache for the reply.)"""
        if self._read_ahead is not None:
            self._read_ahead.cancel()
            self._read_ahead = None

    async def _read_words_ahead(self, audio: FloatArray, utterance: int) -> None:
        try:
            text = await self._transcribe_safely(audio, background=True)
            # The snapshot ends mid-speech: its last word may be cut off ("consid" for "consider").
            words = text.split()[:-1]
            still_open = self._open_utterance == utterance and self._can_speculate()
            if len(words) < READ_AHEAD_MIN_WORDS or not still_open:
                return
            self.read_aheads += 1
            await self.brain.read_ahead(" ".join(words))  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            raise
        except Exception:  # only a saving is lost: the turn reads its words itself
            log.warning("call %s: reading the words ahead failed", self.info.call_uuid, exc_info=True)
        finally:
            if self._read_ahead is asyncio.current_task():
                self._read_ahead = None

    def _can_speculate(self) -> bool:
        return (
            self._tg is not None
            and not self._closing
            and self._spec is None
            # A confirmed barge-in has already stopped the agent: its words deserve a fast answer
            # too. One still being checked (a noise?) must not start a reply.
            and (self._barge is None or self._barge.confirmed)
            and self._listen is None
            and (self._reply is None or self._reply.finalized)
            and not self.playout.speaking()
            and not self._carry  # an interrupted question pending: answer it the plain way
            and callable(getattr(self.brain, "snapshot", None))
            and callable(getattr(self.brain, "restore", None))
        )

    def _speculate(self, text: str, started: float) -> None:
        self._stop_read_ahead()
        now = self.clock.now()
        state = self.brain.snapshot()  # type: ignore[attr-defined]
        reply = self._start_reply("answer", input_text=text, held=True)
        if reply is None:
            return
        self.speculations += 1
        self._spec = _Speculation(text, reply, state, "", now, (now - started) * 1000.0)

    def _drop_speculation(self) -> None:
        """The caller went on talking (or the call moved on): undo the speculative reply."""
        spec, self._spec = self._spec, None
        if spec is None:
            return
        self.speculations_dropped += 1
        self._carry = spec.carry
        task = spec.reply.task
        if task is not None and not task.done():
            task.cancel()
            self._rollback = self._spawn(self._restore_brain(task, spec.brain_state), "spec-rollback")  # type: ignore[assignment]
        else:
            self.brain.restore(spec.brain_state)  # type: ignore[attr-defined]

    async def _restore_brain(self, task: asyncio.Task[None], state: object) -> None:
        # Only once the cancelled turn has unwound: its clean-up writes to the history.
        await asyncio.wait({task})
        self.brain.restore(state)  # type: ignore[attr-defined]

    def _resume_after_noise(self) -> None:
        barge = self._barge
        if barge is None or barge.confirmed:
            return
        if barge.checking is not None:
            barge.checking.cancel()
        self._barge = None
        self.resumes += 1
        log.info("call %s: not a barge-in; resuming", self.info.call_uuid)
        self.playout.resume()

    async def _check_words(self, barge: _BargeIn) -> None:
        """While the agent is paused, find out whether the caller says real words."""
        text = await self._transcribe_safely(self.utterance.snapshot())
        if self._barge is barge and not barge.confirmed and not is_backchannel(text):
            await self._confirm_barge_in()

    async def _confirm_barge_in(self) -> None:
        barge = self._barge
        if barge is not None:
            barge.confirmed = True
        await self._interrupt()

    async def _interrupt(self) -> None:
        """Stop the agent now: cancel its reply, clear Plivo's buffer, keep only what was heard."""
        reply = self._reply
        log.info("call %s: interrupting reply %s", self.info.call_uuid, reply.id if reply else None)
        if reply is None or reply.finalized:
            if self.playout.speaking():
                await self.playout.clear()
            self.playout.resume()  # paused for this barge-in: nothing left to stop, the answer must play
            return
        if reply.task is not None and not reply.task.done():
            # Not awaited: its clean-up (a generation stopping at the next token) may take a while,
            # and control must not wait for it. Once cancelled it can queue no more audio, and the
            # session's TaskGroup still owns it.
            reply.task.cancel()
        if reply.audio_sent or self.playout.speaking():
            await self.playout.clear()
        self.playout.resume()  # (``clear`` resumes too) the reply is cancelled: what comes next must play
        self.barge_ins += 1
        if reply.input_text and not reply.brain_started:
            # Cut before the brain even saw the caller's words: they still await an answer.
            self._carry = f"{self._carry} {reply.input_text}".strip()
        self._finalize_reply(reply, interrupted=True)

    # -- cancellable work ---------------------------------------------------------------------
    async def _transcribe(self, audio: FloatArray, *, background: bool = False) -> str:
        if audio.size < 1600:  # < 100 ms
            return ""
        result = await self.asr.transcribe(audio, language=self.config.language, background=background)
        if result.no_speech_prob > 0.8 and result.avg_logprob < -1.0:
            return ""
        text = result.text.strip()
        # Whisper starts a transcript of part of a sentence in lower case now and then ("unless to
        # be", then "Unless to be rather ..." for the whole): one form keeps the words read ahead
        # (``read_ahead``) a prefix of the turn's.
        return text[:1].upper() + text[1:] if text[:1].islower() else text

    async def _transcribe_safely(self, audio: FloatArray, *, background: bool = False) -> str:
        """For tasks of their own: a failed transcription is a turn not heard, not a dead call."""
        try:
            return await self._transcribe(audio, background=background)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("call %s: transcription failed", self.info.call_uuid)
            return ""

    async def _on_utterance(
        self,
        audio: FloatArray,
        ended: TurnEnded,
        early: asyncio.Task[str] | None,
        previous: asyncio.Task[None] | None = None,
        spec: _Speculation | None = None,
    ) -> None:
        try:
            if spec is not None:
                self._commit(spec, ended)
                return
            started = self.clock.now()
            if early is not None:
                text = await early
            else:
                text = await self._transcribe(audio)
            transcript_at = self.clock.now()
            log.info(
                "call %s: caller said %r (voiced %.0f ms, asr %.0f ms)",
                self.info.call_uuid, text, ended.voiced_ms, (transcript_at - started) * 1000.0,
            )  # fmt: skip
            if previous is not None and not previous.done():
                await asyncio.wait({previous})
            if self._closing:
                return
            barge = self._barge
            if not text or (barge is not None and not barge.confirmed and is_backchannel(text)):
                if barge is not None and not barge.confirmed:
                    self._resume_after_noise()
                elif barge is not None:
                    self._barge = None  # a confirmed interruption that said nothing: listen afresh
                return
            if barge is not None and not barge.confirmed:
                await self._confirm_barge_in()
            elif self._reply is not None and not self._reply.finalized:
                # The caller went on talking before the agent said anything: start over with both.
                await self._interrupt()
            self._barge = None
            self._record_turn("caller", text, ended.onset, ended.last_voiced)
            # Words whose reply was cut before the brain saw them are asked together with these.
            reply = self._start_reply("answer", input_text=self._take_carry(text))
            if reply is not None:
                t = reply.timings
                t.onset, t.last_voiced, t.decided = ended.onset, ended.last_voiced, ended.decided
                t.transcript = transcript_at
                t.asr_ms = (transcript_at - started) * 1000.0
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("call %s: handling an utterance failed", self.info.call_uuid)
        finally:
            if self._listen is asyncio.current_task():
                self._listen = None

    def _commit(self, spec: _Speculation, ended: TurnEnded) -> None:
        """The silence held: the speculative reply is the answer. Let it be heard."""
        reply = spec.reply
        self.speculations_committed += 1
        self._barge = None  # a confirmed interruption's words are answered: listen afresh
        log.info("call %s: caller said %r (voiced %.0f ms, speculative reply)",
                 self.info.call_uuid, spec.text, ended.voiced_ms)  # fmt: skip
        self._record_turn("caller", spec.text, ended.onset, ended.last_voiced)
        t = reply.timings
        t.onset, t.last_voiced, t.decided = ended.onset, ended.last_voiced, ended.decided
        t.transcript, t.asr_ms = spec.transcript_at, spec.asr_ms
        self._reply = reply
        if reply.gate is not None:
            reply.gate.set()

    async def _on_dtmf(self, digit: str) -> None:
        self._drop_speculation()
        if self._reply is not None and not self._reply.finalized:
            await self._interrupt()
        self._barge = None
        self._record_turn("caller", f"[DTMF {digit}]", self.clock.now(), self.clock.now())
        self._start_reply("dtmf", input_text=self._take_carry(f"The caller pressed {digit}."))

    def _take_carry(self, text: str) -> str:
        full, self._carry = f"{self._carry} {text}".strip(), ""
        return full

    def _start_reply(
        self,
        kind: ReplyKind,
        *,
        input_text: str | None = None,
        fixed_text: str | None = None,
        held: bool = False,
    ) -> Reply | None:
        """Start a reply task. ``held``: speculative, silent until its gate opens (``_commit``);
        it does not become the current reply until then."""
        if self._tg is None or (self._closing and kind != "goodbye"):
            return None
        self._next_reply += 1
        reply = Reply(self._next_reply, kind, input_text=input_text, fixed_text=fixed_text)
        reply.started_at = self.clock.now()
        if held:
            reply.gate = asyncio.Event()
        else:
            self._reply = reply
        reply.task = self._tg.create_task(self._run_reply(reply), name=f"reply-{reply.id}")
        return reply

    async def _run_reply(self, reply: Reply) -> None:
        try:
            if reply.fixed_text is not None:
                # Clause by clause: audio starts sooner, and checkpoints say how far the caller got.
                for clause in fixed_text_clauses(reply.fixed_text):
                    reply.clauses.append(clause)
                    await self.voice.speak(reply, clause)
            else:
                await self._generate(reply)
            await self.playout.drain()
            self._finalize_reply(reply, interrupted=False)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("call %s: reply %d failed", self.info.call_uuid, reply.id)
            self._finalize_reply(reply, interrupted=False)
            return
        if reply.end_call or reply.transfer_to:
            await self._leave(reply)

    async def _generate(self, reply: Reply) -> None:
        """Brain → clause chunker → TTS → playout, all streamed: the first clause is spoken while
        the rest is still being generated."""
        assert reply.input_text is not None
        clauses: asyncio.Queue[str | None] = asyncio.Queue(maxsize=32)
        chunker = ClauseChunker(
            first_phrase_words=self.config.first_phrase_words,
            first_clause_max_words=self.config.first_clause_max_words,
            token_deltas=True,
        )
        timings = reply.timings

        async def think() -> None:
            try:
                rollback = self._rollback
                if rollback is not None and not rollback.done():
                    await asyncio.wait({rollback})  # a dropped speculation is still undoing itself
                reply.brain_started = True
                async with contextlib.aclosing(self.brain.turn(reply.input_text or "")) as events:  # type: ignore[type-var]
                    async for event in events:
                        if isinstance(event, TextDelta):
                            if timings.first_token is None:
                                timings.first_token = self.clock.now()
                            for clause in chunker.push(event.text):
                                await put(clause)
                            continue
                        # Nothing but words before commit: the generator stays suspended here, so
                        # a function is not dispatched (nor anything recorded) until then.
                        await reply.wait_gate()
                        if isinstance(event, FunctionCallStarted):
                            log.info("call %s: function %s", self.info.call_uuid, event.name)
                        elif isinstance(event, FunctionCallFinished):
                            self.recorder.submit(
                                FunctionCallRecord(
                                    self._turn_seq + 1, event.name, dict(event.arguments), event.result,
                                    event.ok, event.error, utcnow(),
                                )
                            )  # fmt: skip
                        elif isinstance(event, EndCall):
                            reply.end_call = True
                            self._record_builtin("end_call", {})
                        elif isinstance(event, Transfer):
                            reply.transfer_to = event.number
                            self._record_builtin("transfer_call", {"number": event.number})
                        elif isinstance(event, TurnDone):
                            break
                rest = chunker.flush()
                if rest:
                    await put(rest)
            finally:
                await clauses.put(None)

        async def put(clause: str) -> None:
            if timings.first_clause is None:
                timings.first_clause = self.clock.now()
            reply.got_text = True
            await clauses.put(clause)

        async def speak() -> None:
            while (clause := await clauses.get()) is not None:
                reply.clauses.append(clause)
                await self.voice.speak(reply, clause)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(think(), name=f"think-{reply.id}")
            tg.create_task(speak(), name=f"speak-{reply.id}")
        if (reply.end_call or reply.transfer_to) and not reply.got_text:
            reply.clauses.append(self.config.goodbye_message)
            await self.voice.speak(reply, self.config.goodbye_message)

    async def _leave(self, reply: Reply) -> None:
        self._closing = True
        try:
            if reply.transfer_to:
                await self.control.transfer(reply.transfer_to)
                self.hangup("transferred", status="transferred")
            else:
                await self.control.hangup()
                self.hangup(self._leave_cause)
        except Exception:
            log.exception("call %s: hang-up/transfer through Plivo failed", self.info.call_uuid)
            self.hangup("agent_hangup_failed")

    async def _timeout_watch(self) -> None:
        await self.clock.sleep_until(self.started_mono + self.config.call_timeout_s)
        self._drop_speculation()
        self._closing = True
        self._leave_cause = "call_timeout"
        self._barge = None
        await self._interrupt()
        reply = self._start_reply("goodbye", fixed_text=self.config.timeout_message)
        if reply is not None:
            reply.end_call = True
            self.hangup_cause = "call_timeout"
            if reply.task is not None:
                await asyncio.wait({reply.task})
            self.hangup("call_timeout")

    # -- records ------------------------------------------------------------------------------
    def _wall(self, mono: float) -> datetime:
        return utcnow() - timedelta(seconds=max(0.0, self.clock.now() - mono))

    def _record_turn(
        self,
        role: str,
        text: str,
        start: float,
        end: float,
        *,
        heard: str | None = None,
        interrupted: bool = False,
        timings: dict[str, object] | None = None,
    ) -> None:
        self._turn_seq += 1
        self.recorder.submit(
            TurnRecord(
                self._turn_seq, role, text, self._wall(start), self._wall(end),  # type: ignore[arg-type]
                heard_text=heard, interrupted=interrupted, timings=dict(timings or {}),
            )
        )  # fmt: skip

    def _record_builtin(self, name: str, arguments: dict[str, Any]) -> None:
        """Built-ins run here, not at a handler URL; the record still shows the model chose them."""
        self.recorder.submit(
            FunctionCallRecord(self._turn_seq + 1, name, arguments, None, True, None, utcnow())
        )

    def _finalize_reply(self, reply: Reply, *, interrupted: bool) -> None:
        if reply.finalized:
            return
        reply.finalized = True
        self.playout.refresh()
        log.info(
            "call %s: reply %d (%s) %s: %r",
            self.info.call_uuid, reply.id, reply.kind,
            "interrupted" if interrupted else "done", reply.text[:200],
        )  # fmt: skip
        heard = reply.heard if interrupted else reply.text
        if not self._closing and not self._ended.is_set():
            # The brain's history just changed: evaluate its new prefix while the caller speaks.
            self._spawn(self._prewarm_brain(), "call-prewarm")
        if reply.clauses:
            if reply.fixed_text is not None:
                if heard:
                    self.brain.add_assistant_message(heard)
            elif interrupted:
                self.brain.record_heard(heard, interrupted=True)
            timings = reply.timings.as_ms(reply.first_audio)
            self._record_turn(
                "agent", reply.text, reply.started_at, self.clock.now(),
                heard=heard, interrupted=interrupted, timings=timings,
            )  # fmt: skip


def _rms(pcm: Int16Array) -> float:
    if pcm.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(np.square(pcm.astype(np.float32)))))
