import numpy as np
import pytest

from appliance.audio import framing
from appliance.audio.framing import Framer


def test_constants_describe_20ms_telephone_frames() -> None:
    assert framing.FRAME_SAMPLES == 160
    assert framing.MULAW_FRAME_BYTES == 160
    assert framing.PCM16_FRAME_BYTES == 320


def test_mulaw_framer_reassembles_any_chunking_and_keeps_less_than_a_frame() -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 16_001, dtype=np.uint8).tobytes()
    framer = Framer.mulaw()
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        n = int(rng.integers(0, 700))
        out += framer.push(data[pos : pos + n])
        pos += n
        assert framer.pending_bytes < 160  # bounded, whatever the chunking
    assert all(len(f) == 160 for f in out)
    assert b"".join(out) == data[: len(out) * 160]
    last = framer.flush()
    assert last is not None and len(last) == 160
    tail = len(data) % 160
    assert last[:tail] == data[-tail:]
    assert set(last[tail:]) == {0xFF}  # µ-law silence
    assert framer.flush() is None


def test_pcm16_framer_handles_odd_byte_chunks() -> None:
    samples = np.arange(1000, dtype=np.int16)
    data = samples.tobytes()
    framer = Framer.pcm16()
    frames: list[bytes] = []
    for i in range(0, len(data), 33):  # 33: splits samples in half
        frames += framer.push(data[i : i + 33])
    assert [len(f) for f in frames] == [320] * 6
    assert np.array_equal(joined := np.frombuffer(b"".join(frames), dtype=np.int16), samples[:960])
    assert len(joined) == 960
    last = framer.flush()
    assert last is not None
    assert np.array_equal(np.frombuffer(last, dtype=np.int16)[:40], samples[960:])
    assert not np.frombuffer(last, dtype=np.int16)[40:].any()


def test_reset_drops_the_carry_over() -> None:
    framer = Framer.mulaw()
    framer.push(b"\x01" * 100)
    framer.reset()
    assert framer.pending_bytes == 0
    assert framer.push(b"\x02" * 160) == [b"\x02" * 160]


def test_int16_float32_conversion() -> None:
    pcm = np.array([-32768, -1, 0, 1, 32767], dtype=np.int16)
    f = framing.pcm16_to_float32(pcm)
    assert f.dtype == np.float32
    assert f[0] == -1.0 and f[2] == 0.0 and f[-1] < 1.0
    assert np.array_equal(framing.float32_to_pcm16(f), pcm)
    loud = np.array([-2.0, 1.5, 0.5], dtype=np.float32)
    assert framing.float32_to_pcm16(loud).tolist() == [-32768, 32767, 16384]  # saturates, no wrap


def test_pcm16_from_bytes_rejects_half_samples() -> None:
    assert framing.pcm16_from_bytes(b"\x01\x00\xff\xff").tolist() == [1, -1]
    with pytest.raises(ValueError):
        framing.pcm16_from_bytes(b"\x00\x00\x00")


def test_frame_samples_pads_or_drops_the_last_frame() -> None:
    pcm = np.ones(400, dtype=np.int16)
    frames = framing.frame_samples(pcm)
    assert [len(f) for f in frames] == [160, 160, 160]
    assert frames[-1][:80].all() and not frames[-1][80:].any()
    assert len(framing.frame_samples(pcm, pad=False)) == 2
