"""G.711 µ-law, byte-exact with the classic Sun/CCITT ``g711.c`` that Python's ``audioop`` used.

Decode is a 256-entry table; encode is a 65,536-entry table indexed by the int16 sample's bit
pattern, built once at import from the vectorised reference formula. Both are then a single numpy
fancy-index per frame, far cheaper than per-sample Python and independent of ``audioop`` (gone in
Python 3.13).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_BIAS = 0x84  # 132: shifts every magnitude so the segment (exponent) is the top set bit
_BIAS14 = _BIAS >> 2  # the same bias on the 14-bit scale the encoder works in
_CLIP14 = 8159  # largest 14-bit magnitude that still fits after adding the bias
_SEGMENT_ENDS = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)

SILENCE_BYTE = 0xFF  # µ-law code of 0 (positive zero)


def _decode_table() -> npt.NDArray[np.int16]:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def encode_array(pcm: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Reference µ-law encode of int16 samples, vectorised (used once, to build the table).

    Follows the classic Sun/CCITT ``g711.c`` that ``audioop.lin2ulaw`` used: the sample is first
    reduced to 14 bits with an arithmetic (flooring) shift, *then* split into sign and magnitude.
    Encoders that take the magnitude before the shift differ on a few hundred negative values.
    """
    x = np.asarray(pcm, dtype=np.int32) >> 2
    negative = x < 0
    magnitude = np.minimum(np.abs(x), _CLIP14) + _BIAS14
    segment = np.zeros_like(magnitude)
    for end in _SEGMENT_ENDS:
        segment += magnitude > end
    mantissa = (magnitude >> (segment + 1)) & 0x0F
    code = np.where(segment >= 8, 0x7F, (np.minimum(segment, 7) << 4) | mantissa)
    mask = np.where(negative, 0x7F, 0xFF)
    return (code ^ mask).astype(np.uint8)


DECODE_TABLE: npt.NDArray[np.int16] = _decode_table()
# Indexed by the uint16 view of an int16 sample (two's complement bit pattern).
_ENCODE_TABLE: npt.NDArray[np.uint8] = encode_array(np.arange(65536, dtype=np.uint16).view(np.int16))


def decode(data: bytes | bytearray | memoryview) -> npt.NDArray[np.int16]:
    """µ-law bytes -> int16 samples (one per byte)."""
    return DECODE_TABLE[np.frombuffer(data, dtype=np.uint8)]


def encode(pcm: npt.NDArray[np.int16]) -> bytes:
    """int16 samples -> µ-law bytes (one per sample)."""
    samples = np.ascontiguousarray(pcm, dtype=np.int16)
    return _ENCODE_TABLE[samples.view(np.uint16)].tobytes()
