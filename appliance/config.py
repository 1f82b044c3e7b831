"""Typed settings read from ``config.toml``; every key overridable by an ``APPLIANCE_*`` variable.

Top-level key ``port`` is overridden by ``APPLIANCE_PORT``; key ``llm`` of section ``[models]`` by
``APPLIANCE_MODELS_LLM``. Settings are validated once, at start-up, and passed down explicitly.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config.toml"
ENV_PREFIX = "APPLIANCE_"


class ConfigError(Exception):
    """The configuration file or an override is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelsSettings(_Section):
    vad: str = "silero-vad"
    asr: str = "whisper-tiny.en"
    llm: str = "qwen2.5-coder-0.5b"
    tts: str = "piper-joe-medium"
    embed: str = "all-minilm-l6-v2"
    install: str = (
        "silero-vad,whisper-tiny.en,qwen2.5-coder-0.5b,smollm2-135m,piper-joe-medium,all-minilm-l6-v2"
    )

    @property
    def install_ids(self) -> list[str]:
        return [m.strip() for m in self.install.split(",") if m.strip()]


class ThreadSettings(_Section):
    asr: int = 1  # per transcription; ``[asr] workers`` of them may run at once
    llm: int = 2
    # Prompt evaluation (prefill); 0: same as ``llm``.
    llm_batch: int = 0
    # LLM threads while a transcription, synthesis or embedding runs beside it (0: no change).
    llm_shared: int = 0
    tts: int = 2
    embed: int = 1
    vad: int = 1


class GpuSettings(_Section):
    asr_device: str = "cpu"
    asr_compute_type: str = "int8"
    llm_gpu_layers: int = 0


class LlmSettings(_Section):
    context_size: int = 4096
    # Sequences decoded together in one batch, each keeping one conversation's prompt cache; more
    # generations than this wait for a free one.
    slots: int = 4
    # Load the file setup makes with feed-forward weights requantized for the CPU's batched kernels
    # (models/manifest.toml ``derived``), when the model has one: 10-33% faster decoding.
    requantized: bool = True


class AsrSettings(_Section):
    # Encoder window for short turns, seconds; 0 decodes every turn in Whisper's full 30 s window.
    window_s: float = 8.0
    # A longer window for a turn whose short-window decode looped, before the full 30 s (0: none).
    retry_window_s: float = 16.0
    # Transcriptions that may run at once (each on its own ``[threads] asr`` threads): two callers who
    # stop talking together are transcribed side by side, not one after the other.
    workers: int = Field(default=2, ge=1)


class TtsSettings(_Section):
    # onnxruntime's CPU arena: 15-40% faster synthesis, but it keeps the largest sentence's memory.
    memory_arena: bool = False
    # Replayed audio of short clauses heard before (a few hundred); 0 turns the cache off.
    phrase_cache_mb: float = Field(default=8.0, ge=0)


class LimitSettings(_Section):
    max_upload_bytes: int = 10 * 1024 * 1024
    handler_timeout_s: float = 5.0
    handler_max_reply_bytes: int = 16384
    chat_sessions_max: int = 1000
    chat_session_ttl_s: float = 3600.0
    max_concurrent_calls: int = 8


class CallSettings(_Section):
    end_of_turn_silence_ms: int = 600
    min_utterance_ms: int = 200
    barge_in_min_speech_ms: int = 300
    playout_lead_ms: int = 100
    stream_token_ttl_s: int = 300
    # Transcribe after this much silence, before the end of the turn is certain; already after
    # ``quick_pause_ms`` when no other engine work is running at that moment (0: never).
    pause_ms: int = 200
    quick_pause_ms: int = 120
    # End-of-turn silence adapted to the words so far (shorter after a sentence, longer after "and").
    smart_end_of_turn: bool = True
    # Start the reply at that pause, held back until the end of the turn is certain.
    speculative: bool = True
    # After words that say more is coming (a trailing "and", half a number: a longer wait), start
    # the held-back reply once the end of the turn is this close (0: only after final-looking words).
    speculate_within_ms: int = Field(default=700, ge=0)
    # While the caller goes on talking, transcribe what they said so far after each this much more
    # speech (when no other caller waits on the cores) and read it into the LLM's prompt cache, so a
    # long turn leaves only its last words to read when it ends (0: never).
    read_ahead_ms: int = Field(default=2000, ge=0)
    # A reply's first clause may end where a phrase starts ("The ten of clubs | is ...") once it
    # has this many words, instead of waiting for punctuation; 0: punctuation only.
    first_phrase_words: int = 2
    # A first clause with no such place this many words in ends before its next word that nothing
    # binds to ("He might have been made | amiable himself."); 0: no such cut. Only with
    # ``first_phrase_words`` > 0.
    first_clause_max_words: int = 5
    # Agents whose call prompt is read into the LLM's prompt cache before their next call: when one
    # is created or changed, and the most recently changed at start-up (/ready waits for these).
    # 0: none, every call reads its own while its welcome plays.
    prewarm_agents: int = Field(default=3, ge=0)


class Settings(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    public_base_url: str = "http://127.0.0.1:8000"
    plivo_api_base_url: str = ""  # empty = Plivo's real API (https://api.plivo.com); tests use a fake
    data_dir: Path = Path("data")
    database_url: str = ""
    chroma_url: str = ""
    models_dir: Path = Path("models")
    log_level: str = "info"
    # GET /metrics: with a token, callers need "Authorization: Bearer <token>"; without, loopback only.
    metrics_token: SecretStr = SecretStr("")
    models: ModelsSettings = ModelsSettings()
    threads: ThreadSettings = ThreadSettings()
    gpu: GpuSettings = GpuSettings()
    llm: LlmSettings = LlmSettings()
    asr: AsrSettings = AsrSettings()
    tts: TtsSettings = TtsSettings()
    limits: LimitSettings = LimitSettings()
    call: CallSettings = CallSettings()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'appliance.sqlite3'}"

    @property
    def chroma_path(self) -> Path:
        return self.data_dir / "chroma"

    @property
    def documents_dir(self) -> Path:
        return self.data_dir / "documents"

    @property
    def base_url(self) -> str:
        return self.public_base_url.rstrip("/")


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Section):
            section = merged.setdefault(name, {})
            if not isinstance(section, dict):
                raise ConfigError(f"config key '{name}' must be a table")
            for key in annotation.model_fields:
                var = f"{ENV_PREFIX}{name.upper()}_{key.upper()}"
                if var in env:
                    section[key] = env[var]
        else:
            var = f"{ENV_PREFIX}{name.upper()}"
            if var in env:
                merged[name] = env[var]
    return merged


def load_settings(
    path: Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Read ``config.toml`` (or ``APPLIANCE_CONFIG``), apply env overrides, validate, resolve paths."""
    env = os.environ if env is None else env
    config_path = Path(path or env.get(f"{ENV_PREFIX}CONFIG") or DEFAULT_CONFIG_PATH)
    raw: dict[str, Any] = {}
    if config_path.exists():
        try:
            raw = tomllib.loads(config_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: invalid TOML: {exc}") from exc
    merged = _apply_env(raw, env)
    merged.update(overrides)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{config_path}: {problems}") from exc
    base = config_path.resolve().parent
    updates: dict[str, Any] = {}
    for key in ("data_dir", "models_dir"):
        value: Path = getattr(settings, key)
        if not value.is_absolute():
            updates[key] = (base / value).resolve()
    return settings.model_copy(update=updates)
