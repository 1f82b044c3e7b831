"""Real recorded speech and telephone-line degradations for tests, shared by every area.

Recordings come from Debian's ``pocketsphinx-testdata`` (16 kHz mono, with transcripts): five
LibriVox sentences (read speech, 3-7 s) and five "cards" utterances (short phrases, 1-3.5 s).
Telephone audio is 8 kHz µ-law: :func:`to_telephone` / :func:`from_telephone` give exactly what a
caller's audio looks like after Plivo, and back at Whisper's 16 kHz.
"""

from __future__ import annotations

import functools
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from appliance.audio import mulaw
from appliance.audio.framing import pcm16_to_float32
from appliance.audio.resample import resample
from appliance.simulator.wer import corpus_wer, normalize_text, number_words, wer, word_errors

__all__ = ["corpus_wer", "normalize_text", "number_words", "wer", "word_errors"]

DATA_DIR = Path("/usr/share/pocketsphinx/test/data")
INSTALL_HINT = "apt-get install -y pocketsphinx-testdata (scripts/setup --test does it)"
SOURCE_RATE = 16000
PHONE_RATE = 8000

Int16 = npt.NDArray[np.int16]
Float32 = npt.NDArray[np.float32]


class SpeechDataMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Recording:
    name: str
    text: str  # reference transcript, lowercase words
    pcm: Int16  # 16 kHz mono int16
    sample_rate: int = SOURCE_RATE

    @property
    def seconds(self) -> float:
        return len(self.pcm) / self.sample_rate


def _read_wav(path: Path) -> Int16:
    with wave.open(str(path), "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2 or wav.getframerate() != SOURCE_RATE:
            raise ValueError(f"{path}: expected 16 kHz mono 16-bit")
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.int16)


def _transcripts(path: Path) -> dict[str, str]:
    # Lines look like: "<s> ten of clubs  </s> (001)"
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*(?:<s>)?(.*?)(?:</s>)?\s*\((\S+)\)\s*$", line)
        if match:
            out[match.group(2)] = " ".join(match.group(1).split())
    return out


@functools.cache
def load_recordings(corpus: str | None = None) -> tuple[Recording, ...]:
    """All recordings of ``corpus`` ("librivox" or "cards"; None for both), sorted by name."""
    if not DATA_DIR.is_dir():
        raise SpeechDataMissing(f"{DATA_DIR} is missing: {INSTALL_HINT}")
    sources = {"librivox": "transcription", "cards": "cards.transcription"}
    recordings: list[Recording] = []
    for name, transcript_file in sources.items():
        if corpus not in (None, name):
            continue
        texts = _transcripts(DATA_DIR / name / transcript_file)
        for wav in sorted((DATA_DIR / name).glob("*.wav")):
            recordings.append(Recording(f"{name}/{wav.stem}", texts[wav.stem], _read_wav(wav)))
    if not recordings:
        raise SpeechDataMissing(f"no recordings for {corpus!r} under {DATA_DIR}: {INSTALL_HINT}")
    return tuple(recordings)


def recording(name: str) -> Recording:
    """One recording by name, e.g. ``"cards/001"`` or ``"librivox/<stem>"``."""
    for rec in load_recordings():
        if rec.name == name:
            return rec
    raise KeyError(name)


# -- telephone line -----------------------------------------------------------------------------


def to_telephone(pcm: Int16, rate: int = SOURCE_RATE) -> bytes:
    """Any-rate int16 -> 8 kHz µ-law bytes, as a caller's audio arrives from Plivo."""
    return mulaw.encode(resample(pcm, rate, PHONE_RATE))


def from_telephone(ulaw: bytes) -> Int16:
    """8 kHz µ-law bytes -> 8 kHz int16."""
    return mulaw.decode(ulaw)


def telephone_16k(pcm: Int16, rate: int = SOURCE_RATE) -> Float32:
    """Degrade to 8 kHz µ-law and bring back to 16 kHz float32, the audio our ASR really sees."""
    return pcm16_to_float32(resample(from_telephone(to_telephone(pcm, rate)), PHONE_RATE, SOURCE_RATE))


def telephone_8k(pcm: Int16, rate: int = SOURCE_RATE) -> Int16:
    """Degrade to 8 kHz µ-law and decode, the audio our VAD really sees (8 kHz int16)."""
    return from_telephone(to_telephone(pcm, rate))


# -- signals and noise -----------------------------------------------------------------------------


def rms(x: npt.NDArray[np.generic]) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, dtype=np.float64))))) if len(x) else 0.0


def dbfs(x: npt.NDArray[np.generic]) -> float:
    """RMS level of int16 samples relative to full scale."""
    return 20.0 * np.log10(max(rms(x), 1e-9) / 32768.0)


def active_rms(pcm: Int16, rate: int = SOURCE_RATE, frame_ms: int = 20) -> float:
    """RMS over the louder half of 20 ms frames: the speech level, not diluted by pauses."""
    n = rate * frame_ms // 1000
    frames = pcm[: len(pcm) - len(pcm) % n].astype(np.float64).reshape(-1, n)
    levels = np.sqrt(np.mean(frames**2, axis=1))
    loud = np.sort(levels)[len(levels) // 2 :]
    return float(np.sqrt(np.mean(loud**2)))


def silence(seconds: float, rate: int = SOURCE_RATE) -> Int16:
    return np.zeros(int(round(seconds * rate)), dtype=np.int16)


def noise(seconds: float, level_dbfs: float, rate: int = SOURCE_RATE, *, seed: int = 0) -> Int16:
    """Gaussian noise floor at ``level_dbfs`` RMS (e.g. -60 quiet room, -40 noisy line)."""
    rng = np.random.default_rng(seed)
    target = 32768.0 * 10 ** (level_dbfs / 20.0)
    return _to_int16(rng.normal(0.0, target, int(round(seconds * rate))))


def add_noise(pcm: Int16, snr_db: float, rate: int = SOURCE_RATE, *, seed: int = 0) -> Int16:
    """Add white noise so that active speech is ``snr_db`` above the noise."""
    noise_rms = active_rms(pcm, rate) / 10 ** (snr_db / 20.0)
    rng = np.random.default_rng(seed)
    return _to_int16(pcm.astype(np.float64) + rng.normal(0.0, noise_rms, len(pcm)))


def mix_talker(pcm: Int16, other: Int16, snr_db: float, rate: int = SOURCE_RATE) -> Int16:
    """Mix a background talker ``other`` (looped or cut to length) ``snr_db`` below the speech."""
    reps = int(np.ceil(len(pcm) / max(1, len(other))))
    background = np.tile(other, reps)[: len(pcm)].astype(np.float64)
    gain = active_rms(pcm, rate) / max(active_rms(other, rate), 1e-9) / 10 ** (snr_db / 20.0)
    return _to_int16(pcm.astype(np.float64) + background * gain)


def noise_burst(
    kind: str = "clap", rate: int = SOURCE_RATE, *, level_dbfs: float = -12.0, seed: int = 0
) -> Int16:
    """A short non-speech transient: ``clap`` (~40 ms broadband click decaying fast), ``cough``
    (~250 ms low-passed noise with a fast attack), ``knock`` (three 15 ms clicks)."""
    rng = np.random.default_rng(seed)
    peak = 32768.0 * 10 ** (level_dbfs / 20.0)
    if kind == "clap":
        n = int(0.04 * rate)
        burst = rng.normal(0.0, 1.0, n) * np.exp(-np.arange(n) / (0.006 * rate))
    elif kind == "cough":
        n = int(0.25 * rate)
        white = rng.normal(0.0, 1.0, n + 8)
        # Crude low-pass (moving average) gives the breathy low-frequency body of a cough.
        body = np.convolve(white, np.ones(8) / 8, mode="valid")[:n]
        t = np.arange(n) / rate
        burst = body * (1 - np.exp(-t / 0.01)) * np.exp(-t / 0.08)
    elif kind == "knock":
        click = int(0.015 * rate)
        gap = int(0.12 * rate)
        one = rng.normal(0.0, 1.0, click) * np.exp(-np.arange(click) / (0.003 * rate))
        burst = np.concatenate([np.concatenate([one, np.zeros(gap)]) for _ in range(3)])
    else:
        raise ValueError(f"unknown burst kind {kind!r}")
    burst = burst / max(np.max(np.abs(burst)), 1e-9) * peak
    return _to_int16(burst)


def _to_int16(x: npt.NDArray[np.floating]) -> Int16:
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


# -- word error rate -------------------------------------------------------------------------------
