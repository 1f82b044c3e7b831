"""Piper text-to-speech (piper-tts 1.8, onnxruntime), streamed sentence by sentence.

Piper's ``synthesize`` is a blocking generator that phonemizes the text (espeak-ng) and then runs the
voice model once per sentence. We step it one sentence per job on a small worker pool and hand each
sentence's int16 samples to the caller through a bounded queue: the caller hears the first sentence
while the next is being synthesized, a slow consumer holds the producer back (at most
``QUEUE_CHUNKS`` sentences wait) without holding a worker thread, and closing the async iterator (or
cancelling its consumer) stops synthesis before the next sentence.

We build the onnxruntime session ourselves instead of ``PiperVoice.load`` because ``load`` leaves
thread counts at onnxruntime's default (all cores), which oversubscribes a small machine, and keeps
onnxruntime's CPU memory arena on. The arena never gives memory back and grows to the largest
sentence synthesized so far, in steps that depend on the order of requests: measured, +180-380 MB
over the 150 MB without it, and still creeping (+12 MB in 36 sentences of at most 110 characters)
after a warm-up with the longest one. Without it the process's memory stays flat and synthesis takes
15-40% longer (a 26-character clause 111-124 ms with the arena, 149-162 ms without, 2-core VM;
raising glibc's mmap threshold instead to keep freed buffers in the heap won part of that back but
slowed Whisper a little).

A later clause is synthesized in the background while earlier ones play. When urgent work starts
(a transcription, another call's first clause), a background run in progress is terminated
(onnxruntime's ``RunOptions.terminate``, checked between the graph's nodes) and that sentence is
redone once the urgent work is over, never abandoned twice; a consumer that leaves terminates the
run under way the same way, instead of letting a sentence nobody will hear finish. Measured on this
2-core box: a transcription of 3 s of telephone speech started during a 170-character background
clause took 279 ms beside it, 206 ms when the clause was abandoned (189 ms alone); the clause ended
130 ms later than otherwise (docs/capacity.md).

Short clauses repeat: an agent opens most answers the same few ways ("You have", "Sure,", its
greeting). Their audio is kept in a bounded LRU (``phrase_cache_bytes``) and replayed at once, which
more than wins back the arena's cost on the clause the caller waits for, whenever it repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..model_manifest import ModelError
from .priority import CPU
from .types import Int16Array

log = logging.getLogger(__name__)

QUEUE_CHUNKS = 2
# Piper samples the length of the pause before a sentence's first sound: for the same text it is
# sometimes ~40 ms, sometimes ~400 ms of near-silence (-70 to -95 dBFS; "He was not", "Five of clubs."
# on joe-medium, about half the time). A caller hears that as the agent answering later, so each
# sentence starts at most ``LEAD_KEEP_MS`` before its first window above ``LEAD_FLOOR_DBFS``.
LEAD_FLOOR_DBFS = -60.0
LEAD_WINDOW_MS = 5
LEAD_KEEP_MS = 30
_DONE = object()
_ABANDONED = object()
# A background sentence abandoned for urgent work is redone once that work is over, or after this
# long at most (then beside it: a sentence is abandoned only once, so background work cannot starve).
REDO_AFTER_MAX_S = 0.3
_POLL_S = 0.02
# Only clauses this short are kept: a long one rarely repeats word for word.
PHRASE_MAX_CHARS = 100
PHRASE_CACHE_BYTES = 8 * 2**20


class PhraseCache:
    """Least-recently-used synthesized audio per (text, speed), bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, max_bytes)
        self._items: OrderedDict[tuple[str, float], tuple[Int16Array, ...]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    @staticmethod
    def key(text: str, speed: float) -> tuple[str, float] | None:
        """The cache key for ``text``, or None when the text is too long to be worth keeping."""
        text = text.strip()
        return (text, speed) if len(text) <= PHRASE_MAX_CHARS else None

    def get(self, key: tuple[str, float]) -> tuple[Int16Array, ...] | None:
        chunks = self._items.get(key)
        if chunks is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return chunks

    def put(self, key: tuple[str, float], chunks: Sequence[Int16Array]) -> None:
        size = sum(chunk.nbytes for chunk in chunks)
        if size > self.max_bytes or key in self._items:
            return
        frozen = []
        for chunk in chunks:
            copy = np.array(chunk, dtype=np.int16)
            copy.flags.writeable = False  # shared by every later caller of this phrase
            frozen.append(copy)
        self._items[key] = tuple(frozen)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= sum(chunk.nbytes for chunk in dropped)


class _RunScopedSession:
    """The voice model's session as Piper sees it: each run takes the ``RunOptions`` its worker
    thread set (``scoped``), so that another thread can terminate that run while it is under way."""

    def __init__(self, session: ort.InferenceSession):
        self._session = session
        self._local = threading.local()

    @contextlib.contextmanager
    def scoped(self, options: ort.RunOptions) -> Iterator[None]:
        self._local.options = options
        try:
            yield
        finally:
            self._local.options = None

    def run(self, output_names: Any, input_feed: dict[str, Any]) -> Any:
        return self._session.run(output_names, input_feed, getattr(self._local, "options", None))


@dataclass(eq=False)
class _Utterance:
    """One synthesis: its text, the phoneme ids of each sentence (once its first job has phonemized
    it) and how many sentences are done. Only one job at a time works on it."""

    text: str
    config: Any  # piper.config.SynthesisConfig
    sentences: list[list[int]] | None = None
    done: int = 0
    options: ort.RunOptions = field(default_factory=ort.RunOptions)  # of the latest job's run
    cancelled: bool = False  # its consumer left

    def cancel(self) -> None:
        """Called on the event loop: the job under way stops at the graph's next node, and none
        that starts later runs."""
        self.cancelled = True
        self.options.terminate = True


class TtsLoadError(ModelError):
    """The voice files are missing or unreadable; the message names the file."""


class PiperTts:
    def __init__(
        self,
        voice_id: str,
        model_dir: Path,
        *,
        threads: int = 1,
        workers: int = 2,
        memory_arena: bool = False,
        phrase_cache_bytes: int = PHRASE_CACHE_BYTES,
    ):
        from piper import PiperVoice
        from piper.config import PiperConfig

        self.voice_id = voice_id
        self.model_dir = Path(model_dir)
        model_path = self.model_dir / "voice.onnx"
        config_path = self.model_dir / "voice.onnx.json"
        for path in (model_path, config_path):
            if not path.is_file():
                raise TtsLoadError(f"voice {voice_id}: missing file {path}")
        try:
            config = PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            raise TtsLoadError(f"voice {voice_id}: invalid voice config {config_path}: {exc}") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = memory_arena  # see the module doc
        # Idle pool threads sleep instead of spinning: a spinning TTS thread steals the cores the
        # LLM needs between two sentences.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
            raise TtsLoadError(f"voice {voice_id}: cannot load {model_path}: {exc}") from exc
        self._session = _RunScopedSession(session)
        self._voice = PiperVoice(session=session, config=config)
        self._voice.session = self._session  # Piper only calls its run()
        self.sample_rate: int = config.sample_rate
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"tts-{voice_id}")
        self._active = 0  # synthesize() calls in progress (running or waiting for a worker)
        self.phrases = PhraseCache(phrase_cache_bytes)  # only touched on the event loop
        # Background runs under way that urgent work may terminate (``_abandon_background``).
        self._abandonable: dict[int, ort.RunOptions] = {}
        self._abandonable_lock = threading.Lock()
        self.abandoned = 0  # background sentences abandoned for urgent work, and redone
        CPU.on_urgent(self._abandon_background)
        self._warm_up()

    @property
    def queue_depth(self) -> int:
        """Utterances being synthesized or waiting for a worker."""
        return self._active

    def _warm_up(self) -> None:
        started = time.perf_counter()
        for _ in self._chunks("Hello there.", 1.0):
            pass
        log.info("tts %s warm in %.2fs", self.voice_id, time.perf_counter() - started)

    def _utterance(self, text: str, speed: float) -> _Utterance:
        from piper.config import SynthesisConfig

        return _Utterance(text, SynthesisConfig(length_scale=self._voice.config.length_scale / speed))

    def _chunks(self, text: str, speed: float) -> Generator[Int16Array, None, None]:
        utterance = self._utterance(text, speed)
        while (pcm := self._next_sentence(utterance)) is not None:
            yield pcm

    def _next_sentence(self, utterance: _Utterance) -> Int16Array | None:
        """Synthesize the utterance's next sentence (phonemizing it first if no job has yet), or
        None when all are done. Blocking; raises what onnxruntime raises for a terminated run."""
        if utterance.sentences is None:
            voice = self._voice
            utterance.sentences = [voice.phonemes_to_ids(p) for p in voice.phonemize(utterance.text) if p]
        if utterance.done >= len(utterance.sentences):
            return None
        with self._session.scoped(utterance.options):
            audio = self._voice.phoneme_ids_to_audio(utterance.sentences[utterance.done], utterance.config)
        utterance.done += 1
        return trim_leading_silence(_to_int16(np.asarray(audio, dtype=np.float32)), self.sample_rate)

    def synthesize_sync(self, text: str, *, speed: float = 1.0) -> Int16Array:
        """The whole utterance at once (tests, benchmarks, offline rendering)."""
        parts = list(self._chunks(text, _check_speed(speed))) if text.strip() else []
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)

    async def synthesize(
        self, text: str, *, speed: float = 1.0, urgent: bool = False, abandonable: bool = False
    ) -> AsyncGenerator[Int16Array, None]:
        """Yield mono int16 PCM at ``sample_rate``, one chunk per sentence, as each is produced.
        ``urgent``: the LLM pauses between tokens while this is synthesized (``engines.priority``).
        ``abandonable`` (background work only): a sentence under way when urgent work starts is
        abandoned and redone after it, at most once per sentence (see the module doc).
        A short clause synthesized before comes from the phrase cache at once, as read-only arrays."""
        speed = _check_speed(speed)
        if not text.strip():
            return
        key = PhraseCache.key(text, speed) if self.phrases.max_bytes else None
        cached = self.phrases.get(key) if key is not None else None
        if cached is not None:
            for chunk in cached:
                yield chunk
            return
        produced: list[Int16Array] = []  # kept for the cache when ``key`` says it may be
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        utterance = self._utterance(text, speed)
        producer = asyncio.create_task(self._produce(utterance, queue, urgent, abandonable and not urgent))
        self._active += 1  # only touched on the event loop
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    if key is not None:  # complete: safe to replay
                        self.phrases.put(key, produced)
                    break
                if isinstance(item, Exception):
                    raise item
                if key is not None:
                    produced.append(item)  # type: ignore[arg-type]
                yield item  # type: ignore[misc]
        finally:
            # Closed or cancelled early: stop before the next sentence. A sentence being
            # synthesized in a worker is terminated there; the producer itself ends at once, and
            # ``asyncio.wait`` neither raises its cancellation nor swallows ours.
            self._active -= 1
            producer.cancel()
            await asyncio.wait([producer])

    async def warm_phrase(self, text: str, *, speed: float = 1.0) -> bool:
        """Synthesize ``text`` into the phrase cache ahead of need (background priority), unless it
        is there already. False when it is too long to be kept or the cache is off."""
        speed = _check_speed(speed)
        key = PhraseCache.key(text, speed) if self.phrases.max_bytes and text.strip() else None
        if key is None:
            return False
        if key not in self.phrases:
            async with contextlib.aclosing(self.synthesize(text, speed=speed)) as chunks:
                async for _ in chunks:
                    pass
        return key in self.phrases

    async def _produce(
        self, utterance: _Utterance, queue: asyncio.Queue[object], urgent: bool, abandonable: bool
    ) -> None:
        """Synthesize one sentence per worker job, so a thread is held only while synthesizing,
        never while the consumer is slow (the wait happens here, on the queue)."""
        try:
            may_abandon = abandonable
            while True:
                job = self._executor.submit(self._job, utterance, urgent, may_abandon)
                pcm = await asyncio.wrap_future(job)
                if pcm is _ABANDONED:
                    self.abandoned += 1
                    may_abandon = False  # never twice for one sentence
                    await _urgent_work_over(REDO_AFTER_MAX_S)
                    continue
                if pcm is None:
                    break
                may_abandon = abandonable
                await queue.put(pcm)
        except asyncio.CancelledError:
            utterance.cancel()
            raise
        except Exception as exc:  # handed to the consumer and raised there
            await queue.put(exc)
            return
        await queue.put(_DONE)

    def _job(self, utterance: _Utterance, urgent: bool, abandonable: bool) -> Int16Array | object | None:
        """In a worker: the next sentence, None when there is none, or ``_ABANDONED`` when urgent
        work started before or while it ran."""
        with CPU.urgent() if urgent else CPU.working():
            options = utterance.options = ort.RunOptions()
            if utterance.cancelled:  # checked after the assignment: ``cancel`` sees one or the other
                return None
            if abandonable:
                with self._abandonable_lock:
                    self._abandonable[id(utterance)] = options
                # After registering: urgent work that starts from now on terminates the run.
                if CPU.urgent_now:
                    options.terminate = True
            try:
                return self._next_sentence(utterance)
            except Exception:
                if not options.terminate:
                    raise
                return None if utterance.cancelled else _ABANDONED
            finally:
                if abandonable:
                    with self._abandonable_lock:
                        self._abandonable.pop(id(utterance), None)

    def _abandon_background(self) -> None:
        """Urgent work starts (``CPU.on_urgent``, in its thread): terminate the background runs."""
        with self._abandonable_lock:
            for options in self._abandonable.values():
                options.terminate = True

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


async def _urgent_work_over(max_wait_s: float) -> None:
    waited = 0.0
    while CPU.urgent_now and waited < max_wait_s:
        await asyncio.sleep(_POLL_S)
        waited += _POLL_S


def _to_int16(audio: np.ndarray) -> Int16Array:
    """The voice model's output as Piper's own ``synthesize`` delivers it: peak-normalized, int16."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak < 1e-8:
        return np.zeros(audio.shape, dtype=np.int16)
    return np.clip(audio / peak * 32767.0, -32767.0, 32767.0).astype(np.int16)


def trim_leading_silence(pcm: Int16Array, sample_rate: int) -> Int16Array:
    """``pcm`` from ``LEAD_KEEP_MS`` before its first ``LEAD_WINDOW_MS`` window louder than
    ``LEAD_FLOOR_DBFS`` (a soft first consonant keeps its onset); unchanged if none is."""
    window = max(1, sample_rate * LEAD_WINDOW_MS // 1000)
    usable = pcm.size // window * window
    if usable == 0:
        return pcm
    frames = pcm[:usable].astype(np.float32).reshape(-1, window)
    loud = np.flatnonzero(
        np.sqrt(np.mean(np.square(frames), axis=1)) > 32768.0 * 10 ** (LEAD_FLOOR_DBFS / 20)
    )
    if loud.size == 0:
        return pcm
    start = max(0, int(loud[0]) * window - sample_rate * LEAD_KEEP_MS // 1000)
    return pcm[start:] if start else pcm


def _check_speed(speed: float) -> float:
    if not 0.25 <= speed <= 4.0:
        raise ValueError(f"speed must be between 0.25 and 4.0, got {speed}")
    return speed
