"""Loads every engine once per process from the manifest and hands out shared instances.

The default model of each role is loaded and warmed at start-up (``/ready`` waits for it); other
installed models (an agent may pick another LLM or voice) are loaded on first use, once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from ..model_manifest import Manifest, ModelError, Role, weights_file
from .types import AsrEngine, Embedder, LlmEngine, TtsEngine, VadModel

log = logging.getLogger(__name__)


@dataclass
class EngineStatus:
    loading: bool = False
    ready: bool = False
    error: str | None = None
    load_seconds: dict[str, float] = field(default_factory=dict)


class EngineRegistry:
    def __init__(self, settings: Settings, manifest: Manifest):
        self.settings = settings
        self.manifest = manifest
        self.status = EngineStatus()
        # Set once ``start`` has finished, the engines loaded or not (``status`` says which).
        self.settled = asyncio.Event()
        self._loaded: dict[tuple[Role, str], Any] = {}
        self._locks: dict[tuple[Role, str], asyncio.Lock] = {}

    # -- loading -----------------------------------------------------------------------------
    def _build(self, role: Role, model_id: str) -> Any:
        s = self.settings
        path = self.manifest.path(model_id, role)  # raises ModelNotInstalled / ModelCorrupt
        if role == "vad":
            from .vad import SileroVad

            return SileroVad(path / "silero_vad.onnx", threads=s.threads.vad)
        if role == "asr":
            import dataclasses

            from .asr import DECODE_OPTIONS, WhisperAsr

            window = s.asr.window_s if s.asr.window_s > 0 else None
            retry = s.asr.retry_window_s if s.asr.retry_window_s > 0 else None
            return WhisperAsr(
                model_id, path, threads=s.threads.asr, device=s.gpu.asr_device,
                compute_type=s.gpu.asr_compute_type, workers=s.asr.workers,
                options=dataclasses.replace(DECODE_OPTIONS, window_s=window, retry_window_s=retry),
            )  # fmt: skip
        if role == "llm":
            from .llm import LlamaLlm

            spec = self.manifest.get(model_id)
            context = min(s.llm.context_size, int(spec.params.get("context_size", s.llm.context_size)))
            weights = weights_file(spec, path, derived=s.llm.requantized)
            log.info("llm %s: loading %s", model_id, weights.name)
            return LlamaLlm(
                model_id, weights, context_size=context, threads=s.threads.llm,
                batch_threads=s.threads.llm_batch or s.threads.llm, shared_threads=s.threads.llm_shared,
                slots=s.llm.slots,
                gpu_layers=s.gpu.llm_gpu_layers,
            )  # fmt: skip
        if role == "tts":
            from .tts import PiperTts

            return PiperTts(
                model_id, path, threads=s.threads.tts, memory_arena=s.tts.memory_arena,
                phrase_cache_bytes=int(s.tts.phrase_cache_mb * 2**20),
            )  # fmt: skip
        if role == "embed":
            from .embed import MiniLmEmbedder

            return MiniLmEmbedder(model_id, path, threads=s.threads.embed)
        raise ModelError(f"unknown role {role}")

    async def get(self, role: Role, model_id: str | None = None) -> Any:
        model_id = model_id or getattr(self.settings.models, role)
        key = (role, model_id)
        engine = self._loaded.get(key)
        if engine is not None:
            return engine
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            engine = self._loaded.get(key)
            if engine is None:
                started = time.monotonic()
                engine = await asyncio.to_thread(self._build, role, model_id)
                self.status.load_seconds[f"{role}:{model_id}"] = round(time.monotonic() - started, 3)
                log.info("loaded %s model %s in %.1fs", role, model_id, time.monotonic() - started)
                self._loaded[key] = engine
        return engine

    def peek(self, role: Role, model_id: str | None = None) -> Any | None:
        return self._loaded.get((role, model_id or getattr(self.settings.models, role)))

    def is_installed(self, role: Role, model_id: str) -> bool:
        try:
            spec = self.manifest.get(model_id, role)
        except ModelError:
            return False
        return self.manifest.is_installed(spec)

    async def start(self) -> None:
        """Load and warm the default model of every role. Failures are recorded, not raised: the
        server stays up (``/health``) but never reports ready."""
        self.status.loading = True
        try:
            for role in ("vad", "embed", "asr", "tts", "llm"):
                await self.get(role)
            self.status.ready = True
        except ModelError as exc:
            self.status.error = str(exc)
            log.error("engines not ready: %s", exc)
        except Exception as exc:  # a broken model file can fail deep inside a native loader
            self.status.error = f"{type(exc).__name__}: {exc}"
            log.exception("engines not ready")
        finally:
            self.status.loading = False
            self.settled.set()

    def close(self) -> None:
        for engine in self._loaded.values():
            closer: Callable[[], None] | None = getattr(engine, "close", None)
            if closer is not None:
                closer()
        self._loaded.clear()

    # -- typed accessors ---------------------------------------------------------------------
    async def vad(self) -> VadModel:
        return await self.get("vad")

    async def asr(self, model_id: str | None = None) -> AsrEngine:
        return await self.get("asr", model_id)

    async def llm(self, model_id: str | None = None) -> LlmEngine:
        return await self.get("llm", model_id)

    async def tts(self, voice_id: str | None = None) -> TtsEngine:
        return await self.get("tts", voice_id)

    async def embed(self) -> Embedder:
        return await self.get("embed")
