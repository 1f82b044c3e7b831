"""Audio helpers for the simulated caller: WAV in/out at any rate, telephone noise, voicing."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

from appliance.audio import mulaw
from appliance.audio.resample import resample

RATE = 8000
FRAME_SAMPLES = 160  # 20 ms at 8 kHz
Pcm = npt.NDArray[np.int16]


def load_wav(path: Path) -> tuple[Pcm, int]:
    """A PCM WAV (8/16/24/32-bit, any channels) as mono int16 and its sample rate."""
    with wave.open(str(path), "rb") as wav:
        width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
        raw = wav.readframes(wav.getnframes())
    if width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.int32) - 128) << 8
    elif width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.int32)
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        data = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8) >> 16  # sign-extend, keep top 16 bits
    elif width == 4:
        data = np.frombuffer(raw, "<i4").astype(np.int64) >> 16
    else:
        raise ValueError(f"{path}: unsupported sample width {width}")
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1)
    return np.clip(data, -32768, 32767).astype(np.int16), rate


def to_rate(pcm: Pcm, rate: int, out_rate: int = RATE) -> Pcm:
    return resample(pcm.astype(np.int16, copy=False), rate, out_rate)


def load_wav_8k(path: Path) -> Pcm:
    pcm, rate = load_wav(path)
    return to_rate(pcm, rate)


def save_wav(path: Path, pcm: Pcm, rate: int = RATE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.ascontiguousarray(pcm, dtype="<i2").tobytes())


def dbfs(frame: npt.NDArray[np.int16]) -> float:
    if frame.size == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(frame.astype(np.float64) ** 2)))
    return 20.0 * np.log10(max(rms, 1e-3) / 32768.0)


def voiced_frames(pcm: Pcm, floor_dbfs: float = -50.0, below_peak_db: float = 35.0) -> npt.NDArray[np.bool_]:
    """Per 20 ms frame: is it voiced (louder than the floor and within ``below_peak_db`` of the peak)?"""
    n = -(-len(pcm) // FRAME_SAMPLES)
    padded = np.zeros(n * FRAME_SAMPLES, np.int16)
    padded[: len(pcm)] = pcm
    levels = np.array([dbfs(f) for f in padded.reshape(n, FRAME_SAMPLES)]) if n else np.zeros(0)
    if not n:
        return np.zeros(0, bool)
    threshold = max(floor_dbfs, float(levels.max()) - below_peak_db)
    return levels > threshold


def is_voiced_mulaw(payload: bytes, floor_dbfs: float = -50.0) -> bool:
    return dbfs(mulaw.decode(payload)) > floor_dbfs


class LineNoise:
    """What a real line carries when nobody talks: low broadband noise, never digital silence.

    Optionally mixes a looped background (a TV, another talker) at a fixed gain into every frame.
    """

    def __init__(
        self,
        level_dbfs: float = -62.0,
        seed: int = 0,
        background: Pcm | None = None,
        background_db: float = -20.0,
    ) -> None:
        self._rng = np.random.default_rng(seed)
        self._sigma = 32768.0 * 10 ** (level_dbfs / 20.0)
        self._background = background if background is not None and background.size else None
        self._bg_gain = 10 ** (background_db / 20.0)
        self._bg_pos = 0

    def mix(self, frame: npt.NDArray[np.float64]) -> Pcm:
        """``frame`` (float samples) + noise (+ background) -> int16."""
        out = frame + self._rng.normal(0.0, self._sigma, frame.shape)
        if self._background is not None:
            bg = self._background
            idx = (self._bg_pos + np.arange(frame.size)) % bg.size
            self._bg_pos = int((self._bg_pos + frame.size) % bg.size)
            out = out + bg[idx].astype(np.float64) * self._bg_gain
        return np.clip(np.round(out), -32768, 32767).astype(np.int16)
