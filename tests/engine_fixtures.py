"""Session-wide real engines for tests in any directory (a pytest plugin).

Each engine is loaded and warmed once per test process, from the installed models the appliance
itself uses (``models/``), through the same manifest lookup as the server. Registered for the whole suite by
``tests/conftest.py`` (``pytest_plugins = ["tests.engine_fixtures"]``); use from any test:
``def test_x(asr_engine): ...``. The loaders are cached at module level, so scripts and fixtures of
any scope share the same instance (``load_asr()`` etc. work outside pytest too).
"""

from __future__ import annotations

import functools

import pytest

from appliance.config import Settings, load_settings
from appliance.engines.asr import WhisperAsr
from appliance.engines.tts import PiperTts
from appliance.engines.vad import SileroVad
from appliance.model_manifest import Manifest
from appliance.runtime import configure_threads


@functools.cache
def engine_test_settings() -> Settings:
    settings = load_settings()
    configure_threads(settings)
    return settings


@functools.cache
def engine_manifest() -> Manifest:
    return Manifest.load(engine_test_settings().models_dir)


@functools.cache
def load_vad() -> SileroVad:
    s = engine_test_settings()
    path = engine_manifest().path(s.models.vad, "vad")
    return SileroVad(path / "silero_vad.onnx", threads=s.threads.vad)


@functools.cache
def load_asr() -> WhisperAsr:
    s = engine_test_settings()
    path = engine_manifest().path(s.models.asr, "asr")
    return WhisperAsr(
        s.models.asr, path, threads=s.threads.asr, device=s.gpu.asr_device,
        compute_type=s.gpu.asr_compute_type, workers=s.asr.workers,
    )  # fmt: skip


@functools.cache
def load_tts() -> PiperTts:
    s = engine_test_settings()
    path = engine_manifest().path(s.models.tts, "tts")
    return PiperTts(
        s.models.tts, path, threads=s.threads.tts, memory_arena=s.tts.memory_arena,
        phrase_cache_bytes=int(s.tts.phrase_cache_mb * 2**20),
    )  # fmt: skip


@pytest.fixture(scope="session")
def vad_engine() -> SileroVad:
    return load_vad()


@pytest.fixture(scope="session")
def asr_engine() -> WhisperAsr:
    return load_asr()


@pytest.fixture(scope="session")
def tts_engine() -> PiperTts:
    return load_tts()
