import numpy as np
import pytest

from appliance.audio.resample import StreamResampler, resample

RATES = [(8000, 16000), (16000, 8000), (22050, 8000)]


def _tone(rate: int, seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _stream(r: StreamResampler, x: np.ndarray, chunk: int) -> tuple[np.ndarray, list[int]]:
    outs: list[np.ndarray] = [r.process(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    lengths = [len(o) for o in outs]
    outs.append(r.flush())
    return np.concatenate(outs), lengths


@pytest.mark.parametrize(("in_rate", "out_rate"), RATES)
def test_chunked_output_equals_one_shot(in_rate: int, out_rate: int) -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 0.1, in_rate * 2)).astype(np.float32)
    chunked, _ = _stream(StreamResampler(in_rate, out_rate), x, in_rate // 50)
    whole = resample(x, in_rate, out_rate)
    assert len(chunked) == len(whole) == 2 * out_rate
    assert np.max(np.abs(chunked - whole)) < 1e-4


@pytest.mark.parametrize(("in_rate", "out_rate"), RATES)
def test_lengths_do_not_drift_over_many_20ms_chunks(in_rate: int, out_rate: int) -> None:
    chunk = in_rate // 50
    n_chunks = 1500  # 30 s of audio, 20 ms at a time
    r = StreamResampler(in_rate, out_rate, dtype=np.int16)
    produced = 0
    worst_lag = 0.0
    frame = np.zeros(chunk, dtype=np.int16)
    for i in range(1, n_chunks + 1):
        produced += len(r.process(frame))
        worst_lag = max(worst_lag, i * chunk * out_rate / in_rate - produced)
    # The filter holds back a bounded block (~0.1 s), never a growing backlog...
    assert worst_lag < 0.15 * out_rate
    # ...and after flush the count is exact to the sample.
    assert produced + len(r.flush()) == n_chunks * chunk * out_rate // in_rate


@pytest.mark.parametrize(("in_rate", "out_rate"), RATES)
def test_no_clicks_at_chunk_boundaries(in_rate: int, out_rate: int) -> None:
    freq, amp = 440.0, 0.5
    y, _ = _stream(StreamResampler(in_rate, out_rate), _tone(in_rate, 1.0, freq, amp), in_rate // 50)
    body = y[out_rate // 20 : -out_rate // 20]  # skip the filter's start-up and tail
    # A click is a jump bigger than a smooth sine can make between two samples.
    max_step = 2 * np.pi * freq / out_rate * amp
    assert np.max(np.abs(np.diff(body))) < max_step * 1.05
    # And the output still is that sine: phase-aligned and at full level.
    t = np.arange(len(y)) / out_rate
    ideal = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    assert np.max(np.abs(y - ideal)[out_rate // 20 : -out_rate // 20]) < 0.01


def test_int16_stays_int16_and_float32_stays_float32() -> None:
    r16 = StreamResampler(8000, 16000)
    out, _ = _stream(r16, (np.arange(1600) % 200 * 50).astype(np.int16), 160)
    assert out.dtype == np.int16 and len(out) == 3200
    rf = StreamResampler(8000, 16000)
    out_f, _ = _stream(rf, _tone(8000, 0.2), 160)
    assert out_f.dtype == np.float32


def test_dtype_is_fixed_for_the_stream() -> None:
    r = StreamResampler(8000, 16000)
    r.process(np.zeros(160, dtype=np.int16))
    with pytest.raises(TypeError):
        r.process(np.zeros(160, dtype=np.float32))
    with pytest.raises(TypeError):
        StreamResampler(8000, 16000, dtype=np.float64)


def test_flush_starts_a_fresh_stream() -> None:
    r = StreamResampler(22050, 8000)
    x = _tone(22050, 0.5)
    first, _ = _stream(r, x, 441)
    second, _ = _stream(r, x, 441)
    assert np.array_equal(first, second)  # nothing of the first stream leaked into the second


def test_same_rate_is_a_copy() -> None:
    r = StreamResampler(8000, 8000)
    x = np.arange(160, dtype=np.int16)
    y = r.process(x)
    assert np.array_equal(x, y) and y is not x
    assert len(r.flush()) == 0


def test_rejects_stereo_and_bad_rates() -> None:
    with pytest.raises(ValueError):
        StreamResampler(8000, 16000).process(np.zeros((160, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        StreamResampler(0, 16000)
