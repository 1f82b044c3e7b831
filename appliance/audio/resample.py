"""Stateful streaming resampling (``soxr``), one resampler per direction per call.

A fresh one-shot resample of every 20 ms frame would restart the filter at each frame edge and click;
``soxr.ResampleStream`` keeps the filter history between chunks, so a stream of chunks resamples to
the same signal as the whole recording at once.

Latency note: soxr's HQ filter works in blocks, so output arrives in bursts (8 kHz -> 16 kHz with
20 ms input chunks: nothing for the first ~100 ms, then ~100 ms at a time; 22,050 Hz -> 8 kHz: a burst
every ~60 ms). Nothing is lost (``flush`` returns the tail), but code that needs audio frame by frame
with no added delay (VAD) should run at the input rate instead: Silero takes 8 kHz directly. Whole
utterances can use :func:`resample` at once.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import numpy.typing as npt
import soxr

_SUPPORTED = (np.dtype(np.int16), np.dtype(np.float32))
A = TypeVar("A", npt.NDArray[np.int16], npt.NDArray[np.float32])


def resample(samples: A, in_rate: int, out_rate: int, quality: str = "HQ") -> A:
    """Resample a whole mono signal in one go; int16 stays int16 and float32 stays float32."""
    if in_rate == out_rate:
        return samples.copy()
    out = soxr.resample(samples, in_rate, out_rate, quality=quality)
    return out.astype(samples.dtype, copy=False)


class StreamResampler:
    """Resample one mono stream chunk by chunk. ``process`` returns the samples ready so far (possibly
    none); ``flush`` returns the tail at the end of the stream and readies the resampler for a new
    one. The dtype (int16 or float32) is fixed by ``dtype`` or by the first chunk."""

    def __init__(
        self, in_rate: int, out_rate: int, *, dtype: npt.DTypeLike | None = None, quality: str = "HQ"
    ):
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.quality = quality
        self._dtype: np.dtype[np.generic] | None = None
        self._stream: soxr.ResampleStream | None = None
        if dtype is not None:
            self._open(np.dtype(dtype))

    @property
    def dtype(self) -> np.dtype[np.generic] | None:
        return self._dtype

    def _open(self, dtype: np.dtype[np.generic]) -> soxr.ResampleStream | None:
        if dtype not in _SUPPORTED:
            raise TypeError(f"StreamResampler handles int16 or float32 samples, not {dtype}")
        self._dtype = dtype
        if self.in_rate != self.out_rate:
            self._stream = soxr.ResampleStream(
                self.in_rate, self.out_rate, 1, dtype=dtype.name, quality=self.quality
            )
        return self._stream

    def process(self, samples: A) -> A:
        samples = np.ascontiguousarray(samples)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples (1-D), got shape {samples.shape}")
        if self._dtype is None:
            self._open(samples.dtype)
        elif samples.dtype != self._dtype:
            raise TypeError(f"this stream carries {self._dtype}, got {samples.dtype}")
        if self._stream is None:  # same rate: pass through
            return samples.copy()
        return self._stream.resample_chunk(samples)

    def flush(self) -> npt.NDArray[np.int16] | npt.NDArray[np.float32]:
        """The rest of the stream (the filter's pending output), then start over for a new stream."""
        dtype = self._dtype or np.dtype(np.float32)
        if self._stream is None:
            return np.zeros(0, dtype=dtype)
        tail = self._stream.resample_chunk(np.zeros(0, dtype=dtype), last=True)
        self._stream.clear()
        return tail

    def reset(self) -> None:
        """Drop pending samples (e.g. on barge-in) and start a new stream."""
        if self._stream is not None:
            self._stream.clear()
