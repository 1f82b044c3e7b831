"""Whisper speech recognition with faster-whisper (CTranslate2), loaded from a local directory.

One model per process, shared by every call. Decoding is blocking native work, so it runs in a small
executor of our own (``workers`` threads, matching CTranslate2's ``num_workers`` so that many
decodes can run at once without queueing on one model replica); the lazy segment generator that
``WhisperModel.transcribe`` returns is consumed inside that thread too, otherwise the decoding would
silently run on the event loop.

Cost note: faster-whisper pads every input to 30 s (3000 mel frames) before the encoder, so a decode
costs about the same for 1 s and 7 s of audio, and the encoder is most of it. CTranslate2 accepts a
shorter encoder input, so a turn of up to ``window_s - 1`` seconds is decoded in a ``window_s`` window
(the audio, then zero features as faster-whisper pads). Measured on this 2-core box over the 10
pocketsphinx-testdata utterances through 8 kHz µ-law, mean corpus WER over clean, 10 dB and 20 dB
white noise and a background talker: 30 s window 0.20 at ~0.6 s a decode; 10 s 0.20 at ~0.2 s;
8 s (the default) 0.18 at ~0.15 s; 6 s 0.19; 4 s 0.20 with more fallbacks. A window just longer
than the audio (2-3 s) fell into repetition loops ("10 of clubs 10 of clubs 10"), and even at 10 s
one noisy digit string looped ("5 5 5 5 5 5 5 5 5"): Whisper was trained on 30 s windows and
predicts the end of speech less surely in a short one. So every short-window result passes a
repetition guard (:func:`looks_runaway`: too many words per second of audio, a repeated phrase, a
hit on the token limit) and a suspicious one is decoded again: first in a ``retry_window_s`` window
(16 s), then, if that loops too, the standard way. On "five five" through 8 kHz µ-law at 10-30 dB
SNR (15 noisy versions), the 8 s window looped in 10 and the 12 s window in 8, the 16 s window in
none; a 16 s decode costs ~0.25 s here against ~0.7 s for 30 s, so a loop now costs the caller
~0.45 s instead of ~0.9 s. ``window_s=None`` turns the short window off.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..model_manifest import ModelError
from .priority import CPU
from .types import FloatArray, Transcript

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")


@dataclass(frozen=True)
class DecodeOptions:
    """faster-whisper ``transcribe`` options for short conversational turns, kept in one place."""

    beam_size: int = 1  # greedy: beam search multiplies the decoder's cost
    best_of: int = 1
    temperature: float = 0.0  # no fallback ladder: one pass, predictable latency
    without_timestamps: bool = True  # no timestamp tokens to predict
    condition_on_previous_text: bool = False  # each turn stands alone; no hallucination carry-over
    vad_filter: bool = False  # our own Silero VAD already cut the utterance
    suppress_blank: bool = True
    # Per 30 s window. Fast speech is ~120 tokens per 30 s, so more is a hallucination loop.
    max_new_tokens: int | None = 192
    # Encoder window for short turns, in seconds (None: always the standard 30 s). See the module doc.
    window_s: float | None = 8.0
    # A longer window for a short-window decode that looped, before the standard 30 s (None: none).
    retry_window_s: float | None = 16.0

    def kwargs(self) -> dict[str, Any]:
        """The options ``WhisperModel.transcribe`` takes."""
        out = asdict(self)
        out.pop("window_s")
        out.pop("retry_window_s")
        return out


# A runaway decode in a short window says far more than the audio could hold, or repeats itself.
MAX_WORDS_PER_SECOND = 4.0
_REPEAT = re.compile(r"\b(\w+(?:\W+\w+){1,5}?)\W+\1\b", re.IGNORECASE)


def looks_runaway(text: str, audio_seconds: float, *, hit_token_limit: bool = False) -> bool:
    """Whether a transcript of ``audio_seconds`` of speech is probably a decoding loop, not speech.

    Conservative on purpose: a false alarm only costs a second, standard decode."""
    if hit_token_limit:
        return True
    words = re.findall(r"\w+", text)
    if len(words) > MAX_WORDS_PER_SECOND * max(audio_seconds, 1.0) + 1:
        return True
    # A phrase of two words or more said twice in a row ("ten of clubs ten of clubs"). A repeated
    # single word is allowed: callers do say "five five five".
    if _REPEAT.search(text):
        return True
    raw = text.encode("utf-8")
    return len(raw) > 60 and len(raw) / len(zlib.compress(raw)) > 2.4  # Whisper's own loop test


_LOOP = re.compile(r"\b(\w+(?:\W+\w+){1,5}?)(?:\W+\1\b)+", re.IGNORECASE)


def collapse_loop(text: str, audio_seconds: float) -> str | None:
    """The transcript a short-window decode meant before it looped ("ten of clubs ten of clubs ten
    of" -> "ten of clubs"), or None when collapsing repeats does not leave plausible speech."""

    def once(loop: re.Match[str]) -> str:
        # A phrase of one word said over and over ("5 5 5 5") is left to the standard decode.
        return loop.group(1) if len(set(re.findall(r"\w+", loop.group(1).lower()))) > 1 else loop.group(0)

    collapsed = _LOOP.sub(once, text)
    if collapsed == text:
        return None
    # A copy cut off by the token limit: "... ten of clubs ten of".
    words = collapsed.split()
    for size in range(min(5, len(words) // 2), 0, -1):
        tail = [w.lower() for w in words[-size:]]
        if any(tail == [w.lower() for w in words[i : i + size]] for i in range(len(words) - 2 * size + 1)):
            collapsed = " ".join(words[:-size])
            break
    collapsed = collapsed.strip()
    if not collapsed or looks_runaway(collapsed, audio_seconds):
        return None
    return collapsed


DECODE_OPTIONS = DecodeOptions()


class AsrLoadError(ModelError):
    """The ASR model directory is missing, incomplete or unreadable; the message names the path."""


class WhisperAsr:
    def __init__(
        self,
        model_id: str,
        model_dir: Path,
        *,
        threads: int = 2,
        device: str = "cpu",
        compute_type: str = "int8",
        workers: int = 1,
        default_language: str = "en",
        options: DecodeOptions = DECODE_OPTIONS,
    ):
        self.model_id = model_id
        self.model_dir = Path(model_dir)
        self.default_language = default_language
        self.options = options
        self.workers = workers
        for name in REQUIRED_FILES:
            if not (self.model_dir / name).is_file():
                raise AsrLoadError(f"ASR model {model_id}: missing file {self.model_dir / name}")
        from faster_whisper import WhisperModel  # heavy import, only when an ASR engine is built

        try:
            # A directory path, never a hub name: local_files_only makes any slip fail fast.
            self._model = WhisperModel(
                str(self.model_dir),
                device=device,
                compute_type=compute_type,
                cpu_threads=threads,
                num_workers=workers,
                local_files_only=True,
            )
        except Exception as exc:  # CTranslate2 raises RuntimeError/ValueError for bad files
            raise AsrLoadError(
                f"cannot load ASR model {model_id} from {self.model_dir / 'model.bin'}: {exc}"
            ) from exc
        from faster_whisper.tokenizer import Tokenizer

        self._tokenizer = Tokenizer(
            self._model.hf_tokenizer, self._model.model.is_multilingual, task="transcribe",
            language=default_language if self._model.model.is_multilingual else "en",
        )  # fmt: skip
        # Greedy, no timestamps: <|startoftranscript|> [language, task] <|notimestamps|>.
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        self._prompt_len = len(self._prompt)
        self._eot = self._tokenizer.eot
        self._max_length = 448  # Whisper's decoder context
        self.window_retries = 0  # short-window decodes redone in the longer retry window
        self.fallbacks = 0  # decodes redone the standard way after every short window looped
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"asr-{model_id}")
        self._warm_up()

    def _warm_up(self) -> None:
        # The first decode allocates and tunes kernels (~2x slower); pay it at load, not on a call.
        started = time.perf_counter()
        rng = np.random.default_rng(0)
        self._decode(rng.normal(0.0, 0.01, SAMPLE_RATE).astype(np.float32), self.default_language)
        log.info("asr %s warm in %.2fs", self.model_id, time.perf_counter() - started)

    def _decode(self, pcm16k: FloatArray, language: str | None) -> Transcript:
        started = time.perf_counter()
        seconds = len(pcm16k) / SAMPLE_RATE
        windows = self._windows(seconds)
        for attempt, window in enumerate(windows, start=1):
            result = self._decode_window(pcm16k, seconds, window)
            if result is not None:
                text, no_speech, logprob = result
                return Transcript(text, seconds, time.perf_counter() - started, no_speech, logprob)
            if attempt < len(windows):
                self.window_retries += 1
            else:
                self.fallbacks += 1
        segments, _info = self._model.transcribe(
            pcm16k, language=language or self.default_language, **self.options.kwargs()
        )
        parts = list(segments)  # the generator does the decoding: consume it here, in this thread
        text = " ".join(s.text.strip() for s in parts).strip()
        n = max(1, len(parts))
        return Transcript(
            text=text,
            audio_seconds=seconds,
            elapsed_seconds=time.perf_counter() - started,
            no_speech_prob=max((s.no_speech_prob for s in parts), default=0.0),
            avg_logprob=sum(s.avg_logprob for s in parts) / n,
        )

    def _windows(self, seconds: float) -> list[float]:
        """The short encoder windows to try for ``seconds`` of audio, in order (the standard 30 s
        decode comes after them all)."""
        windows: list[float] = []
        for window in (self.options.window_s, self.options.retry_window_s):
            # At least a second of padding after the speech: Whisper needs to see that it ended.
            if window is not None and seconds <= 28.0:
                window = max(float(window), math.ceil(seconds + 1.0))
                if window < 30.0 and (not windows or window > windows[-1]):
                    windows.append(window)
            if not windows:
                break  # no short window at all: the retry alone is not one either
        return windows

    def _decode_window(
        self, pcm16k: FloatArray, seconds: float, window: float
    ) -> tuple[str, float, float] | None:
        """Greedy decode with a short encoder window; None when the result looks like a loop."""
        import ctranslate2

        frames = int(window * 100)
        features = self._model.feature_extractor(pcm16k, padding=160)[:, :frames]
        if features.shape[1] < frames:
            features = np.pad(features, ((0, 0), (0, frames - features.shape[1])))
        encoded = self._model.model.encode(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None], dtype=np.float32)),
            to_cpu=False,
        )
        max_length = min(self._max_length, self._prompt_len + 12 + int(8 * seconds))
        result = self._model.model.generate(
            encoded, [self._prompt], beam_size=1, max_length=max_length, return_scores=True,
            return_no_speech_prob=True, suppress_blank=self.options.suppress_blank, suppress_tokens=[-1],
        )[0]  # fmt: skip
        ids = [t for t in result.sequences_ids[0] if t < self._eot]
        text = self._tokenizer.decode(ids).strip()
        hit_limit = len(result.sequences_ids[0]) + self._prompt_len >= max_length
        if looks_runaway(text, seconds, hit_token_limit=hit_limit):
            # A phrase repeated until the token limit: what came before the loop is the transcript
            # (a second, 30 s decode costs ~0.5 s on a CPU while the caller waits).
            collapsed = collapse_loop(text, seconds)
            if collapsed is None:
                log.info("asr: %g s window decode looks like a loop (%r); decoding again", window, text[:80])
                return None
            log.info("asr: %g s window decode looped (%r); kept %r", window, text[:80], collapsed)
            text = collapsed
        # As faster-whisper computes them (length penalty 1).
        avg_logprob = result.scores[0] * max(1, len(ids)) / (len(ids) + 1)
        return text, float(result.no_speech_prob), float(avg_logprob)

    def transcribe_sync(self, pcm16k: FloatArray, *, language: str | None = None) -> Transcript:
        return self._decode(self._check(pcm16k), language)

    async def transcribe(
        self, pcm16k: FloatArray, *, language: str | None = None, background: bool = False
    ) -> Transcript:
        """``pcm16k``: mono float32 in [-1, 1] at 16 kHz. Cancelling the awaiting task abandons the
        result; the decode already running in the worker finishes in the background (CTranslate2
        cannot be interrupted mid-decode). ``background``: nobody waits for this transcript (a
        turn's words so far, read ahead), so other calls' replies do not pause for it."""
        audio = self._check(pcm16k)
        loop = asyncio.get_running_loop()
        with self._pending_lock:
            self._pending += 1
        return await loop.run_in_executor(self._executor, self._counted_decode, audio, language, background)

    def _counted_decode(
        self, pcm16k: FloatArray, language: str | None, background: bool = False
    ) -> Transcript:
        # Counted down here, not in the awaiting task: a cancelled transcription keeps the worker
        # busy until CTranslate2 finishes it.
        try:
            # A caller has just paused and waits for the reply this transcript starts: the rest of
            # other calls' replies (background generation) pauses meanwhile.
            with CPU.working() if background else CPU.urgent():
                return self._decode(pcm16k, language)
        finally:
            with self._pending_lock:
                self._pending -= 1

    @property
    def queue_depth(self) -> int:
        """Transcriptions submitted and not yet finished (running or queued)."""
        return self._pending

    @staticmethod
    def _check(pcm16k: FloatArray) -> FloatArray:
        audio = np.asarray(pcm16k)
        if audio.ndim != 1:
            raise ValueError(f"expected mono audio (1-D), got shape {audio.shape}")
        if audio.dtype != np.float32:
            raise TypeError(f"expected float32 samples in [-1, 1], got {audio.dtype}")
        return audio

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
