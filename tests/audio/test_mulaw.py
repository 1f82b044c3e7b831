import importlib
import warnings

import numpy as np
import pytest

from appliance.audio import mulaw

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)


def _audioop():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module("audioop")
        except ImportError:
            return None


@pytest.mark.parametrize(
    ("code", "value"),
    [
        (0xFF, 0),
        (0x7F, 0),
        (0x80, 32124),
        (0x00, -32124),
        (0xF0, 120),
        (0x70, -120),
        (0xCE, 988),
        (0xFE, 8),
        (0x8F, 16764),
    ],
)
def test_decode_known_code_points(code: int, value: int) -> None:
    assert mulaw.decode(bytes([code]))[0] == value


@pytest.mark.parametrize(
    ("value", "code"),
    [(0, 0xFF), (1, 0xFF), (-1, 0x7E), (32767, 0x80), (-32768, 0x00), (100, 0xF2), (-1000, 0x4E)],
)
def test_encode_known_code_points(value: int, code: int) -> None:
    assert mulaw.encode(np.array([value], dtype=np.int16)) == bytes([code])


def test_byte_exact_with_audioop_for_every_sample_and_code() -> None:
    audioop = _audioop()
    if audioop is None:
        pytest.skip("audioop is gone (Python >= 3.13); known code points still pin the format")
    assert mulaw.encode(ALL_INT16) == audioop.lin2ulaw(ALL_INT16.tobytes(), 2)
    codes = bytes(range(256))
    assert mulaw.decode(codes).tobytes() == audioop.ulaw2lin(codes, 2)


def test_decode_table_is_monotonic_within_each_sign() -> None:
    positive = mulaw.decode(bytes(range(0xFF, 0x7F, -1))).astype(int)  # 0xFF (0) .. 0x80 (max)
    negative = mulaw.decode(bytes(range(0x7F, -1, -1))).astype(int)  # 0x7F (0) .. 0x00 (min)
    assert np.all(np.diff(positive) > 0)
    assert np.all(np.diff(negative) < 0)


def test_roundtrip_error_is_bounded_by_the_segment_step() -> None:
    restored = mulaw.decode(mulaw.encode(ALL_INT16)).astype(int)
    error = np.abs(restored - ALL_INT16.astype(int))
    # Companding: the step doubles per segment, so the error grows with the magnitude (~1/16 of it),
    # plus the clip above 32124.
    assert np.all(error <= np.abs(ALL_INT16.astype(int)) / 16 + 8)
    assert error[np.abs(ALL_INT16.astype(int)) < 32].max() <= 8


def test_every_code_survives_decode_encode_except_negative_zero() -> None:
    codes = bytes(range(256))
    again = mulaw.encode(mulaw.decode(codes))
    changed = [c for c in range(256) if again[c] != c]
    assert changed == [0x7F]  # -0 decodes to 0, which encodes as +0 (0xFF)


def test_sine_snr_through_mulaw_is_telephone_grade() -> None:
    t = np.arange(8000) / 8000
    x = np.rint(8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    y = mulaw.decode(mulaw.encode(x)).astype(float)
    snr = 10 * np.log10(np.sum(x.astype(float) ** 2) / np.sum((y - x) ** 2))
    assert snr > 35.0  # G.711 µ-law gives ~38 dB over a wide range of levels


def test_empty_and_non_contiguous_input() -> None:
    assert mulaw.encode(np.zeros(0, dtype=np.int16)) == b""
    assert len(mulaw.decode(b"")) == 0
    strided = ALL_INT16[::2]
    assert mulaw.encode(strided) == mulaw.encode(strided.copy())
    assert mulaw.decode(memoryview(b"\xff\x00")).tolist() == [0, -32124]
