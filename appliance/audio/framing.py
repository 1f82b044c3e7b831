"""Telephone framing: 20 ms frames of 160 samples at 8 kHz, and int16 <-> float32 conversion.

Plivo sends and accepts µ-law audio in arbitrary-sized payloads; the pipeline works in whole 20 ms
frames. A :class:`Framer` cuts any byte stream into frames and carries the incomplete rest over to
the next push. The carry-over is always shorter than one frame, so its memory is bounded no matter
how the input is chunked.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .mulaw import SILENCE_BYTE

SAMPLE_RATE = 8000
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 160
MULAW_FRAME_BYTES = FRAME_SAMPLES  # one byte per µ-law sample
PCM16_FRAME_BYTES = FRAME_SAMPLES * 2

_INT16_SCALE = 32768.0


class Framer:
    """Cut a byte stream into fixed-size frames. ``push`` returns the complete frames (oldest first)
    and keeps the rest (< one frame) for the next call; ``flush`` pads the rest with silence."""

    def __init__(self, frame_bytes: int, *, silence: bytes):
        if frame_bytes <= 0:
            raise ValueError("frame_bytes must be positive")
        if len(silence) == 0 or frame_bytes % len(silence):
            raise ValueError("silence must be a sample pattern that divides the frame size")
        self.frame_bytes = frame_bytes
        self._silence = silence
        self._carry = bytearray()

    @classmethod
    def mulaw(cls, frame_samples: int = FRAME_SAMPLES) -> Framer:
        return cls(frame_samples, silence=bytes([SILENCE_BYTE]))

    @classmethod
    def pcm16(cls, frame_samples: int = FRAME_SAMPLES) -> Framer:
        return cls(frame_samples * 2, silence=b"\x00\x00")

    @property
    def pending_bytes(self) -> int:
        return len(self._carry)

    def push(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if not data:
            return []
        buf = self._carry + data
        whole = len(buf) - len(buf) % self.frame_bytes
        frames = [bytes(buf[i : i + self.frame_bytes]) for i in range(0, whole, self.frame_bytes)]
        self._carry = buf[whole:]
        return frames

    def flush(self) -> bytes | None:
        """The incomplete last frame padded with silence to full size, or None if nothing is pending."""
        if not self._carry:
            return None
        missing = self.frame_bytes - len(self._carry)
        # A half sample (odd byte count for PCM16) is completed by the padding's first byte.
        frame = bytes(self._carry) + (self._silence * (missing // len(self._silence) + 1))[:missing]
        self._carry.clear()
        return frame

    def reset(self) -> None:
        self._carry.clear()


def pcm16_to_float32(pcm: npt.NDArray[np.int16]) -> npt.NDArray[np.float32]:
    """int16 samples -> float32 in [-1, 1)."""
    return (np.asarray(pcm, dtype=np.int16).astype(np.float32)) / np.float32(_INT16_SCALE)


def float32_to_pcm16(samples: npt.NDArray[np.floating]) -> npt.NDArray[np.int16]:
    """float32 in [-1, 1] -> int16, rounded and clipped (out-of-range input saturates, never wraps)."""
    scaled = np.rint(np.asarray(samples, dtype=np.float32) * np.float32(_INT16_SCALE))
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def pcm16_from_bytes(data: bytes | bytearray | memoryview) -> npt.NDArray[np.int16]:
    """Little-endian 16-bit PCM bytes -> int16 samples (a trailing odd byte is an error)."""
    if len(data) % 2:
        raise ValueError(f"PCM16 data must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def frame_samples(
    pcm: npt.NDArray[np.int16], frame: int = FRAME_SAMPLES, *, pad: bool = True
) -> list[npt.NDArray[np.int16]]:
    """Split a whole signal into frames of ``frame`` samples; the last is zero-padded (or dropped)."""
    n = len(pcm)
    frames = [pcm[i : i + frame] for i in range(0, n - n % frame, frame)]
    if n % frame and pad:
        last = np.zeros(frame, dtype=np.int16)
        last[: n % frame] = pcm[n - n % frame :]
        frames.append(last)
    return frames
