"""Silero VAD on real recorded speech degraded to 8 kHz µ-law telephone audio."""

from pathlib import Path

import numpy as np
import pytest

from appliance.engines.vad import SileroVad, VadLoadError
from tests.speech import (
    Recording,
    add_noise,
    load_recordings,
    mix_talker,
    noise,
    noise_burst,
    silence,
    telephone_8k,
)

WINDOW = 256


def _probs(vad: SileroVad, pcm8k: np.ndarray, chunk: int | None = None) -> np.ndarray:
    stream = vad.stream(8000)
    if chunk is None:
        return np.array(stream.push(pcm8k))
    out: list[float] = []
    for i in range(0, len(pcm8k), chunk):
        out += stream.push(pcm8k[i : i + chunk])
    return np.array(out)


def _loud_windows(pcm8k: np.ndarray, n: int, top: float = 0.3) -> np.ndarray:
    """Windows in the loudest ``top`` fraction by energy: voiced speech in these recordings."""
    energy = np.sqrt(np.mean(pcm8k[: n * WINDOW].astype(float).reshape(n, WINDOW) ** 2, axis=1))
    return energy >= np.quantile(energy, 1 - top)


@pytest.mark.parametrize("rec", load_recordings(), ids=lambda r: r.name)
def test_voiced_regions_of_real_speech_score_high(vad_engine: SileroVad, rec: Recording) -> None:
    pcm8k = telephone_8k(rec.pcm)
    p = _probs(vad_engine, pcm8k)
    assert len(p) == len(pcm8k) // WINDOW
    loud = _loud_windows(pcm8k, len(p))
    assert p[loud].mean() > 0.8
    assert (p[loud] > 0.5).mean() > 0.75


def test_speech_separated_from_silence_around_it(vad_engine: SileroVad) -> None:
    rec = load_recordings("librivox")[1]
    pcm8k = telephone_8k(np.concatenate([silence(1.0), rec.pcm, silence(1.0)]))
    p = _probs(vad_engine, pcm8k, chunk=160)  # 20 ms frames, as from Plivo
    lead = p[: 8000 // WINDOW - 2]  # the first second, minus a window of slack
    speech = p[8000 // WINDOW + 10 : -(8000 // WINDOW) - 10]
    assert lead.max() < 0.1
    assert (speech > 0.5).mean() > 0.8
    # The trailing silence decays back below threshold within ~0.3 s.
    assert p[-(8000 // WINDOW) + 10 :].max() < 0.3


@pytest.mark.parametrize("level_dbfs", [-70.0, -55.0, -40.0])
def test_silence_and_noise_floors_score_low(vad_engine: SileroVad, level_dbfs: float) -> None:
    assert _probs(vad_engine, telephone_8k(silence(2.0))).max() < 0.1
    p = _probs(vad_engine, telephone_8k(noise(3.0, level_dbfs, seed=int(-level_dbfs))))
    assert p.max() < 0.3


@pytest.mark.parametrize("kind", ["clap", "cough", "knock"])
def test_short_noise_bursts_are_not_speech(vad_engine: SileroVad, kind: str) -> None:
    pcm = np.concatenate([silence(0.3), noise_burst(kind), silence(0.5)])
    assert (_probs(vad_engine, telephone_8k(pcm)) > 0.5).sum() == 0


def test_noisy_speech_still_detected(vad_engine: SileroVad) -> None:
    recs = load_recordings("librivox")
    for rec, other in zip(recs, recs[1:] + recs[:1], strict=True):
        degraded = mix_talker(add_noise(rec.pcm, snr_db=10.0), other.pcm, snr_db=15.0)
        pcm8k = telephone_8k(degraded)
        p = _probs(vad_engine, pcm8k)
        assert p[_loud_windows(telephone_8k(rec.pcm), len(p))].mean() > 0.8, rec.name


def test_chunking_does_not_change_results(vad_engine: SileroVad) -> None:
    pcm8k = telephone_8k(load_recordings("cards")[0].pcm)
    whole = _probs(vad_engine, pcm8k)
    for chunk in (160, 97, 256, 1000):
        assert np.array_equal(_probs(vad_engine, pcm8k, chunk), whole)


def test_streams_do_not_share_state(vad_engine: SileroVad) -> None:
    speech = telephone_8k(load_recordings("librivox")[0].pcm)[: 8000 * 2]
    quiet = telephone_8k(noise(2.0, -60.0))
    alone_speech = _probs(vad_engine, speech)
    alone_quiet = _probs(vad_engine, quiet)
    a, b = vad_engine.stream(), vad_engine.stream()
    pa: list[float] = []
    pb: list[float] = []
    for i in range(0, len(speech), 160):  # interleave two calls frame by frame
        pa += a.push(speech[i : i + 160])
        pb += b.push(quiet[i : i + 160])
    assert np.array_equal(pa, alone_speech)
    assert np.array_equal(pb, alone_quiet)


def test_reset_forgets_the_previous_audio(vad_engine: SileroVad) -> None:
    speech = telephone_8k(load_recordings("librivox")[0].pcm)[:16000]
    probe = telephone_8k(load_recordings("cards")[0].pcm)
    stream = vad_engine.stream()
    stream.push(speech)
    stream.push(np.zeros(100, dtype=np.int16))  # leave a partial window pending
    stream.reset()
    assert stream.pending_samples == 0
    assert np.array_equal(stream.push(probe), _probs(vad_engine, probe))


def test_pending_buffer_stays_below_one_window(vad_engine: SileroVad) -> None:
    stream = vad_engine.stream()
    rng = np.random.default_rng(0)
    for _ in range(200):
        stream.push(np.zeros(int(rng.integers(0, 2000)), dtype=np.int16))
        assert stream.pending_samples < stream.window_samples


def test_16khz_stream_on_the_original_recording(vad_engine: SileroVad) -> None:
    rec = load_recordings("librivox")[2]
    stream = vad_engine.stream(16000)
    assert (stream.window_samples, stream.sample_rate) == (512, 16000)
    p = np.array(stream.push(rec.pcm))
    assert len(p) == len(rec.pcm) // 512
    assert (p > 0.5).mean() > 0.7


def test_unsupported_rate_is_refused(vad_engine: SileroVad) -> None:
    with pytest.raises(ValueError, match="8000"):
        vad_engine.stream(44100)


def test_corrupt_model_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "silero_vad.onnx"
    bad.write_bytes(b"not an onnx model" * 100)
    with pytest.raises(VadLoadError, match=str(bad)):
        SileroVad(bad, threads=1)
    with pytest.raises(VadLoadError, match="not found"):
        SileroVad(tmp_path / "missing.onnx", threads=1)
