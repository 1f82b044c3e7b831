"""The narrow interfaces every engine offers. Services depend on these Protocols, never on the model
libraries, so tests can hand in scripted fakes and production the real engines."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
Int16Array = npt.NDArray[np.int16]


class ChoiceDiffers(Exception):
    """``LlmEngine.stream(choice_at=...)``: the model chose otherwise at that point of the prompt;
    ``args[0]`` is the text it chose."""


class VadStream(Protocol):
    """Per-call VAD state. ``push`` takes any number of 8 kHz int16 samples and returns the speech
    probability of every complete 32 ms window (256 samples) it finished, oldest first."""

    window_samples: int
    sample_rate: int

    def push(self, pcm: Int16Array) -> list[float]: ...

    def reset(self) -> None: ...


class VadModel(Protocol):
    def stream(self, sample_rate: int = 8000) -> VadStream: ...


@dataclass(frozen=True)
class Transcript:
    text: str
    audio_seconds: float
    elapsed_seconds: float
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0


class AsrEngine(Protocol):
    model_id: str

    async def transcribe(
        self, pcm16k: FloatArray, *, language: str | None = None, background: bool = False
    ) -> Transcript:
        """``pcm16k``: mono float32 in [-1, 1] at 16 kHz. ``background``: nobody waits for this
        one (words read ahead), so other work need not give way to it."""
        ...


class LlmEngine(Protocol):
    model_id: str
    context_size: int

    def count_tokens(self, text: str) -> int: ...

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        stop: Sequence[str] = (),
        grammar: str | None = None,
        cache_key: str | None = None,
        background: bool = False,
        choice_at: tuple[int, str, str] | None = None,
        avoid_opening: str | None = None,
    ) -> AsyncIterator[str]:
        """Stream text pieces of the completion of a raw (already templated) prompt. With
        ``json_schema`` the output is constrained by a grammar built from it; with ``grammar`` by
        that GBNF text (engines that cannot take one raise ``NotImplementedError``). Closing the
        iterator (``aclose`` or cancelling the consumer) stops generation at the next token.
        ``cache_key``: names the conversation, for engines that keep per-conversation prompt caches.
        ``background``: nobody waits for this one (a prewarm); engines may let other work go first.
        ``choice_at``: see ``LlamaLlm.stream`` (engines with ``supports_choice``).
        ``avoid_opening``: the completion may not begin with this text's first word (engines with
        ``supports_avoid_opening``)."""
        ...

    def format_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render ``[{"role": "system"|"user"|"assistant", "content": ...}]`` with the model's chat
        template into a raw prompt."""
        ...


class TtsEngine(Protocol):
    voice_id: str
    sample_rate: int

    def synthesize(
        self, text: str, *, speed: float = 1.0, urgent: bool = False, abandonable: bool = False
    ) -> AsyncIterator[Int16Array]:
        """Yield mono int16 PCM chunks at ``sample_rate`` as they are produced (sentence by sentence).
        ``urgent``: someone is waiting in silence for this (a reply's first clause); background work
        such as the rest of a generation yields the CPU to it (``engines.priority``).
        ``abandonable``: background work with time to spare; a sentence under way may be stopped
        when urgent work starts and redone after it."""
        ...


class Embedder(Protocol):
    model_id: str
    dimensions: int

    async def embed(self, texts: Sequence[str]) -> FloatArray:
        """(len(texts), dimensions) float32, L2-normalised."""
        ...

    def embed_sync(self, texts: Sequence[str]) -> FloatArray: ...
