"""Turn detection over VAD speech probabilities (one per 32 ms window), plus the caller's utterance
audio in a bounded buffer with a little pre-roll.

Speech starts only after a few consecutive voiced windows (hysteresis: a higher threshold to start,
a lower one to stay voiced), so one loud click does not open a turn. A turn ends after
``end_of_turn_silence_ms`` of silence, or after the wait set for this utterance with
``set_turn_silence`` once its words are known (shorter after a complete sentence, longer after "and"
or half a number). It counts only if it held at least ``min_utterance_ms`` of voiced audio, otherwise
it was a click or a cough and is discarded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ..engines.types import FloatArray

WINDOW_MS = 32.0


@dataclass(frozen=True)
class SpeechStarted:
    onset: float  # clock time of the first voiced window of this speech


@dataclass(frozen=True)
class SpeechProgress:
    """Emitted on every voiced window while speech goes on: lets the session decide barge-in."""

    voiced_ms: float


@dataclass(frozen=True)
class SpeechPaused:
    """The caller went quiet for a short while: a good moment to start transcribing early.
    ``quick``: after ``quick_pause_ms``, sooner than the usual ``pause_ms`` (which follows if the
    silence goes on): worth acting on when the work is cheap, i.e. the cores are free."""

    voiced_ms: float
    last_voiced: float
    quick: bool = False


@dataclass(frozen=True)
class TurnEnded:
    onset: float
    last_voiced: float  # clock time the last voiced window arrived
    decided: float  # clock time the end-of-turn decision was taken
    voiced_ms: float


@dataclass(frozen=True)
class SpeechDiscarded:
    """Speech that ended without enough voiced audio to be a turn (click, cough, blip)."""

    onset: float
    voiced_ms: float


TurnEvent = SpeechStarted | SpeechProgress | SpeechPaused | TurnEnded | SpeechDiscarded


class TurnDetector:
    def __init__(
        self,
        *,
        end_of_turn_silence_ms: float,
        min_utterance_ms: float,
        start_threshold: float = 0.5,
        stay_threshold: float = 0.35,
        start_windows: int = 2,
        pause_ms: float = 250.0,
        quick_pause_ms: float = 0.0,
        window_ms: float = WINDOW_MS,
    ):
        self.end_of_turn_silence_ms = end_of_turn_silence_ms
        self.min_utterance_ms = min_utterance_ms
        self.start_threshold = start_threshold
        self.stay_threshold = stay_threshold
        self.start_windows = start_windows
        self.pause_ms = min(pause_ms, end_of_turn_silence_ms)
        # 0 (or not below ``pause_ms``): no quick pause.
        self.quick_pause_ms = quick_pause_ms if 0 < quick_pause_ms < self.pause_ms else 0.0
        self.window_ms = window_ms
        self.reset()

    def reset(self) -> None:
        self.in_speech = False
        self._run = 0  # consecutive voiced windows while idle
        self._run_onset = 0.0
        self._onset = 0.0
        self._voiced_ms = 0.0
        self._silence_ms = 0.0
        self._last_voiced = 0.0
        self._paused_sent = False
        self._quick_sent = False
        self._turn_silence_ms: float | None = None

    def set_turn_silence(self, ms: float | None) -> None:
        """The silence that ends the current utterance, decided from what the caller said so far;
        forgotten as soon as they speak again. ``None``: back to ``end_of_turn_silence_ms``."""
        if self.in_speech:
            self._turn_silence_ms = None if ms is None else max(ms, self.window_ms)

    @property
    def silence_ms(self) -> float:
        """Silence since the last voiced window of the current utterance."""
        return self._silence_ms if self.in_speech else 0.0

    @property
    def voiced_ms(self) -> float:
        return self._voiced_ms if self.in_speech else 0.0

    def push(self, prob: float, now: float) -> list[TurnEvent]:
        """Feed one window's probability, received at clock time ``now``."""
        events: list[TurnEvent] = []
        if not self.in_speech:
            if prob >= self.start_threshold:
                if self._run == 0:
                    self._run_onset = now - self.window_ms / 1000.0
                self._run += 1
                if self._run >= self.start_windows:
                    self.in_speech = True
                    self._onset = self._run_onset
                    self._voiced_ms = self._run * self.window_ms
                    self._silence_ms = 0.0
                    self._last_voiced = now
                    self._paused_sent = self._quick_sent = False
                    self._turn_silence_ms = None
                    self._run = 0
                    events.append(SpeechStarted(self._onset))
                    events.append(SpeechProgress(self._voiced_ms))
            else:
                self._run = 0
            return events

        if prob >= self.stay_threshold:
            self._voiced_ms += self.window_ms
            self._silence_ms = 0.0
            self._last_voiced = now
            self._paused_sent = self._quick_sent = False
            self._turn_silence_ms = None
            events.append(SpeechProgress(self._voiced_ms))
            return events

        self._silence_ms += self.window_ms
        if self.quick_pause_ms and not self._quick_sent and self._silence_ms >= self.quick_pause_ms:
            self._quick_sent = True
            if self._voiced_ms >= self.min_utterance_ms:
                events.append(SpeechPaused(self._voiced_ms, self._last_voiced, quick=True))
        if not self._paused_sent and self._silence_ms >= self.pause_ms:
            self._paused_sent = True
            if self._voiced_ms >= self.min_utterance_ms:
                events.append(SpeechPaused(self._voiced_ms, self._last_voiced))
        wait = self.end_of_turn_silence_ms if self._turn_silence_ms is None else self._turn_silence_ms
        if self._silence_ms >= wait:
            if self._voiced_ms >= self.min_utterance_ms:
                events.append(TurnEnded(self._onset, self._last_voiced, now, self._voiced_ms))
            else:
                events.append(SpeechDiscarded(self._onset, self._voiced_ms))
            self.in_speech = False
            self._voiced_ms = 0.0
            self._silence_ms = 0.0
            self._turn_silence_ms = None
        return events


class UtteranceBuffer:
    """The caller's audio for the current utterance (16 kHz float32), capped at ``max_seconds``.

    While nobody is speaking only the last ``preroll_ms`` are kept, so the words' first phoneme (heard
    by the VAD a window or two late) is not cut off when speech starts."""

    def __init__(self, sample_rate: int = 16000, *, max_seconds: float = 30.0, preroll_ms: float = 300.0):
        self.sample_rate = sample_rate
        self.max_samples = int(sample_rate * max_seconds)
        self.preroll_samples = int(sample_rate * preroll_ms / 1000.0)
        self._chunks: deque[FloatArray] = deque()
        self._size = 0
        self.collecting = False

    def __len__(self) -> int:
        return self._size

    def append(self, pcm: FloatArray) -> None:
        if pcm.size == 0:
            return
        self._chunks.append(pcm)
        self._size += pcm.size
        limit = self.max_samples if self.collecting else self.preroll_samples
        # Drop whole chunks from the front while the rest still covers the limit.
        while self._chunks and self._size - self._chunks[0].size >= limit:
            self._size -= self._chunks.popleft().size

    def start(self) -> None:
        self.collecting = True

    def snapshot(self) -> FloatArray:
        """The utterance so far, without ending it (for an early or partial transcription)."""
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        audio = np.concatenate(list(self._chunks)).astype(np.float32, copy=False)
        return audio[-self.max_samples :]

    def take(self) -> FloatArray:
        """End the utterance: return its audio and go back to keeping only the pre-roll."""
        audio = self.snapshot()
        self._chunks.clear()
        self._size = 0
        self.collecting = False
        return audio

    def stop(self) -> None:
        """Forget the utterance (it was noise)."""
        self.collecting = False
        while self._chunks and self._size - self._chunks[0].size >= self.preroll_samples:
            self._size -= self._chunks.popleft().size
