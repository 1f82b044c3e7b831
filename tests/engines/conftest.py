"""The engine fixtures (``vad_engine``, ``asr_engine``, ``tts_engine``) live in
``tests/engine_fixtures.py``, registered for the whole suite by ``tests/conftest.py``
(``pytest_plugins = ["tests.engine_fixtures"]``), so tests in any directory share one loaded, warmed
instance of each model per session. Models follow ``config.toml`` and its ``APPLIANCE_MODELS_*``
overrides, e.g. ``APPLIANCE_MODELS_ASR=whisper-base pytest tests/engines/test_asr.py``."""
