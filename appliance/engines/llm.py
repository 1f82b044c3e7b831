"""Local LLM on llama.cpp (llama-cpp-python): streamed, cancellable, optionally grammar-constrained.

One ``Llama`` context is not thread-safe and holds the KV cache of its last evaluation. Every
generation therefore runs on the engine's single worker thread: requests queue there, and each call
reuses the longest common token prefix of the previous one (llama-cpp-python does this by itself as
long as the same ``Llama`` object is called with a token list that starts the same way), so a
conversation's system prompt and history are not re-evaluated every turn. When several
conversations take turns, snapshots of their KV cells (``_PrefixStates``) bring each one's prefix
back instead of re-evaluating it.

Pieces reach the consumer through a bounded queue; closing the iterator (``aclose``, or
cancellation while it waits for the next piece) stops generation at the next token. A consumer that
can be cancelled while busy with a piece should hold the iterator in ``contextlib.aclosing``.

With ``json_schema`` the output is constrained by a GBNF grammar generated from the schema, with
string characters tightened to exclude control characters; constrained decoding checks the
grammar on the few best tokens only (``_GrammarFirstSampler``), which is much cheaper than masking
the whole vocabulary at every step.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import re
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import llama_cpp
import numpy as np
import numpy.typing as npt

from ..model_manifest import ModelCorrupt, ModelNotInstalled
from .priority import CPU

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# Pieces a consumer may fall behind before the worker waits for it. Small: a stalled consumer
# (a caller that stopped reading) should cost a few tokens of wasted work, not a whole reply.
QUEUE_SIZE = 8
# The longest a generation pauses for urgent work between two tokens.
URGENT_MAX_WAIT_S = 0.5
# JSON string characters allowed by the grammar: no quote, no backslash (escapes have their own
# rule), and no control characters, so a small model cannot loop on raw newlines inside a string.
STRICT_STRING_CHAR = r'[^"\\\x7F\x00-\x1F]'
_CHAR_RULE = re.compile(r'^(char ::= )\[\^"\\\\\](.*)$', re.MULTILINE)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class PromptTooLong(ValueError):
    """The prompt does not fit the context window (leave room for the reply)."""


@dataclass
class GenerationStats:
    """Timings and counts of one generation, for benchmarks and logs."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens not re-evaluated (KV cache in place or restored)
    restored_tokens: int = 0  # prompt prefix brought back from a saved conversation state
    completion_tokens: int = 0
    queued_s: float = 0.0  # waiting behind other generations on this engine
    first_token_s: float | None = None  # from the start of this generation (excludes queueing)
    total_s: float = 0.0
    finish: str = ""  # "stop" | "length" | "cancelled" | "error"

    @property
    def tokens_per_s(self) -> float:
        decode = self.total_s - (self.first_token_s or 0.0)
        return (self.completion_tokens - 1) / decode if self.completion_tokens > 1 and decode > 0 else 0.0


_END = object()


@dataclass(eq=False)  # identity hashing: jobs live in a set
class _Job:
    """What the event-loop side and the worker thread share for one generation."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    # The queue itself is unbounded on the loop side; these credits bound it from the thread side,
    # so the worker blocks (without touching the loop) while the consumer is QUEUE_SIZE pieces behind.
    credits: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(QUEUE_SIZE))
    stop: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    stats: GenerationStats = field(default_factory=GenerationStats)

    def post(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.stop.set()

    def send(self, piece: str) -> bool:
        """Worker side: deliver one piece, waiting for room. False once the consumer has gone."""
        self.credits.acquire()
        if self.stop.is_set():
            return False
        self.post(piece)
        return True

    def cancel(self) -> None:
        self.stop.set()
        self.credits.release()  # wakes a worker blocked in send()


def check_gguf(path: Path, model_id: str) -> None:
    """Fail with a message naming the file before llama.cpp sees something that is not a GGUF."""
    if not path.is_file():
        raise ModelNotInstalled(
            f"{path}: model file missing; run `python -m appliance models install {model_id}`"
        )
    with path.open("rb") as fh:
        header = fh.read(8)
    if len(header) < 8 or header[:4] != GGUF_MAGIC:
        raise ModelCorrupt(f"{path}: not a GGUF model file (header {header[:4]!r}, expected {GGUF_MAGIC!r})")
    (version,) = struct.unpack("<I", header[4:8])
    if version not in (2, 3):
        raise ModelCorrupt(f"{path}: unsupported GGUF version {version}")


def tighten_string_chars(gbnf: str) -> str:
    """Replace the JSON string character class of a generated grammar with one that excludes
    control characters (see ``STRICT_STRING_CHAR``)."""
    tightened, count = _CHAR_RULE.subn(lambda m: m.group(1) + STRICT_STRING_CHAR + m.group(2), gbnf)
    if count == 0 and re.search(r"^char ::=", gbnf, re.MULTILINE):
        raise ValueError("unexpected string rule in generated grammar; cannot tighten it")
    return tightened


class LlamaLlm:
    supports_grammar = True  # ``stream(grammar=...)`` takes raw GBNF

    def __init__(
        self,
        model_id: str,
        model_path: Path,
        *,
        context_size: int,
        threads: int,
        batch_threads: int | None = None,
        gpu_layers: int = 0,
        state_cache_bytes: int = 256 << 20,
        replicas: int = 1,
    ):
        self.model_id = model_id
        self.model_path = Path(model_path)
        self.context_size = context_size
        self.last_stats = GenerationStats()
        check_gguf(self.model_path, model_id)
        self.threads = threads
        self.batch_threads = batch_threads or threads
        # Several contexts over one memory-mapped copy of the weights: one call's long reply no
        # longer holds up another call's first words. Each runs with all threads while alone and
        # shares them when others generate too (see ``_fit_threads``).
        self._replicas: list[_Llama] = []
        try:
            for _ in range(max(1, replicas)):
                self._replicas.append(
                    _Llama(
                        model_path=str(self.model_path), n_ctx=context_size, n_threads=threads,
                        n_threads_batch=self.batch_threads, n_gpu_layers=gpu_layers, verbose=False,
                    )
                )  # fmt: skip
        except ValueError as exc:  # llama-cpp-python reports any load failure as ValueError
            for replica in self._replicas:
                replica.close()
            raise ModelCorrupt(f"{self.model_path}: llama.cpp could not load it ({exc})") from exc
        self._llama = self._replicas[0]  # vocabulary, template and metadata
        self.context_size = int(self._llama.n_ctx())  # what llama.cpp actually allocated
        self._add_bos = bool(self._llama._model.add_bos_token())
        self._executor = ThreadPoolExecutor(
            max_workers=len(self._replicas), thread_name_prefix=f"llm-{model_id}"
        )
        self._free: list[_Llama] = list(self._replicas)
        self._pool_lock = threading.Lock()
        self._jobs: set[_Job] = set()
        self._states = _PrefixStates(state_cache_bytes)
        self._running_count = 0
        self._grammars: dict[str, Any] = {}
        self._grammar_lock = threading.Lock()
        self._template = self._compile_template()
        self._closed = False
        # The first evaluation allocates compute buffers and pages the weights in.
        for replica in self._replicas:
            replica.create_completion(self._tokenize("Hello"), max_tokens=2, temperature=0.0)

    # -- prompts -----------------------------------------------------------------------------
    def _compile_template(self) -> Any:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        source = self._llama.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        try:
            return env.from_string(source)
        except TemplateError:
            log.warning("%s: chat template in GGUF does not compile; using ChatML", self.model_id)
            return env.from_string(CHATML_TEMPLATE)

    def format_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        model = self._llama._model
        rendered: str = self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=model.token_get_text(self._llama.token_bos()) if self._add_bos else "",
            eos_token=model.token_get_text(self._llama.token_eos()),
        )
        return rendered

    def _tokenize(self, text: str) -> list[int]:
        tokens: list[int] = self._llama.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=True)
        return tokens

    def count_tokens(self, text: str) -> int:
        # Tokenising reads only the vocabulary, never the context, so it is safe beside a generation.
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    # -- grammar -----------------------------------------------------------------------------
    def grammar_text(self, schema: dict[str, Any]) -> str:
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        return tighten_string_chars(json_schema_to_gbnf(json.dumps(schema)))

    def _grammar(self, schema: dict[str, Any] | None, text: str | None = None) -> Any:
        """The compiled grammar of a JSON schema, or of raw GBNF ``text``; cached."""
        key = text if text is not None else json.dumps(schema, sort_keys=True)
        with self._grammar_lock:
            grammar = self._grammars.get(key)
            if grammar is None:
                source = text if text is not None else self.grammar_text(schema or {})
                grammar = llama_cpp.LlamaGrammar.from_string(source, verbose=False)
                if len(self._grammars) >= 256:  # schemas come from agent configs: few, but bound it
                    self._grammars.pop(next(iter(self._grammars)))
                self._grammars[key] = grammar
            return grammar

    # -- generation --------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Generations submitted and not finished (the running one included)."""
        return len(self._jobs)

    @property
    def busy(self) -> bool:
        """True while a worker thread is inside a generation."""
        return self._running_count > 0

    @property
    def replicas(self) -> int:
        return len(self._replicas)

    def _acquire(self, tokens: list[int]) -> _Llama:
        """A free context, preferring the one whose KV cache already holds most of ``tokens``.
        There is always one: the executor runs at most one job per context."""
        with self._pool_lock:
            best = max(
                range(len(self._free)),
                key=lambda i: _common_prefix_np(
                    np.asarray(self._free[i].input_ids[: self._free[i].n_tokens]),
                    np.array(tokens, dtype=np.intc),
                ),
            )
            llama = self._free.pop(best)
            self._running_count += 1
            return llama

    def _release(self, llama: _Llama) -> None:
        with self._pool_lock:
            self._running_count -= 1
            self._free.append(llama)

    def _fit_threads(self, llama: _Llama) -> None:
        """All threads while alone; a fair share while other contexts generate too (more threads
        than cores make llama.cpp's per-layer barriers wait on descheduled threads)."""
        if len(self._replicas) == 1:
            return
        share = max(1, self.threads // max(1, self._running_count))
        batch = max(1, self.batch_threads // max(1, self._running_count))
        if (share, batch) != getattr(llama, "_fitted_threads", None):
            llama_cpp.llama_set_n_threads(llama._ctx.ctx, share, batch)
            llama._fitted_threads = (share, batch)  # type: ignore[attr-defined]

    def _generate(
        self, job: _Job, prompt: str, max_tokens: int, temperature: float,
        json_schema: dict[str, Any] | None, stop: list[str], gbnf: str | None = None,
        cache_key: str | None = None, save_state: bool = True,
    ) -> None:  # fmt: skip
        """Worker thread: run one completion, posting text pieces to ``job``; always posts _END."""
        stats = job.stats
        started = time.monotonic()
        stats.queued_s = started - job.submitted
        job.started.set()
        llama: _Llama | None = None
        try:
            if job.stop.is_set():
                stats.finish = "cancelled"
                return
            grammar = (
                self._grammar(json_schema, gbnf) if json_schema is not None or gbnf is not None else None
            )
            tokens = self._tokenize(prompt)
            stats.prompt_tokens = len(tokens)
            if len(tokens) + 1 >= self.context_size:
                raise PromptTooLong(
                    f"prompt of {len(tokens)} tokens does not fit {self.model_id}'s context of "
                    f"{self.context_size}"
                )
            llama = self._acquire(tokens)
            self._fit_threads(llama)
            stats.restored_tokens = self._states.restore(llama, tokens)
            stats.cached_tokens = _common_prefix(llama._input_ids.tolist(), tokens)
            stats.finish = "length"

            def after_token(_ids: Any, _logits: Any) -> bool:
                # Runs after every sampled token, including ones held back while a stop string may
                # be forming, so cancellation never waits for the next visible piece.
                stats.completion_tokens += 1
                self._fit_threads(llama)
                if not job.stop.is_set():
                    # Urgent work (a first clause being synthesized) runs alone; the rest of this
                    # generation only has to stay ahead of the audio already playing.
                    CPU.yield_to_urgent(URGENT_MAX_WAIT_S)
                return job.stop.is_set()

            chunks = llama.create_completion(
                tokens, max_tokens=max_tokens, temperature=temperature, stop=stop or [],
                grammar=grammar, stream=True, stopping_criteria=llama_cpp.StoppingCriteriaList([after_token]),
            )  # fmt: skip
            for chunk in cast(Iterator[dict[str, Any]], chunks):
                choice = chunk["choices"][0]
                text: str = choice["text"]
                if text:
                    if stats.first_token_s is None:
                        stats.first_token_s = time.monotonic() - started
                    if not job.send(text):
                        break
                if choice.get("finish_reason"):
                    stats.finish = choice["finish_reason"]
            if job.stop.is_set():
                stats.finish = "cancelled"
            if save_state:
                self._states.save(llama, cache_key)
        except Exception:
            stats.finish = "error"
            raise
        finally:
            stats.total_s = time.monotonic() - started
            self.last_stats = stats
            log.info(
                "llm %s: prompt %d tokens (%d cached, %d restored), %d generated, queued %.0f ms, "
                "first token %.0f ms, %.1f tokens/s, %s",
                self.model_id, stats.prompt_tokens, stats.cached_tokens, stats.restored_tokens,
                stats.completion_tokens, stats.queued_s * 1000, (stats.first_token_s or 0) * 1000,
                stats.tokens_per_s, stats.finish,
            )  # fmt: skip
            if llama is not None:
                self._release(llama)
            job.post(_END)

    async def stream(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        stop: Sequence[str] = (),
        grammar: str | None = None,
        cache_key: str | None = None,
        save_state: bool = True,
    ) -> AsyncGenerator[str, None]:
        """See ``LlmEngine.stream``. ``grammar``: raw GBNF instead of ``json_schema``.
        ``cache_key`` names the conversation: its saved KV state replaces the previous one under the
        same key, so interleaved calls keep one state each. ``save_state=False``: a step whose
        state the next one supersedes at once (not worth a copy, nor the room it would take)."""
        if json_schema is not None and grammar is not None:
            raise ValueError("give json_schema or grammar, not both")
        if self._closed:
            raise RuntimeError(f"LLM {self.model_id} is closed")
        loop = asyncio.get_running_loop()
        job = _Job(loop)
        self._jobs.add(job)
        future = loop.run_in_executor(
            self._executor, self._generate, job, prompt, max_tokens, temperature, json_schema, list(stop),
            grammar, cache_key, save_state,
        )  # fmt: skip
        try:
            while True:
                item = await job.queue.get()
                if item is _END:
                    break
                job.credits.release()
                yield str(item)
            await future  # re-raises the worker's exception, if any
        finally:
            job.cancel()
            if not job.started.is_set():
                future.cancel()  # still queued behind another generation: drop it from the queue
            # The worker checks the flag after every token, so this waits for one token at most
            # and no further tokens are computed once we return.
            await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # mark retrieved; it was raised above if it mattered
            self._jobs.discard(job)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for job in list(self._jobs):
            job.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._states = _PrefixStates(0)
        for replica in self._replicas:
            replica.close()


class _PrefixStates:
    """KV-cache snapshots of recent conversations, so interleaved conversations keep their prefixes.

    llama.cpp keeps one evaluated sequence; with several calls taking turns on one engine, each turn
    would otherwise re-evaluate its whole system prompt and history (seconds on 2 cores). After each
    generation the sequence's KV cells are copied out (~12 KB per token for Qwen2.5-0.5B); before
    the next, the snapshot sharing the longest prefix with the new prompt is copied back in when it
    beats what is already loaded. (llama-cpp-python's own LlamaRAMCache also copies a
    (n_batch x vocabulary) logits array per save, hundreds of MB here, so it is not used.)
    """

    MIN_TOKENS = 64  # shorter prefixes are cheaper to re-evaluate than to keep

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._states: OrderedDict[bytes, tuple[npt.NDArray[np.intc], bytes]] = OrderedDict()
        self._by_key: dict[str, bytes] = {}  # conversation -> its state's key in ``_states``
        self._size = 0
        self._lock = threading.RLock()  # several contexts save and restore from their own threads

    def __len__(self) -> int:
        return len(self._states)

    def save(self, llama: llama_cpp.Llama, conversation: str | None = None) -> None:
        with self._lock:
            self._save(llama, conversation)

    def _save(self, llama: llama_cpp.Llama, conversation: str | None) -> None:
        n = llama.n_tokens
        if n < self.MIN_TOKENS or self.capacity_bytes <= 0:
            return
        tokens = np.array(llama.input_ids[:n], dtype=np.intc)
        key = tokens.tobytes()
        if key in self._states:
            self._states.move_to_end(key)
            previous = self._by_key.get(conversation) if conversation else None
            if previous is not None and previous != key and previous in self._states:
                self._drop(previous)
            if conversation:
                self._by_key[conversation] = key
            return
        ctx = llama._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
        if not 0 < written <= size:
            return
        # An earlier state of the same conversation (named, or a prefix of this one) is superseded.
        previous = self._by_key.get(conversation) if conversation else None
        for old in [
            k for k, (t, _) in self._states.items() if k == previous or _common_prefix_np(t, tokens) == len(t)
        ]:
            self._drop(old)
        if conversation:
            self._by_key[conversation] = key
        self._states[key] = (tokens, ctypes.string_at(buf, written))
        self._size += written
        while self._size > self.capacity_bytes and self._states:
            self._drop(next(iter(self._states)))

    def restore(self, llama: llama_cpp.Llama, prompt: list[int]) -> int:
        """Load the snapshot sharing the longest prefix with ``prompt`` if it beats the KV cache
        already in place; returns the length of that shared prefix (0 if nothing was loaded)."""
        with self._lock:
            return self._restore(llama, prompt)

    def _restore(self, llama: llama_cpp.Llama, prompt: list[int]) -> int:
        target = np.array(prompt, dtype=np.intc)
        current = _common_prefix_np(np.asarray(llama.input_ids[: llama.n_tokens]), target)
        best_key, best = None, current
        for key, (tokens, _) in self._states.items():
            shared = _common_prefix_np(tokens, target)
            if shared > best:
                best_key, best = key, shared
        if best_key is None or best - current < self.MIN_TOKENS:
            return 0
        tokens, data = self._states[best_key]
        self._states.move_to_end(best_key)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, buf, len(data), 0) != len(data):
            # The sequence may be half-written: make llama-cpp-python evaluate from scratch.
            llama.reset()
            llama._ctx.kv_cache_seq_rm(-1, 0, -1)
            return 0
        llama.input_ids[: len(tokens)] = tokens
        llama.n_tokens = len(tokens)
        llama._requires_eval = True  # no logits for the restored state: the last token is replayed
        return best

    def _drop(self, key: bytes) -> None:
        _, data = self._states.pop(key)
        self._size -= len(data)
        for name in [n for n, k in self._by_key.items() if k == key]:
            del self._by_key[name]


def _common_prefix_np(a: npt.NDArray[np.intc], b: npt.NDArray[np.intc]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class _GrammarFirstSampler:
    """Grammar-constrained sampling that asks the grammar about a few tokens, not the vocabulary.

    llama.cpp's grammar sampler tests every vocabulary entry against the grammar at every step; with
    Qwen's 152k-token vocabulary that single-threaded work costs more than the forward pass itself
    (measured: a call's reply at 11 tokens/s instead of 22). Greedy (``temperature == 0``): take
    the argmax and ask the grammar about that one token, then about the ``top_k`` best. Sampled:
    ask it about the ``top_k`` best tokens only, then apply top-p, min-p and the temperature among
    those it allows, as llama.cpp's chain does. Only when none of them is allowed is the whole
    vocabulary masked. Greedy results are exact; sampled ones differ from llama.cpp's order
    (grammar first, then top-k) only when fewer than ``top_k`` of the best tokens are allowed, in
    the tail that top-p and min-p cut anyway.
    """

    def __init__(
        self,
        llama: llama_cpp.Llama,
        grammar: llama_cpp.LlamaGrammar,
        *,
        temp: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        seed: int | None = None,
    ):
        self._vocab = llama._model.vocab
        self._n_vocab = llama.n_vocab()
        ptr = llama_cpp.llama_sampler_init_grammar(
            self._vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
        if not ptr:
            raise ValueError("llama.cpp could not parse the grammar")
        self._grammar = ptr
        # Freed when generate() replaces this sampler with the next one and it is collected.
        weakref.finalize(self, llama_cpp.llama_sampler_free, ptr)
        self.temp = temp
        self.top_k = max(1, min(top_k if top_k > 0 else 40, self._n_vocab))
        self.top_p = top_p
        self.min_p = min_p
        self._rng = np.random.default_rng(seed)
        self._some = np.zeros(self.top_k, dtype=_TOKEN_DATA)
        self._some_p = llama_cpp.llama_token_data_array(
            data=self._some.ctypes.data_as(llama_cpp.llama_token_data_p), size=1, selected=-1, sorted=False
        )
        self._all = np.zeros(self._n_vocab, dtype=_TOKEN_DATA)
        self._all_p = llama_cpp.llama_token_data_array(
            data=self._all.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=self._n_vocab, selected=-1, sorted=False,
        )  # fmt: skip
        self._ids = np.arange(self._n_vocab, dtype=np.int32)

    def _allowed(self, ids: npt.NDArray[np.int32], logits: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
        """Which of ``ids`` (at most ``top_k``) the grammar allows next."""
        n = len(ids)
        self._some["id"][:n] = ids
        self._some["logit"][:n] = logits
        self._some_p.size, self._some_p.selected = n, -1
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._some_p))
        return np.isfinite(self._some["logit"][:n])

    def _mask_all(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self._all["id"] = self._ids
        self._all["logit"] = logits
        self._all_p.size, self._all_p.selected = self._n_vocab, -1
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._all_p))
        masked: npt.NDArray[np.float32] = self._all["logit"].copy()
        return masked

    def sample(self, ctx: Any, idx: int = -1) -> int:
        logits_p = llama_cpp.llama_get_logits_ith(ctx.ctx, idx)
        logits = np.ctypeslib.as_array(logits_p, shape=(self._n_vocab,))
        if self.temp <= 0.0:
            token = int(np.argmax(logits))
            if not self._allowed(np.array([token], dtype=np.int32), logits[[token]])[0]:
                # Rejected: the best allowed token is usually among the next best few.
                top = np.argpartition(logits, -self.top_k)[-self.top_k :].astype(np.int32)
                top = top[np.argsort(-logits[top], kind="stable")]
                allowed = np.flatnonzero(self._allowed(top, logits[top]))
                if allowed.size:
                    token = int(top[allowed[0]])
                else:
                    masked = self._mask_all(logits)
                    token = int(np.argmax(masked))
                    if not np.isfinite(masked[token]):
                        return self._nothing_allowed()
        else:
            top = np.argpartition(logits, -self.top_k)[-self.top_k :].astype(np.int32)
            top = top[np.argsort(-logits[top], kind="stable")]
            ok = self._allowed(top, logits[top])
            ids, values = top[ok], logits[top][ok]
            if ids.size == 0:  # none of the best is allowed: mask the whole vocabulary
                masked = self._mask_all(logits)
                ids = np.flatnonzero(np.isfinite(masked)).astype(np.int32)
                if ids.size == 0:
                    return self._nothing_allowed()
                ids = ids[np.argsort(-masked[ids], kind="stable")][: self.top_k]
                values = masked[ids]
            token = self._draw(ids, values.astype(np.float64))
        llama_cpp.llama_sampler_accept(self._grammar, token)
        return token

    def _draw(self, ids: npt.NDArray[np.int32], logits: npt.NDArray[np.float64]) -> int:
        """top-p, then min-p, on the untempered distribution; then temperature (llama.cpp's order)."""
        probs = np.exp(logits - logits[0])
        probs /= probs.sum()
        keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1) if self.top_p < 1.0 else len(ids)
        keep = max(1, min(keep, len(ids)))
        if self.min_p > 0.0:
            keep = max(1, min(keep, int(np.count_nonzero(probs >= self.min_p * probs[0]))))
        tempered = np.exp((logits[:keep] - logits[0]) / self.temp)
        tempered /= tempered.sum()
        return int(ids[self._rng.choice(keep, p=tempered)])

    def _nothing_allowed(self) -> int:
        # Cannot happen with a well-formed grammar: end the output rather than feed the grammar a
        # token it rejects, which aborts inside llama.cpp.
        return int(llama_cpp.llama_vocab_eos(self._vocab))


class _Llama(llama_cpp.Llama):
    """``Llama`` with the grammar-first sampler for constrained generations."""

    grammar_first = True  # False: llama.cpp's own full-vocabulary grammar sampler (for comparison)

    def _init_sampler(self, **kwargs: Any) -> Any:  # type: ignore[override]
        plain = (
            kwargs.get("logits_processor") is None
            and kwargs.get("repeat_penalty", 1.0) == 1.0
            and kwargs.get("frequency_penalty", 0.0) == 0.0
            and kwargs.get("presence_penalty", 0.0) == 0.0
            and kwargs.get("mirostat_mode", 0) == 0
            and kwargs.get("typical_p", 1.0) == 1.0
            and kwargs.get("temp", 0.8) >= 0.0
        )
        if kwargs.get("grammar") is not None and plain and self.grammar_first:
            seed = self._seed if 0 <= self._seed < 0xFFFFFFFF else None
            return _GrammarFirstSampler(
                self, kwargs["grammar"], temp=float(kwargs.get("temp", 0.8)),
                top_k=int(kwargs.get("top_k", 40)), top_p=float(kwargs.get("top_p", 0.95)),
                min_p=float(kwargs.get("min_p", 0.05)), seed=seed,
            )  # fmt: skip
        return super()._init_sampler(**kwargs)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
