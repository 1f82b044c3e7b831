"""Sentence embeddings with all-MiniLM-L6-v2, as a plain numpy forward pass.

The model is a 6-layer BERT; sentence-transformers' recipe is mean pooling over the attention mask
followed by L2 normalisation. Doing it in numpy keeps torch out of the server and costs a few ms per
short text on one core.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from ..model_manifest import ModelCorrupt, ModelNotInstalled
from .priority import CPU
from .types import FloatArray

log = logging.getLogger(__name__)

MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
BATCH_SIZE = 32

_F = npt.NDArray[np.float32]


@dataclass(frozen=True)
class _Layer:
    qkv_w: _F  # (hidden, 3*hidden): query, key and value in one matmul
    qkv_b: _F
    out_w: _F
    out_b: _F
    ln1_g: _F
    ln1_b: _F
    up_w: _F
    up_b: _F
    down_w: _F
    down_b: _F
    ln2_g: _F
    ln2_b: _F


@functools.cache
def _blas_thread_setter() -> Callable[[int], object] | None:
    """OpenBLAS's per-thread thread-count setter from numpy's bundled OpenBLAS, if there is one.

    Measured on a busy 2-core box: one 384-dim query took 650 ms with OpenBLAS's default 2 threads
    (its threads spin at barriers while the cores are taken) and 60 ms with 1. The setting is
    thread-local, so it touches nothing but the threads that embed."""
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for lib in sorted(libs.glob("*openblas*.so*")):
        try:
            setter = ctypes.CDLL(str(lib)).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.argtypes = [ctypes.c_int]
        setter.restype = ctypes.c_int
        return setter
    log.info("numpy's OpenBLAS has no per-thread setter; embedding uses its default threads")
    return None


def _erf(x: _F) -> _F:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32 resolution of the activations);
    # numpy has no erf and BERT's "gelu" is the exact erf form, not the tanh approximation.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (sign * (1.0 - poly * np.exp(-a * a))).astype(np.float32)


def _gelu(x: _F) -> _F:
    return (0.5 * x * (1.0 + _erf(x * np.float32(1 / np.sqrt(2))))).astype(np.float32)


def _layer_norm(x: _F, gamma: _F, beta: _F, eps: float) -> _F:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + eps) * gamma + beta).astype(np.float32)


class MiniLmEmbedder:
    dimensions = 384

    def __init__(self, model_id: str, model_dir: Path, *, threads: int = 1):
        self.model_id = model_id
        self.model_dir = Path(model_dir)
        # ``threads`` caps OpenBLAS in every thread that embeds (see _blas_thread_setter); the
        # engine itself has one worker thread, so concurrent requests queue instead of competing.
        self.threads = max(1, threads)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._closed = threading.Event()
        config = self._read_config()
        self._heads = int(config["num_attention_heads"])
        self._hidden = int(config["hidden_size"])
        self._eps = float(config.get("layer_norm_eps", 1e-12))
        if self._hidden != self.dimensions:
            raise ModelCorrupt(f"{self.model_dir / 'config.json'}: hidden_size {self._hidden}, expected 384")
        self._tokenizer = self._load_tokenizer()
        self._load_weights(int(config["num_hidden_layers"]))
        self.embed_sync(["warm up"])

    # -- loading -----------------------------------------------------------------------------
    def _file(self, name: str) -> Path:
        path = self.model_dir / name
        if not path.is_file():
            raise ModelNotInstalled(
                f"{path}: missing; run `python -m appliance models install {self.model_id}`"
            )
        return path

    def _read_config(self) -> dict[str, Any]:
        path = self._file("config.json")
        try:
            config: dict[str, Any] = json.loads(path.read_text())
        except ValueError as exc:
            raise ModelCorrupt(f"{path}: not valid JSON: {exc}") from exc
        return config

    def _load_tokenizer(self) -> Tokenizer:
        path = self._file("tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers package raises a bare Exception on bad files
            raise ModelCorrupt(f"{path}: cannot load tokenizer: {exc}") from exc
        tok.enable_truncation(MAX_TOKENS)
        tok.no_padding()  # padded per length-sorted batch in embed_sync instead
        return tok

    def _load_weights(self, n_layers: int) -> None:
        from safetensors.numpy import load_file

        path = self._file("model.safetensors")
        try:
            raw = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types from Rust
            raise ModelCorrupt(f"{path}: cannot read safetensors: {exc}") from exc
        # Some exports prefix every key with "bert."
        w = {k.removeprefix("bert."): v.astype(np.float32) for k, v in raw.items()}

        def get(key: str) -> _F:
            try:
                return w[key]
            except KeyError:
                raise ModelCorrupt(f"{path}: tensor {key} missing") from None

        self._word = get("embeddings.word_embeddings.weight")
        self._pos = get("embeddings.position_embeddings.weight")
        self._type0 = get("embeddings.token_type_embeddings.weight")[0]
        self._emb_ln = (get("embeddings.LayerNorm.weight"), get("embeddings.LayerNorm.bias"))
        self._layers: list[_Layer] = []
        for i in range(n_layers):
            p = f"encoder.layer.{i}."
            att = p + "attention."
            # torch Linear stores (out, in); transpose once so the hot path is x @ W.
            qkv_w = np.concatenate(
                [get(f"{att}self.{n}.weight").T for n in ("query", "key", "value")], axis=1
            )
            qkv_b = np.concatenate([get(f"{att}self.{n}.bias") for n in ("query", "key", "value")])
            self._layers.append(
                _Layer(
                    qkv_w=np.ascontiguousarray(qkv_w),
                    qkv_b=qkv_b,
                    out_w=np.ascontiguousarray(get(att + "output.dense.weight").T),
                    out_b=get(att + "output.dense.bias"),
                    ln1_g=get(att + "output.LayerNorm.weight"),
                    ln1_b=get(att + "output.LayerNorm.bias"),
                    up_w=np.ascontiguousarray(get(p + "intermediate.dense.weight").T),
                    up_b=get(p + "intermediate.dense.bias"),
                    down_w=np.ascontiguousarray(get(p + "output.dense.weight").T),
                    down_b=get(p + "output.dense.bias"),
                    ln2_g=get(p + "output.LayerNorm.weight"),
                    ln2_b=get(p + "output.LayerNorm.bias"),
                )  # fmt: skip
            )

    # -- inference ---------------------------------------------------------------------------
    def _forward(self, ids: npt.NDArray[np.int64], mask: _F) -> _F:
        batch, seq = ids.shape
        heads, dim = self._heads, self._hidden // self._heads
        x = self._word[ids] + self._pos[:seq][None, :, :] + self._type0
        x = _layer_norm(x, *self._emb_ln, self._eps)
        # Padded keys get -inf-like scores so they carry no attention weight.
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        scale = np.float32(1.0 / np.sqrt(dim))
        for layer in self._layers:
            qkv = x @ layer.qkv_w + layer.qkv_b  # (b, s, 3h)
            qkv = qkv.reshape(batch, seq, 3, heads, dim).transpose(2, 0, 3, 1, 4)  # (3, b, H, s, d)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, self._hidden)
            x = _layer_norm(ctx @ layer.out_w + layer.out_b + x, layer.ln1_g, layer.ln1_b, self._eps)
            h = _gelu(x @ layer.up_w + layer.up_b)
            x = _layer_norm(h @ layer.down_w + layer.down_b + x, layer.ln2_g, layer.ln2_b, self._eps)
        summed = (x * mask[:, :, None]).sum(axis=1)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)

    def embed_sync(self, texts: Sequence[str]) -> FloatArray:
        """Blocking: (len(texts), 384) float32, L2-normalised. For callers already off the loop
        (Chroma's embedding function runs in a worker thread)."""
        if isinstance(texts, str):
            raise TypeError("embed_sync takes a sequence of texts, not one string")
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return out
        setter = _blas_thread_setter()
        if setter is not None:
            setter(self.threads)
        encodings = self._tokenizer.encode_batch(list(texts))
        # Sorting by length keeps each batch's padding (and wasted attention) small.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        with CPU.working():  # counted: the LLM may step with fewer threads meanwhile (llm_shared)
            for start in range(0, len(order), BATCH_SIZE):
                idx = order[start : start + BATCH_SIZE]
                width = max(1, max(len(encodings[i].ids) for i in idx))
                ids = np.zeros((len(idx), width), dtype=np.int64)
                mask = np.zeros((len(idx), width), dtype=np.float32)
                for row, i in enumerate(idx):
                    enc = encodings[i]
                    n = len(enc.ids)
                    ids[row, :n] = enc.ids
                    mask[row, :n] = 1.0
                out[idx] = self._forward(ids, mask)
        return out

    async def embed(self, texts: Sequence[str]) -> FloatArray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.embed_sync, list(texts))

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._executor.shutdown(wait=False, cancel_futures=True)
