"""Whisper speech recognition with faster-whisper (CTranslate2), loaded from a local directory.

One model per process, shared by every call. Decoding is blocking native work, so it runs in a small
executor of our own (``workers`` threads, matching CTranslate2's ``num_workers`` so that many
decodes can run at once without queueing on one model replica); the lazy segment generator that
``WhisperModel.transcribe`` returns is consumed inside that thread too, otherwise the decoding would
silently run on the event loop.

Cost note: faster-whisper pads every input to 30 s (3000 mel frames) before the encoder, so a decode
costs about the same for 1 s and 7 s of audio, and the encoder is most of it. Measured here (loaded
2-core box): encoding 3000 frames ~1.9 s, 1500 ~0.65 s, 1000 ~0.16 s; CTranslate2 accepts the shorter
input. Feeding a 10-15 s window directly to ``model.generate`` cut a decode 3-4x with equal or better
WER on clean telephone speech, but at 10 s one noisy utterance fell into a repetition loop ("5 5 5
..."), so it is not on by default: it needs a repetition guard and a bigger test corpus first. The
options that matter for latency live in :data:`DECODE_OPTIONS`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..model_manifest import ModelError
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

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


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
        segments, _info = self._model.transcribe(
            pcm16k, language=language or self.default_language, **self.options.kwargs()
        )
        parts = list(segments)  # the generator does the decoding: consume it here, in this thread
        text = " ".join(s.text.strip() for s in parts).strip()
        n = max(1, len(parts))
        return Transcript(
            text=text,
            audio_seconds=len(pcm16k) / SAMPLE_RATE,
            elapsed_seconds=time.perf_counter() - started,
            no_speech_prob=max((s.no_speech_prob for s in parts), default=0.0),
            avg_logprob=sum(s.avg_logprob for s in parts) / n,
        )

    def transcribe_sync(self, pcm16k: FloatArray, *, language: str | None = None) -> Transcript:
        return self._decode(self._check(pcm16k), language)

    async def transcribe(self, pcm16k: FloatArray, *, language: str | None = None) -> Transcript:
        """``pcm16k``: mono float32 in [-1, 1] at 16 kHz. Cancelling the awaiting task abandons the
        result; the decode already running in the worker finishes in the background (CTranslate2
        cannot be interrupted mid-decode)."""
        audio = self._check(pcm16k)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._decode, audio, language)

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
