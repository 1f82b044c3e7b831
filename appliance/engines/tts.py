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

Short clauses repeat: an agent opens most answers the same few ways ("You have", "Sure,", its
greeting). Their audio is kept in a bounded LRU (``phrase_cache_bytes``) and replayed at once, which
more than wins back the arena's cost on the clause the caller waits for, whenever it repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..model_manifest import ModelError
from .priority import CPU
from .types import Int16Array

log = logging.getLogger(__name__)

QUEUE_CHUNKS = 2
_DONE = object()
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
        self._voice = PiperVoice(session=session, config=config)
        self.sample_rate: int = config.sample_rate
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"tts-{voice_id}")
        self._active = 0  # synthesize() calls in progress (running or waiting for a worker)
        self.phrases = PhraseCache(phrase_cache_bytes)  # only touched on the event loop
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

    def _chunks(self, text: str, speed: float) -> Generator[Int16Array, None, None]:
        from piper.config import SynthesisConfig

        config = SynthesisConfig(length_scale=self._voice.config.length_scale / speed)
        for chunk in self._voice.synthesize(text, syn_config=config):
            yield chunk.audio_int16_array

    def synthesize_sync(self, text: str, *, speed: float = 1.0) -> Int16Array:
        """The whole utterance at once (tests, benchmarks, offline rendering)."""
        parts = list(self._chunks(text, _check_speed(speed))) if text.strip() else []
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)

    async def synthesize(
        self, text: str, *, speed: float = 1.0, urgent: bool = False
    ) -> AsyncGenerator[Int16Array, None]:
        """Yield mono int16 PCM at ``sample_rate``, one chunk per sentence, as each is produced.
        ``urgent``: the LLM pauses between tokens while this is synthesized (``engines.priority``).
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
        producer = asyncio.create_task(self._produce(self._chunks(text, speed), queue, urgent))
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
            # Closed or cancelled early: stop before the next sentence. A sentence already being
            # synthesized in the worker finishes there and is dropped; the producer itself ends at
            # once, and ``asyncio.wait`` neither raises its cancellation nor swallows ours.
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
        self, sentences: Generator[Int16Array, None, None], queue: asyncio.Queue[object], urgent: bool
    ) -> None:
        """Step the blocking Piper generator one sentence per worker job, so a thread is held only
        while synthesizing, never while the consumer is slow (the wait happens here, on the queue)."""
        job: Future[Int16Array | None] | None = None
        try:
            while True:
                job = self._executor.submit(_next_urgent if urgent else _next_background, sentences, None)
                pcm = await asyncio.wrap_future(job)
                if pcm is None:
                    break
                await queue.put(pcm)
        except Exception as exc:  # handed to the consumer and raised there
            await queue.put(exc)
            return
        finally:
            # Release Piper's generator as soon as no worker is inside it: now, or when the sentence
            # still being synthesized for a consumer that left is done.
            if job is None:
                sentences.close()
            else:
                job.add_done_callback(lambda _: sentences.close())
        await queue.put(_DONE)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _next_urgent(sentences: Generator[Int16Array, None, None], default: None) -> Int16Array | None:
    with CPU.urgent():
        return next(sentences, default)


def _next_background(sentences: Generator[Int16Array, None, None], default: None) -> Int16Array | None:
    with CPU.working():
        return next(sentences, default)


def _check_speed(speed: float) -> float:
    if not 0.25 <= speed <= 4.0:
        raise ValueError(f"speed must be between 0.25 and 4.0, got {speed}")
    return speed
