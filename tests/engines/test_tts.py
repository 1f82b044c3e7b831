"""Piper TTS: audible speech of plausible length, streamed per sentence, understood by our own ASR
after the telephone path (22,050 Hz -> 8 kHz µ-law -> 16 kHz)."""

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.audio.resample import StreamResampler
from appliance.engines.asr import WhisperAsr
from appliance.engines.priority import CPU
from appliance.engines.tts import (
    PHRASE_MAX_CHARS,
    QUEUE_CHUNKS,
    PhraseCache,
    PiperTts,
    TtsLoadError,
    trim_leading_silence,
)
from appliance.runtime import HeapTrimmer, resident_bytes
from tests.engine_fixtures import load_tts
from tests.speech import dbfs, normalize_text, telephone_16k, wer

TEXT = "Thank you for calling the dental office. Your appointment is confirmed for Tuesday morning."


async def _collect(tts: PiperTts, text: str, **kw: float) -> list[np.ndarray]:
    return [chunk async for chunk in tts.synthesize(text, **kw)]


async def test_output_is_audible_speech_of_plausible_length(tts_engine: PiperTts) -> None:
    chunks = await _collect(tts_engine, TEXT)
    assert tts_engine.sample_rate == 22050
    assert all(c.dtype == np.int16 and c.ndim == 1 for c in chunks)
    audio = np.concatenate(chunks)
    seconds = len(audio) / tts_engine.sample_rate
    words = len(normalize_text(TEXT))
    # Conversational speech runs ~2-4 words per second, plus short pauses at the sentence ends.
    assert words / 4.5 < seconds < words / 1.5
    assert dbfs(audio) > -30.0  # clearly audible, not a whisper or silence
    assert np.abs(audio).max() > 8000


def _first_voiced_ms(pcm: np.ndarray, rate: int, floor_dbfs: float = -50.0) -> float:
    """Where a listener starts hearing ``pcm``: its first 20 ms frame above ``floor_dbfs``."""
    frame = rate // 50
    for i in range(0, pcm.size - frame + 1, frame):
        if dbfs(pcm[i : i + frame]) > floor_dbfs:
            return i * 1000.0 / rate
    return pcm.size * 1000.0 / rate


def test_leading_silence_is_trimmed_to_a_short_lead_and_a_soft_onset_kept() -> None:
    rate = 22050
    t = np.arange(rate // 2) / rate
    tone = (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
    quiet = np.random.default_rng(0).normal(0, 3, rate * 4 // 10).astype(np.int16)  # 400 ms at ~-80 dBFS
    soft = (30 * np.sin(2 * np.pi * 3000 * t[: rate // 20]) + 45).astype(np.int16)  # 50 ms at ~-55 dBFS
    trimmed = trim_leading_silence(np.concatenate([quiet, soft, tone]), rate)
    lead = trimmed.size - soft.size - tone.size
    assert 0 < lead <= rate * 30 // 1000 + rate // 200, lead  # at most 30 ms (+ one window) before it
    assert np.array_equal(trimmed[-(soft.size + tone.size) :], np.concatenate([soft, tone]))
    assert np.array_equal(trim_leading_silence(tone, rate), tone)
    assert np.array_equal(trim_leading_silence(quiet, rate), quiet)  # nothing above the floor: as it is
    assert trim_leading_silence(np.zeros(0, np.int16), rate).size == 0


def test_a_sentence_starts_without_the_voices_random_long_pause(tts_engine: PiperTts) -> None:
    # The voice samples the pause before the first sound: ~40 or ~400 ms for these, about half the
    # time each. A caller waits through it; every sentence now starts within ~60 ms.
    # (Synthesized afresh each time: the phrase cache would replay the first one.)
    leads = [
        _first_voiced_ms(tts_engine.synthesize_sync(text), tts_engine.sample_rate)
        for text in ("He was not", "Five of clubs.") * 4
    ]
    assert max(leads) <= 60, leads


async def test_one_chunk_per_sentence(tts_engine: PiperTts) -> None:
    chunks = await _collect(tts_engine, "Hello. How are you today? I can help with that.")
    assert len(chunks) == 3


async def test_speed_changes_duration(tts_engine: PiperTts) -> None:
    normal = np.concatenate(await _collect(tts_engine, TEXT))
    fast = np.concatenate(await _collect(tts_engine, TEXT, speed=1.5))
    assert len(fast) < 0.8 * len(normal)
    with pytest.raises(ValueError):
        await _collect(tts_engine, TEXT, speed=0.0)


async def test_empty_text_yields_nothing(tts_engine: PiperTts) -> None:
    assert await _collect(tts_engine, "   ") == []


async def test_speech_survives_the_phone_line_and_asr_understands_it(
    tts_engine: PiperTts, asr_engine: WhisperAsr
) -> None:
    # Resample chunk by chunk, as the call path does on the way to Plivo.
    to_phone = StreamResampler(tts_engine.sample_rate, 8000, dtype=np.int16)
    parts = [to_phone.process(chunk) async for chunk in tts_engine.synthesize(TEXT)]
    pcm8k = np.concatenate([*parts, to_phone.flush()])
    transcript = await asr_engine.transcribe(telephone_16k(pcm8k, rate=8000))
    words = set(normalize_text(transcript.text))
    assert {"dental", "appointment", "confirmed", "tuesday"} <= words, transcript.text
    assert wer(TEXT, transcript.text) <= 0.2, transcript.text


def _instrument(tts: PiperTts, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the sentences the workers synthesize."""
    produced: list[int] = []
    original = tts._next_sentence

    def counting(utterance: Any) -> np.ndarray | None:
        pcm = original(utterance)
        if pcm is not None:
            produced.append(len(pcm))
        return pcm

    monkeypatch.setattr(tts, "_next_sentence", counting)
    return produced


async def _settled(produced: list[int]) -> int:
    """How many sentences were synthesized, once no more come (a sentence takes ~0.1-0.2 s)."""
    for _ in range(60):
        before = len(produced)
        await asyncio.sleep(0.5)
        if len(produced) == before:
            return before
    raise AssertionError("synthesis never stopped")


LONG_TEXT = " ".join(f"This is sentence number {i} of a long answer." for i in range(20))


async def test_closing_the_iterator_stops_synthesis(
    tts_engine: PiperTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    produced = _instrument(tts_engine, monkeypatch)
    stream = tts_engine.synthesize(LONG_TEXT)
    first = await anext(stream)
    assert len(first) > 0
    await stream.aclose()
    # At most: the one taken, the queue's worth, one being put and one being synthesized.
    assert await _settled(produced) <= 1 + QUEUE_CHUNKS + 2 < 20


async def test_cancelling_the_consumer_stops_synthesis(
    tts_engine: PiperTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    produced = _instrument(tts_engine, monkeypatch)
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in tts_engine.synthesize(LONG_TEXT):
            got_one.set()
            await asyncio.sleep(3600)  # a consumer stuck on playout, then interrupted

    task = asyncio.create_task(consume())
    await got_one.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _settled(produced) < 20


async def test_slow_consumer_bounds_the_backlog(
    tts_engine: PiperTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    produced = _instrument(tts_engine, monkeypatch)
    stream = tts_engine.synthesize(LONG_TEXT)
    await anext(stream)
    # Give the worker ample time to run ahead; the bounded queue must hold it back.
    for _ in range(40):
        await asyncio.sleep(0.05)
    assert len(produced) <= 1 + QUEUE_CHUNKS + 1
    await stream.aclose()
    assert await _settled(produced) <= 1 + QUEUE_CHUNKS + 2


def test_corrupt_voice_file_names_the_file(tmp_path: Path, tts_engine: PiperTts) -> None:
    shutil.copy(tts_engine.model_dir / "voice.onnx.json", tmp_path / "voice.onnx.json")
    (tmp_path / "voice.onnx").write_bytes(b"\x08\x01garbage" * 500)
    with pytest.raises(TtsLoadError, match=str(tmp_path / "voice.onnx")):
        PiperTts("broken", tmp_path, threads=1)
    with pytest.raises(TtsLoadError, match="missing file"):
        PiperTts("absent", tmp_path / "none", threads=1)


async def test_paused_consumers_do_not_starve_other_calls(tts_engine: PiperTts) -> None:
    # Calls whose playout is behind keep their streams open; that must not hold the worker pool.
    paused = [tts_engine.synthesize(LONG_TEXT) for _ in range(4)]
    try:
        for stream in paused:
            await anext(stream)
        async with asyncio.timeout(120):  # a guard against a hang, not a latency assertion
            chunks = await _collect(tts_engine, "Still here.")
        assert len(chunks) == 1
    finally:
        for stream in paused:
            await stream.aclose()


# -- the phrase cache ------------------------------------------------------------------------------


def test_phrase_cache_evicts_least_recently_used_by_bytes() -> None:
    cache = PhraseCache(max_bytes=3000)
    chunk = np.ones(500, dtype=np.int16)  # 1000 bytes
    keys = [PhraseCache.key(f"phrase {i}", 1.0) for i in range(3)]
    assert all(key is not None for key in keys)
    for key in keys:
        cache.put(key, [chunk])  # type: ignore[arg-type]
    assert cache.get(keys[0]) is not None  # now the most recently used
    cache.put(PhraseCache.key("phrase 3", 1.0), [chunk])  # type: ignore[arg-type]
    assert cache.get(keys[1]) is None  # the least recently used went
    assert cache.get(keys[0]) is not None and cache.get(keys[2]) is not None
    assert cache.bytes == 3000 and len(cache) == 3
    assert (cache.hits, cache.misses) == (3, 1)


def test_phrase_cache_keeps_only_short_phrases_and_frozen_copies() -> None:
    assert PhraseCache.key("x" * (PHRASE_MAX_CHARS + 1), 1.0) is None
    assert PhraseCache.key("  You have ", 1.0) == ("You have", 1.0)
    assert PhraseCache.key("You have", 1.0) != PhraseCache.key("You have", 1.5)
    cache = PhraseCache(max_bytes=1000)
    key = ("You have", 1.0)
    cache.put(key, [np.ones(600, dtype=np.int16)])  # bigger than the whole cache
    assert cache.get(key) is None and cache.bytes == 0
    source = np.arange(100, dtype=np.int16)
    cache.put(key, [source])
    source[:] = 0  # the producer's buffer may be reused; the cache must not see it
    (kept,) = cache.get(key) or ()
    assert kept[5] == 5 and not kept.flags.writeable


async def test_a_repeated_short_clause_is_replayed_without_synthesis(
    tts_engine: PiperTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    produced = _instrument(tts_engine, monkeypatch)
    text = "Sure, one moment."
    first = await _collect(tts_engine, text)
    synthesized = len(produced)
    assert synthesized == 1
    hits = tts_engine.phrases.hits
    again = await _collect(tts_engine, f" {text} ")
    assert len(produced) == synthesized  # no new synthesis
    assert tts_engine.phrases.hits == hits + 1
    assert [c.tolist() for c in again] == [c.tolist() for c in first]
    # Another speed is other audio.
    await _collect(tts_engine, text, speed=1.25)
    assert len(produced) == synthesized + 1


async def test_a_clause_cut_short_is_not_cached(
    tts_engine: PiperTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    produced = _instrument(tts_engine, monkeypatch)
    text = "First part. Second part. Third part."
    stream = tts_engine.synthesize(text)
    await anext(stream)
    await stream.aclose()  # a barge-in
    await _settled(produced)
    assert tts_engine.phrases.key(text, 1.0) not in tts_engine.phrases._items
    before = len(produced)
    assert len(await _collect(tts_engine, text)) == 3
    assert len(produced) == before + 3  # synthesized in full, not replayed from a partial entry


async def test_cache_off_synthesizes_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    tts = load_tts()
    uncached = PiperTts("uncached", tts.model_dir, threads=1, phrase_cache_bytes=0)
    try:
        produced = _instrument(uncached, monkeypatch)
        for _ in range(2):
            await _collect(uncached, "Sure.")
        assert len(produced) == 2 and len(uncached.phrases) == 0
    finally:
        uncached.close()


# -- memory ----------------------------------------------------------------------------------------

RUN_ON = (
    "Eight of spades four of clubs seven of hearts two of diamonds ace of spades king of hearts queen "
    "of clubs jack of diamonds and the ten of spades as well as the nine of hearts and the three"
)


def _resident_after_trim() -> float:
    HeapTrimmer(min_interval_s=0).trim()
    return (resident_bytes() or 0) / 2**20


@pytest.mark.skipif(not HeapTrimmer().available, reason="needs glibc's malloc_trim")
def test_long_sentences_leave_no_memory_behind_without_the_arena() -> None:
    path = load_tts().model_dir
    results = {}
    for arena in (True, False):
        tts = PiperTts(f"arena-{arena}", path, threads=2, memory_arena=arena, phrase_cache_bytes=0)
        try:
            before = _resident_after_trim()
            for _ in range(2):
                tts.synthesize_sync(RUN_ON)
            results[arena] = _resident_after_trim() - before
        finally:
            tts.close()
            del tts
    # With onnxruntime's arena a 180-character sentence keeps ~200 MB; without it, nothing.
    assert results[True] > 80, results
    assert results[False] < 20, results


async def test_synthesis_counts_as_engine_work_and_a_first_clause_as_urgent(
    tts_engine: PiperTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LLM steps with fewer threads beside any synthesis, and puts background steps off beside
    an urgent one (engines.priority)."""
    seen: list[tuple[int, int]] = []
    real_next = tts_engine._next_sentence

    def next_sentence(utterance: Any) -> np.ndarray | None:
        pcm = real_next(utterance)
        if pcm is not None:
            seen.append((CPU.working_now, CPU.urgent_now))  # in the worker, mid-synthesis
        return pcm

    monkeypatch.setattr(tts_engine, "_next_sentence", next_sentence)
    monkeypatch.setattr(tts_engine.phrases, "max_bytes", 0)
    assert len([c async for c in tts_engine.synthesize("Later clauses. Of a reply.")]) == 2
    assert seen == [(1, 0), (1, 0)]
    seen.clear()
    assert len([c async for c in tts_engine.synthesize("A first clause.", urgent=True)]) == 1
    assert seen == [(1, 1)]
    assert CPU.working_now == 0 and CPU.urgent_now == 0


# -- abandoning background work for urgent work ----------------------------------------------------

ONE_LONG_SENTENCE = (
    "Your order of three boxes of printer paper, two packs of blue pens and one large stapler "
    "left our warehouse this morning and should reach your office by Thursday afternoon at the latest."
)


class _Runs:
    """Wraps ``_next_sentence``: signals each run's start and records how each ended."""

    def __init__(self, tts: PiperTts, monkeypatch: pytest.MonkeyPatch):
        self.started: list[threading.Event] = [threading.Event() for _ in range(4)]
        self.outcomes: list[str] = []
        self.start_times: list[float] = []
        original = tts._next_sentence

        def recorded(utterance: Any) -> np.ndarray | None:
            self.start_times.append(time.monotonic())
            self.started[len(self.outcomes)].set()
            try:
                pcm = original(utterance)
            except Exception:
                self.outcomes.append("terminated")
                raise
            self.outcomes.append("done" if pcm is not None else "end")
            return pcm

        monkeypatch.setattr(tts, "_next_sentence", recorded)


def _urgent_for(seconds: float) -> float:
    """Urgent work of another engine, in another thread; returns when it ended."""
    with CPU.urgent():
        time.sleep(seconds)
    return time.monotonic()


async def test_a_background_sentence_is_abandoned_for_urgent_work_and_redone_once_after_it(
    tts_engine: PiperTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tts_engine.phrases, "max_bytes", 0)
    plain = np.concatenate(await _collect(tts_engine, ONE_LONG_SENTENCE))
    runs = _Runs(tts_engine, monkeypatch)
    before = tts_engine.abandoned
    task = asyncio.create_task(_collect(tts_engine, ONE_LONG_SENTENCE, abandonable=True))
    assert await asyncio.to_thread(runs.started[0].wait, 30.0)
    urgent_ended = await asyncio.to_thread(_urgent_for, 0.3)
    # The redo waits for the urgent work to end, and is not abandoned for the next one.
    assert await asyncio.to_thread(runs.started[1].wait, 30.0)
    await asyncio.to_thread(_urgent_for, 0.05)
    chunks = await task
    assert runs.outcomes == ["terminated", "done", "end"]
    assert runs.start_times[1] >= urgent_ended - 0.05
    assert tts_engine.abandoned == before + 1
    assert len(chunks) == 1
    # The whole sentence: Piper's durations vary a little from run to run, not by a third.
    assert 0.75 < len(chunks[0]) / len(plain) < 1.33
    assert dbfs(chunks[0]) > -30


async def test_only_abandonable_background_work_is_abandoned(
    tts_engine: PiperTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tts_engine.phrases, "max_bytes", 0)
    before = tts_engine.abandoned
    for kwargs in ({}, {"urgent": True, "abandonable": True}):
        runs = _Runs(tts_engine, monkeypatch)
        task = asyncio.create_task(_collect(tts_engine, ONE_LONG_SENTENCE, **kwargs))
        assert await asyncio.to_thread(runs.started[0].wait, 30.0)
        await asyncio.to_thread(_urgent_for, 0.1)
        assert len(await task) == 1
        assert runs.outcomes == ["done", "end"], kwargs
    assert tts_engine.abandoned == before


async def test_a_consumer_that_leaves_terminates_the_sentence_under_way(
    tts_engine: PiperTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tts_engine.phrases, "max_bytes", 0)
    runs = _Runs(tts_engine, monkeypatch)
    task = asyncio.create_task(_collect(tts_engine, ONE_LONG_SENTENCE + " " + ONE_LONG_SENTENCE, urgent=True))
    assert await asyncio.to_thread(runs.started[0].wait, 30.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if runs.outcomes:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert runs.outcomes == ["terminated"]  # and no second sentence started
    assert not runs.started[1].is_set()
