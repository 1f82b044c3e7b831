"""Local LLM on llama.cpp (llama-cpp-python): streamed, cancellable, optionally grammar-constrained,
with every running generation decoded together in one batch.

One llama.cpp context holds ``slots`` sequences in a single (unified) KV cache. A scheduler thread
owns the context: each step it gathers one token from every generating sequence (and a chunk of
prompt from every one still reading its prompt) into one ``llama_decode`` call, then samples each
sequence's next token from its own row of logits. Calls therefore never queue behind another
call's whole reply, and on a CPU four sequences decode for about the cost of two.

Each slot keeps the tokens it has evaluated. A conversation (``cache_key``) returns to its own slot,
so its system prompt and history are never re-evaluated; a new conversation sharing a prefix with
any slot (the same agent's system prompt) starts from a copy of those KV cells (``seq_cp``: shared
cells, no data copied).

Latency first: a generation's prompt and first ``URGENT_TOKENS`` tokens are urgent (a caller waits
in silence for them). While any generation is urgent, the others (the rest of a reply already
being spoken, a prewarm) only get a step when they have waited ``BACKGROUND_MAX_WAIT_S``: on a CPU
a decode step costs nearly in proportion to the tokens in it; for the same reason, while one urgent
generation writes its first clause another reads its prompt ``URGENT_PROMPT_CHUNK`` tokens a step
(a remainder shorter than ``URGENT_PROMPT_SLACK`` with the chunk before it, not in a step of its own).
A slot goes to a generation someone waits for before any background one, and if none is free it
takes a prewarm's (``_admit``).

A background step that reads prompt (a prewarm, words read ahead: up to ``BACKGROUND_PROMPT_CHUNK``
tokens, 0.3-0.5 s on 2 cores) is abandoned when a generation someone waits for arrives or another
engine starts urgent work (``_abort_background``): llama.cpp drops the cells it wrote and the
prewarm reads that chunk again later. Never two steps in a row, so background work cannot starve;
a step that may not be abandoned reads only ``BACKGROUND_SAFE_CHUNK`` background tokens: the one
right after, which a reply arriving meanwhile then sits out for ~60 ms instead of 0.3-0.5 s, and one
with an urgent generation in it, which they would slow down as much.
A step whose work nobody wants any more is stopped the same way, whenever it runs: every generation
in it stopped (a reply cut off, a read-ahead withdrawn), or a prewarm whose own conversation's reply
arrives and takes its slot.

Generations reading the same prompt prefix at once (calls to the same agent starting together) do not
compute it side by side: a background one waits while another reads ahead, and any one still reading
its prompt copies the cells others have evaluated since it started (``_catch_up``).

Pieces reach the consumer through a queue bounded by ``QUEUE_SIZE`` (a sequence whose consumer is
that far behind is left out of the batch); closing the iterator (``aclose``, or cancellation while
it waits for the next piece) stops generation at the next step. A consumer that can be cancelled
while busy with a piece should hold the iterator in ``contextlib.aclosing``.

With ``json_schema`` the output is constrained by a GBNF grammar generated from the schema, with
string characters tightened to exclude control characters; constrained decoding checks the
grammar on the few best tokens only (``_GrammarFirstSampler``), which is much cheaper than masking
the whole vocabulary at every step.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import functools
import json
import logging
import re
import struct
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from ..model_manifest import ModelCorrupt, ModelNotInstalled
from .priority import CPU
from .types import ChoiceDiffers

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# Pieces a consumer may fall behind before its sequence sits out of the batch. Small: a stalled
# consumer (a caller that stopped reading) should cost a few tokens of wasted work, not a reply.
QUEUE_SIZE = 8
# The longest background generation pauses for urgent work (a first clause being synthesized, or
# another call's first tokens) before it gets a step anyway.
URGENT_MAX_WAIT_S = 0.5
BACKGROUND_MAX_WAIT_S = 0.5
# A generation's first tokens carry a reply's first clause: someone is waiting for them.
URGENT_TOKENS = 16
# Tokens per ``llama_decode`` call, and the most of one background prompt read in one step (so an
# urgent generation arriving meanwhile waits for a short step, not a whole prompt).
BATCH_TOKENS = 512
BACKGROUND_PROMPT_CHUNK = 32
# The most background prompt, all generations together, in a step that cannot be abandoned: right
# after an abandoned one, or beside an urgent generation. A reply that arrives meanwhile waits for
# the step to end; 4 tokens cost ~60 ms on 2 cores, a 32-token chunk 0.3-0.5 s (bench_load traces:
# the two slowest replies of a ramp had each sat out such a retry, 0.43 s beside a transcription).
BACKGROUND_SAFE_CHUNK = 4
# The most of an urgent prompt read in one step while another urgent generation is writing its first
# clause: on a 2-core CPU the 0.5B model reads 60-90 prompt tokens/s, so a 512-token step would hold
# that reply's next token for 6-8 s. 16 tokens cost ~0.2 s (32: ~0.4 s), for ~12% more reading time:
# at level 4 (bench_load, three alternating pairs) p95 3.43 / 2.70 / 3.10 s with 32, 3.12 / 2.56 /
# 2.45 s with 16.
URGENT_PROMPT_CHUNK = 16
# A remainder of fewer tokens than this goes into the chunk before it instead of a step of its own.
# Under load a step's fixed cost dominates: in bench_load traces a 2-10-token remainder step beside a
# writing reply took 119-430 ms, while a token more in the chunk costs ~12 ms; the writer gets as many
# tokens either way. (11 of 209 replies read 17-36 new tokens while another wrote; they sat at the
# tail, 585-1,143 ms to their first token.)
URGENT_PROMPT_SLACK = 12
# A shared prefix shorter than this is cheaper to evaluate than to bring over from another slot.
MIN_SHARED_PREFIX = 16
# Conversations whose first prompt's length is remembered (see ``LlamaLlm.release``).
_BASES = 1024
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
    cached_tokens: int = 0  # prompt tokens not evaluated (in the slot's KV cells, own or copied)
    restored_tokens: int = 0  # prompt prefix copied from another slot's KV cells
    completion_tokens: int = 0
    queued_s: float = 0.0  # waiting for a free slot
    first_token_s: float | None = None  # from the start of this generation (excludes queueing)
    total_s: float = 0.0
    finish: str = ""  # "stop" | "length" | "cancelled" | "error" | "choice" (see ``choice_at``)
    batch_peak: int = 0  # most sequences decoded in one step alongside this one (itself included)
    yielded_s: float = 0.0  # while urgent, paused for other engines' urgent work

    @property
    def tokens_per_s(self) -> float:
        decode = self.total_s - (self.first_token_s or 0.0)
        return (self.completion_tokens - 1) / decode if self.completion_tokens > 1 and decode > 0 else 0.0


_END = object()


@dataclass
class _Slot:
    """One sequence of the shared KV cache and the tokens evaluated into it."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    owner: str | None = None  # the conversation (cache_key) whose prefix it holds
    job: _Job | None = None
    last_used: float = 0.0
    # Its conversation ended: keep only this many tokens (the scheduler thread trims between steps).
    trim_to: int | None = None


@dataclass(eq=False)  # identity hashing: jobs live in sets
class _Job:
    """One generation: what the event-loop side and the scheduler thread share."""

    loop: asyncio.AbstractEventLoop
    prompt: list[int]
    max_tokens: int
    temperature: float
    grammar: Any  # LlamaGrammar or None
    stop_strings: list[str]
    cache_key: str | None
    background: bool
    banned_first: npt.NDArray[np.intc] | None = None  # tokens the first one generated may not be
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # retired: no more work for it
    stop: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    stats: GenerationStats = field(default_factory=GenerationStats)
    sent: int = 0  # pieces posted (scheduler thread writes)
    taken: int = 0  # pieces consumed (event-loop thread writes)
    # Scheduler-thread state.
    slot: _Slot | None = None
    started: float = 0.0
    pending: list[int] = field(default_factory=list)  # tokens to evaluate next
    sampler: _GrammarFirstSampler | None = None
    last_step: float = 0.0
    text: _TextOut | None = None
    # ``choice_at``: the prompt token whose logits must choose, greedily under ``check_grammar``,
    # a text starting with ``check_expected`` before the rest of the prompt counts.
    check_index: int = -1
    check_grammar: Any = None
    check_expected: str = ""

    @property
    def urgent(self) -> bool:
        return not self.background and self.stats.completion_tokens < URGENT_TOKENS

    @functools.cached_property
    def prompt_ids(self) -> npt.NDArray[np.intc]:
        return np.asarray(self.prompt, dtype=np.intc)

    @property
    def cacheable(self) -> int:
        """How much of the prompt may come from cells already evaluated: all but the last token (it
        is evaluated again for its logits) and, while a choice is pending, not the choosing one."""
        limit = len(self.prompt) - 1
        return min(limit, self.check_index) if self.check_index >= 0 else limit

    @property
    def reading(self) -> bool:
        """Still reading its prompt, with more than the last token (which gives its logits) left."""
        return len(self.pending) > 1 and self.stats.completion_tokens == 0

    def post(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.stop.set()

    def retired(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.finished.set)
        except RuntimeError:
            pass


class _TextOut:
    """Token bytes to text pieces: whole UTF-8 characters only, and text that may be the start of a
    stop string held back until it is known not to be."""

    def __init__(self, stop_strings: Sequence[str]):
        # Invalid bytes are dropped rather than spoken as "\ufffd"; an incomplete character at the
        # end (output cut by a stop or the length limit) is dropped too.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._stops = [s for s in stop_strings if s]
        self._held = ""

    def feed(self, data: bytes) -> tuple[str, bool]:
        """The text that can go out now, and whether a stop string ended the output."""
        text = self._held + self._decoder.decode(data)
        if not self._stops:
            self._held = ""
            return text, False
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self._decoder.reset()
            return text[:cut], True
        keep = 0  # the longest end of ``text`` that begins some stop string
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return text


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
    supports_choice = True  # ``stream(choice_at=...)``
    supports_avoid_opening = True  # ``stream(avoid_opening=...)``
    schedules_background = True  # ``stream(background=True)`` yields to urgent generations

    def __init__(
        self,
        model_id: str,
        model_path: Path,
        *,
        context_size: int,
        threads: int,
        batch_threads: int | None = None,
        shared_threads: int = 0,
        gpu_layers: int = 0,
        slots: int = 4,
    ):
        self.model_id = model_id
        self.model_path = Path(model_path)
        self.last_stats = GenerationStats()
        check_gguf(self.model_path, model_id)
        self.threads = threads
        self.batch_threads = batch_threads or threads
        # Threads for steps taken while other engines work beside this one (0: always ``threads``):
        # llama.cpp's threads spin at a barrier after every operation, so on a box with few cores
        # a step with a thread too many waits for a descheduled one (``engines.priority``).
        self.shared_threads = shared_threads
        self._reduced = False  # the context is set to ``shared_threads`` now
        self.shared_steps = 0  # decodes run with ``shared_threads``
        self.grammar_first = True  # False: mask the whole vocabulary at every step (for comparison)
        try:
            # Vocabulary, chat template and metadata, and the weights the batched context uses; its
            # own context is a token's worth.
            self._llama = llama_cpp.Llama(
                model_path=str(self.model_path), n_ctx=16, n_batch=16, n_ubatch=16, n_threads=1,
                n_gpu_layers=gpu_layers, verbose=False,
            )  # fmt: skip
        except ValueError as exc:  # llama-cpp-python reports any load failure as ValueError
            raise ModelCorrupt(f"{self.model_path}: llama.cpp could not load it ({exc})") from exc
        model = self._llama._model
        self.context_size = min(context_size, int(model.n_ctx_train()) or context_size)
        self._vocab = model.vocab
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._add_bos = bool(model.add_bos_token())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.context_size * max(1, slots)
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = max(1, slots)
        params.kv_unified = True  # one pool of cells: shared prefixes are shared cells
        params.n_threads, params.n_threads_batch = threads, self.batch_threads
        try:
            from llama_cpp import _internals

            self._ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        except ValueError as exc:
            self._llama.close()
            raise ModelCorrupt(f"{self.model_path}: llama.cpp could not create a context ({exc})") from exc
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        # llama.cpp asks between graph nodes whether to abort a decode. The question goes to libc's
        # ``strlen`` on a flag byte: a C function, since a Python callback would take the GIL at
        # every node (+45% a step beside another busy Python thread).
        self._abort_flag = ctypes.create_string_buffer(2)
        self._abort_check = _abort_check()
        if self._abort_check is not None:
            flag = ctypes.cast(self._abort_flag, ctypes.c_void_p)
            llama_cpp.llama_set_abort_callback(self._ctx.ctx, self._abort_check, flag)
        self._abortable_step = False  # the step under way may be abandoned
        self._step_jobs: list[_Job] = []  # the generations in the step under way
        self._wasted_step = False  # the step under way was stopped because nobody wants its work
        self._abort_lock = threading.Lock()  # the flag is only ever set during a step
        self._aborted_last = False
        self.abandoned = 0  # background prompt steps abandoned for urgent work, and read again later
        self.wasted_steps = 0  # steps stopped because nobody wanted their work (``_abort_background``)
        self._batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._slots = [_Slot(seq_id=i) for i in range(max(1, slots))]
        self._pieces: dict[int, bytes] = {}
        # Per conversation, the length of its first prompt: what another conversation of the same
        # agent may share (system prompt, welcome). Guarded by ``_wake``; bounded by ``_BASES``.
        self._bases: dict[str, int] = {}
        self._grammars: dict[str, Any] = {}
        self._grammar_lock = threading.Lock()
        self._template = self._compile_template()
        # Scheduler state, guarded by ``_wake``.
        self._wake = threading.Condition()
        self._waiting: list[_Job] = []
        self._jobs: set[_Job] = set()
        self._running = 0
        # Generations someone waits for, submitted / seen by the scheduler before its last ``_admit``.
        self._replies_submitted = 0
        self._replies_seen = 0
        self._closed = False
        self.preempted = 0  # background generations stopped to free a slot for an urgent one
        self._warm_up()
        self._thread = threading.Thread(target=self._run, name=f"llm-{model_id}", daemon=True)
        self._thread.start()
        CPU.on_urgent(self._abort_background)

    def _warm_up(self) -> None:
        """The first decode allocates compute buffers and pages the weights in."""
        tokens = self._tokenize("Hello")
        self._fill([(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
        llama_cpp.llama_decode(self._ctx.ctx, self._batch)
        llama_cpp.llama_memory_seq_rm(self._memory, 0, 0, -1)

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

    def _opening_tokens(self, text: str) -> npt.NDArray[np.intc]:
        """The tokens a text starting with ``text``'s first word could start with: each of that
        word's prefixes that is a token of its own, with or without a leading space ("C", "Card",
        " Card", ...). Banning only the one the model chose would let it spell the word another way."""
        words = text.split()
        word = words[0] if words else ""
        found: set[int] = set()
        for end in range(1, len(word) + 1):
            for piece in (word[:end], " " + word[:end]):
                ids = self._llama.tokenize(piece.encode("utf-8"), add_bos=False, special=False)
                if len(ids) == 1:
                    found.add(ids[0])
        return np.array(sorted(found), dtype=np.intc)

    def count_tokens(self, text: str) -> int:
        # Tokenising reads only the vocabulary, never the context, so it is safe beside a generation.
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:  # longer than the buffer: -n is the length needed
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = buf.raw[: max(0, n)]
            self._pieces[token] = piece
        return piece

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
                # llama-cpp-python only stores the text: parse it now, so a bad grammar fails its
                # caller here and never reaches the scheduler thread.
                _GrammarFirstSampler(self._vocab, self._n_vocab, grammar)
                if len(self._grammars) >= 256:  # schemas come from agent configs: few, but bound it
                    self._grammars.pop(next(iter(self._grammars)))
                self._grammars[key] = grammar
            return grammar

    # -- generation: the event-loop side -------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Generations submitted and not finished (running ones included)."""
        return len(self._jobs)

    @property
    def busy(self) -> bool:
        """True while any generation holds a slot."""
        return self._running > 0

    @property
    def slots(self) -> int:
        return len(self._slots)

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
        background: bool = False,
        choice_at: tuple[int, str, str] | None = None,
        avoid_opening: str | None = None,
    ) -> AsyncGenerator[str, None]:
        """See ``LlmEngine.stream``. ``grammar``: raw GBNF instead of ``json_schema``.
        ``cache_key`` names the conversation, which then keeps returning to the same slot.
        ``background``: nobody is waiting for this (a prewarm); it yields to urgent generations.
        ``choice_at=(offset, gbnf, expected)``: the prompt goes on past ``prompt[:offset]`` on an
        assumption about what the model would write there (``{"say": "`` after ``{"``); the
        greedy choice under ``gbnf`` at that point is checked in the same decode, and if it does
        not start with ``expected`` the stream raises ``ChoiceDiffers`` before any text. One
        decode instead of two generations. ``avoid_opening``: the first token generated may not
        begin the first word of this text (see ``_opening_tokens``)."""
        if json_schema is not None and grammar is not None:
            raise ValueError("give json_schema or grammar, not both")
        if self._closed:
            raise RuntimeError(f"LLM {self.model_id} is closed")
        compiled = (
            self._grammar(json_schema, grammar) if json_schema is not None or grammar is not None else None
        )
        tokens = self._tokenize(prompt)
        if not tokens or len(tokens) + 1 >= self.context_size:
            raise PromptTooLong(
                f"prompt of {len(tokens)} tokens does not fit {self.model_id}'s context of "
                f"{self.context_size}"
            )
        job = _Job(
            asyncio.get_running_loop(), tokens, max_tokens, temperature, compiled, list(stop),
            cache_key, background,
        )  # fmt: skip
        job.stats.prompt_tokens = len(tokens)
        if avoid_opening:
            job.banned_first = self._opening_tokens(avoid_opening)
        if choice_at is not None:
            offset, check_gbnf, expected = choice_at
            head = self._tokenize(prompt[:offset])
            if not head or tokens[: len(head)] != head:
                raise ValueError("choice_at must fall on a token boundary of the prompt")
            job.check_index, job.check_expected = len(head) - 1, expected
            job.check_grammar = self._grammar(None, check_gbnf)
        with self._wake:
            self._jobs.add(job)
            self._waiting.append(job)
            if not background:
                self._replies_submitted += 1
            self._wake.notify()
        if not background:
            self._abort_background(cache_key)
            CPU.nudge()  # the scheduler may be yielding to other engines: a caller waits for this
        try:
            while True:
                item = await job.queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                job.taken += 1
                if job.sent - job.taken == QUEUE_SIZE - 1:
                    with self._wake:  # there is room again: the scheduler may be waiting for it
                        self._wake.notify()
                yield str(item)
        finally:
            job.stop.set()
            # A step whose generations are all stopped now is stopped too. One that others are in
            # goes on, even if this consumer then waits for the rest of it (rare): redoing a
            # background chunk would cost more.
            self._abort_background(None, someone_waits=False)
            with self._wake:
                if job in self._waiting:  # never started: nothing to stop
                    self._waiting.remove(job)
                    self._jobs.discard(job)
                    job.finished.set()
                self._wake.notify()
            # The scheduler retires a stopped job at the end of its current step, so this waits
            # for one step at most and no tokens are computed for it once we return.
            await job.finished.wait()

    def _abort_background(self, arriving: str | None = None, *, someone_waits: bool = True) -> None:
        """Abandon the background prompt step under way, if one is, for someone who waits now (any
        thread). Also stop any step whose work nobody wants any more: each of its generations
        stopped (a reply cut off, a read-ahead withdrawn) or about to give its slot to the reply of
        its own conversation that is ``arriving``. Those are stopped even right after an abandoned
        step, and even when urgent: the waiting reply would otherwise sit out 0.3-0.5 s of reading.
        ``someone_waits=False``: only the latter (a consumer letting go abandons nobody's work)."""
        with self._abort_lock:
            # Unwanted first: a background step that is also unwanted is not redone, so it is not
            # counted as abandoned and does not withhold the next abandon.
            if self._step_jobs and all(
                j.stop.is_set() or (j.background and arriving is not None and j.cache_key == arriving)
                for j in self._step_jobs
            ):
                self._abort_flag[0] = b"\x01"
                self._wasted_step = True
            elif someone_waits and self._abortable_step:
                self._abort_flag[0] = b"\x01"

    def release(self, cache_key: str) -> None:
        """The conversation ``cache_key`` is over: its slot is the first to go to a new conversation,
        before the slot of one that is still going on and only quiet for now, and keeps only the
        cells of the conversation's first prompt (another conversation of the same agent may copy
        that prefix). Its history goes: llama.cpp walks every cell in use for every sequence's step,
        so a long call's history left behind slows every later step of every call (3,000 cells in
        each of three idle slots: a one-token step 37 ms instead of 32 ms, a 16-token prompt chunk
        250 ms instead of 206 ms, on the 2-core VM)."""
        with self._wake:
            base = self._bases.pop(cache_key, 0)
            for slot in self._slots:
                if slot.owner == cache_key:
                    slot.owner = None
                    slot.trim_to = base
            self._wake.notify()

    def close(self) -> None:
        if self._closed:
            return
        with self._wake:
            self._closed = True
            for job in self._jobs:
                job.stop.set()
            self._wake.notify()
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()
        self._llama.close()

    # -- generation: the scheduler thread ------------------------------------------------------
    def _run(self) -> None:
        try:
            self._schedule()
        except BaseException:
            log.exception("llm %s: scheduler stopped", self.model_id)
            raise
        finally:
            CPU.mark_foreground(self, False)
            # Whatever happened, nobody may wait forever for a generation that will not run.
            with self._wake:
                self._closed = True
                for slot in self._slots:
                    if slot.job is not None:
                        self._finish(slot.job, "error", RuntimeError(f"LLM {self.model_id} stopped"))
                self._retire_stopped()

    def _schedule(self) -> None:
        while True:
            with self._wake:
                self._retire_stopped()
                self._trim_released()
                self._replies_seen = self._replies_submitted
                self._admit()
                running = [s.job for s in self._slots if s.job is not None]
                ready = [j for j in running if j.pending and j.sent - j.taken < QUEUE_SIZE]
                if not ready:
                    CPU.mark_foreground(self, False)
                    if self._closed and not running and not self._waiting:
                        return
                    self._wake.wait(timeout=0.5)
                    continue
            self._step(ready)

    def _retire_stopped(self) -> None:
        for slot in self._slots:
            job = slot.job
            if job is not None and (job.stop.is_set() or self._closed):
                self._finish(job, "cancelled")
        if self._closed:
            for job in self._waiting:
                job.post(RuntimeError(f"LLM {self.model_id} is closed"))
                self._jobs.discard(job)
                job.retired()
            self._waiting.clear()

    def _trim_released(self) -> None:
        """Drop the history of ended conversations from their slots (see ``release``); on this
        thread, between steps, since no other may touch the KV cache during a decode."""
        for slot in self._slots:
            keep = slot.trim_to
            if keep is None or slot.job is not None:
                continue  # a generation still holds it: trimmed once that one is retired
            slot.trim_to = None
            if len(slot.tokens) > keep:
                llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
                del slot.tokens[keep:]

    def _admit(self) -> None:
        """Give waiting generations a slot each. Someone waits for those that are not background, so
        they go first (oldest first), and one takes a prewarm's slot rather than wait: its own
        conversation's prewarm (whose cells are its own prefix), else the prewarm with the most left
        to read. A prewarm only saves a later turn some prompt reading, and what it has read stays in
        its slot for that turn to keep or copy."""
        while self._waiting:
            job = next((j for j in self._waiting if not j.background), self._waiting[0])
            slot = None if job.background else self._prewarm_slot(job)
            slot = slot or self._free_slot(job)
            if slot is None and not job.background:
                slot = self._prewarm_slot(job, any_conversation=True)
            if slot is None:
                return
            self._waiting.remove(job)
            try:
                self._start(job, slot)
            except Exception as exc:  # this generation fails, not the engine
                log.exception("llm %s: could not start a generation", self.model_id)
                self._finish(job, "error", exc)

    def _prewarm_slot(self, job: _Job, *, any_conversation: bool = False) -> _Slot | None:
        """Stop a running background generation and return its slot: the one of ``job``'s own
        conversation, or with ``any_conversation`` the one with the most prompt left to read."""
        prewarms = [
            s for s in self._slots
            if s.job is not None and s.job.background
            and (any_conversation or (job.cache_key is not None and s.owner == job.cache_key))
        ]  # fmt: skip
        if not prewarms:
            return None
        slot = max(prewarms, key=lambda s: len(s.job.pending) if s.job is not None else 0)
        assert slot.job is not None
        self._finish(slot.job, "cancelled")
        self.preempted += 1
        return slot

    def _free_slot(self, job: _Job) -> _Slot | None:
        free = [s for s in self._slots if s.job is None]
        if not free:
            return None
        if job.cache_key is not None:
            for slot in free:
                if slot.owner == job.cache_key:
                    return slot
        # An empty slot, else one no conversation holds any more, else the least recently used;
        # ``_start`` copies any shared prefix over.
        return max(free, key=lambda s: (not s.tokens, s.owner is None, -s.last_used))

    def _start(self, job: _Job, slot: _Slot) -> None:
        now = time.monotonic()
        job.started = job.last_step = now
        job.stats.queued_s = now - job.submitted
        job.slot, slot.job, slot.owner = slot, job, job.cache_key
        slot.trim_to = None
        if job.cache_key is not None and job.cache_key not in self._bases:
            if len(self._bases) >= _BASES:  # conversations that never said they ended
                self._bases.pop(next(iter(self._bases)))
            self._bases[job.cache_key] = len(job.prompt)
        self._running += 1
        own = _common_prefix(np.asarray(slot.tokens, dtype=np.intc), job.prompt_ids)
        donor, shared = self._longest_prefix_elsewhere(slot, job.prompt_ids)
        if donor is not None and shared - own >= MIN_SHARED_PREFIX:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, 0, -1)
            llama_cpp.llama_memory_seq_cp(self._memory, donor.seq_id, slot.seq_id, 0, shared)
            slot.tokens = job.prompt[:shared]
            job.stats.restored_tokens = shared
            own = shared
        keep = min(own, job.cacheable)
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
        del slot.tokens[keep:]
        job.stats.cached_tokens = keep
        job.pending = job.prompt[keep:]
        job.text = _TextOut(job.stop_strings)
        if job.max_tokens > 0:
            job.sampler = _GrammarFirstSampler(
                self._vocab,
                self._n_vocab,
                job.grammar,
                temp=job.temperature,
                full_mask=not self.grammar_first,
                banned_first=job.banned_first,
            )

    def _match_threads(self) -> None:
        """Step with ``shared_threads`` while a transcription, synthesis or embedding runs."""
        reduce = 0 < self.shared_threads < max(self.threads, self.batch_threads) and CPU.working_now > 0
        if reduce != self._reduced:
            if reduce:
                llama_cpp.llama_set_n_threads(self._ctx.ctx, self.shared_threads, self.shared_threads)
            else:
                llama_cpp.llama_set_n_threads(self._ctx.ctx, self.threads, self.batch_threads)
            self._reduced = reduce
        if reduce:
            self.shared_steps += 1

    def _step(self, ready: list[_Job]) -> None:
        """One ``llama_decode`` over the chosen sequences, then a token sampled for each that has
        read all its input."""
        for job in ready:
            if job.reading:
                self._catch_up(job)
        ready = self._without_followers(ready)
        urgent = [j for j in ready if j.urgent]
        CPU.mark_foreground(self, bool(urgent))
        if not urgent or (CPU.urgent_now and all(j.sent for j in urgent)):
            # Urgent work elsewhere (a transcription, a first clause's synthesis) is shorter than
            # what is left of a first clause already under way: let it have the cores first. Not
            # before a new reply, though: its caller waits in silence too, and it is only admitted
            # between steps.
            paused = time.monotonic()
            CPU.yield_to_urgent(URGENT_MAX_WAIT_S, until=self._new_reply)
            paused = time.monotonic() - paused
            for job in urgent:
                job.stats.yielded_s += paused
            if self._new_reply():
                return
        now = time.monotonic()
        if urgent:
            # A prompt chunk makes the step long and a few more rows cost little beside it: every
            # reply being spoken then gets its next token; otherwise only ones kept waiting long.
            reading = any(len(j.pending) > 1 for j in urgent)
            waited = [
                j for j in ready
                if not j.urgent
                and (now - j.last_step >= BACKGROUND_MAX_WAIT_S or (reading and len(j.pending) == 1))
            ]  # fmt: skip
            chosen = urgent + waited
        else:
            chosen = ready
        entries: list[tuple[int, int, int, bool]] = []
        plan: list[tuple[_Job, int, int | None]] = []  # job, tokens taken, its logits row
        checks: list[tuple[_Job, int]] = []  # job, the logits row of its ``choice_at`` token
        budget = BATCH_TOKENS
        writing = any(j.urgent and not j.reading and j.stats.completion_tokens for j in chosen)
        urgent_chunk = URGENT_PROMPT_CHUNK if writing else BATCH_TOKENS
        # Background prompt in a step nobody can stop is kept short: an urgent reply may arrive.
        safe = self._aborted_last or bool(urgent)
        background_left = BACKGROUND_SAFE_CHUNK if safe else BATCH_TOKENS
        for job in sorted(chosen, key=lambda j: len(j.pending)):  # decoders first, then prompts
            assert job.slot is not None
            if job.urgent:
                chunk = (
                    len(job.pending)
                    if len(job.pending) < urgent_chunk + URGENT_PROMPT_SLACK
                    else urgent_chunk
                )
                take = min(len(job.pending), budget, chunk)
            elif job.reading:  # background: a prewarm, words read ahead
                take = min(len(job.pending), budget, BACKGROUND_PROMPT_CHUNK, background_left)
                background_left -= take
            else:
                take = min(len(job.pending), budget)
            if take <= 0:
                continue
            budget -= take
            base, seq = len(job.slot.tokens), job.slot.seq_id
            complete = take == len(job.pending)
            for i, token in enumerate(job.pending[:take]):
                check = base + i == job.check_index
                if check:
                    checks.append((job, len(entries)))
                entries.append((token, base + i, seq, check or (complete and i == take - 1)))
            plan.append((job, take, len(entries) - 1 if complete else None))
        if not entries:
            return
        self._fill(entries)
        self._match_threads()
        abortable = (
            self._abort_check is not None
            and not self._aborted_last
            and not any(j.urgent for j, _, _ in plan)
            and any(take > 1 for _, take, _ in plan)
        )
        with self._abort_lock:
            self._abort_flag[0] = b"\x00"
            self._abortable_step = abortable
            self._step_jobs = [job for job, _, _ in plan] if self._abort_check is not None else []
            self._wasted_step = False
        # A reply submitted from here on raises the flag; one submitted before is seen here.
        if abortable and self._new_reply():
            with self._abort_lock:
                self._abortable_step = False
                self._step_jobs = []
            return  # admit it first
        code = llama_cpp.llama_decode(self._ctx.ctx, self._batch)
        with self._abort_lock:
            self._abortable_step = False
            self._step_jobs = []
            wasted = self._wasted_step
        if code == 2 and wasted:  # nobody wanted it: its generations are retired next, not redone
            self.wasted_steps += 1
            return
        self._aborted_last = code == 2
        if self._aborted_last:  # abandoned: llama.cpp removed its cells, every job keeps its tokens
            self.abandoned += 1
            return
        if code != 0:
            log.error("llm %s: llama_decode returned %d (%d tokens, %d sequences)", self.model_id, code,
                      len(entries), len(plan))  # fmt: skip
            for job, _, _ in plan:  # these sequences' cells may be half-written; the others are intact
                self._finish(job, "error", RuntimeError(f"llama_decode returned {code}"))
            return
        done_at = time.monotonic()
        for job, take, _ in plan:
            assert job.slot is not None
            job.slot.tokens.extend(job.pending[:take])
            del job.pending[:take]
            job.last_step = done_at
            job.stats.batch_peak = max(job.stats.batch_peak, len(plan))
        for job, check_row in checks:
            self._guarded(job, self._check_choice, check_row)
        for job, _, row in plan:
            if row is not None and job.slot is not None and job.slot.job is job:  # unless a check retired it
                self._guarded(job, self._sample, row)

    def _new_reply(self) -> bool:
        """A generation someone waits for arrived since the scheduler last admitted waiting ones."""
        return self._replies_submitted != self._replies_seen

    def _catch_up(self, job: _Job) -> None:
        """Copy into a generation still reading its prompt the cells another slot has evaluated of
        it since it started (another call of the same agent, reading the same system prompt)."""
        slot = job.slot
        assert slot is not None
        own = len(slot.tokens)
        limit = job.cacheable
        if limit - own < MIN_SHARED_PREFIX:
            return
        donor, shared = self._longest_prefix_elsewhere(slot, job.prompt_ids[:limit])
        if donor is None or shared - own < MIN_SHARED_PREFIX:
            return
        llama_cpp.llama_memory_seq_cp(self._memory, donor.seq_id, slot.seq_id, own, shared)
        slot.tokens.extend(job.prompt[own:shared])
        del job.pending[: shared - own]
        job.stats.restored_tokens += shared - own
        job.stats.cached_tokens += shared - own

    def _longest_prefix_elsewhere(
        self, slot: _Slot, prompt: npt.NDArray[np.intc]
    ) -> tuple[_Slot | None, int]:
        """The other slot whose evaluated tokens share the longest prefix with ``prompt``, and its
        length (None, 0 when no other slot shares any)."""
        donor, shared = None, 0
        for other in self._slots:
            if other is not slot:
                n = _common_prefix(np.asarray(other.tokens, dtype=np.intc), prompt)
                if n > shared:
                    donor, shared = other, n
        return donor, shared

    def _without_followers(self, ready: list[_Job]) -> list[_Job]:
        """Background generations reading a prompt that another one ahead of them is reading too
        (prewarms of calls to the same agent) wait and copy its cells, instead of computing the same
        ones side by side."""
        readers = sorted(
            (j for j in ready if j.reading), key=lambda j: (-len(j.prompt) + len(j.pending), j.submitted)
        )
        followers = set()
        for index, job in enumerate(readers):
            if not job.background:
                continue
            assert job.slot is not None
            own = len(job.slot.tokens)
            for leader in readers[:index]:
                if (
                    leader not in followers
                    and _common_prefix(leader.prompt_ids, job.prompt_ids) - own >= MIN_SHARED_PREFIX
                ):
                    followers.add(job)
                    break
        return [j for j in ready if j not in followers]

    def _guarded(self, job: _Job, action: Any, row: int) -> None:
        """Run one job's sampling step; a failure ends that generation, not the others."""
        try:
            action(job, row)
        except Exception as exc:
            log.exception("llm %s: sampling failed", self.model_id)
            self._finish(job, "error", RuntimeError(f"sampling failed: {exc}"))

    def _check_choice(self, job: _Job, row: int) -> None:
        """The greedy choice at the ``choice_at`` token: if it is not what the rest of the prompt
        assumes, the generation ends with ``ChoiceDiffers`` before any text."""
        sampler = _GrammarFirstSampler(self._vocab, self._n_vocab, job.check_grammar)
        chosen = self._piece(sampler.sample(self._logits(row))).decode("utf-8", errors="replace")
        job.check_index = -1
        if not chosen.strip().startswith(job.check_expected):
            self._finish(job, "choice", ChoiceDiffers(chosen))

    def _logits(self, row: int) -> np.ndarray:
        """The last decode's logits for batch row ``row`` (a view into llama.cpp's buffer, valid
        until the next decode)."""
        row_logits = llama_cpp.llama_get_logits_ith(self._ctx.ctx, row)
        return np.ctypeslib.as_array(row_logits, shape=(self._n_vocab,))

    def _fill(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits

    def _sample(self, job: _Job, index: int) -> None:
        stats = job.stats
        if job.max_tokens <= 0 or job.sampler is None:
            self._finish(job, "length")
            return
        token = job.sampler.sample(self._logits(index))
        stats.completion_tokens += 1
        if stats.first_token_s is None:
            stats.first_token_s = time.monotonic() - job.started
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(job, "stop")
            return
        assert job.text is not None and job.slot is not None
        text, stopped = job.text.feed(self._piece(token))
        if text:
            job.sent += 1
            job.post(text)
        if stopped:
            self._finish(job, "stop")
        elif stats.completion_tokens >= job.max_tokens or len(job.slot.tokens) + 1 >= self.context_size:
            self._finish(job, "length")
        else:
            job.pending = [token]

    def _finish(self, job: _Job, finish: str, error: BaseException | None = None) -> None:
        """Retire a running job: free its slot, report, wake its consumer."""
        slot = job.slot
        if slot is None or slot.job is not job:
            return
        stats = job.stats
        stats.finish = finish
        stats.total_s = time.monotonic() - job.started
        if finish in ("stop", "length") and job.text is not None:
            rest = job.text.flush()
            if rest:
                job.post(rest)
        if isinstance(error, ChoiceDiffers):
            job.post(error)
        elif error is not None:
            # The slot's cells may be half-written: forget them.
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, 0, -1)
            slot.tokens.clear()
            job.post(error)
        job.pending = []
        slot.job, slot.last_used = None, time.monotonic()
        self._running -= 1
        self.last_stats = stats
        log.info(
            "llm %s: prompt %d tokens (%d cached, %d copied), %d generated, queued %.0f ms, "
            "first token %.0f ms, %.1f tokens/s, batch up to %d, paused %.0f ms, %s",
            self.model_id, stats.prompt_tokens, stats.cached_tokens, stats.restored_tokens,
            stats.completion_tokens, stats.queued_s * 1000, (stats.first_token_s or 0) * 1000,
            stats.tokens_per_s, stats.batch_peak, stats.yielded_s * 1000, stats.finish,
        )  # fmt: skip
        job.post(_END)
        with self._wake:
            self._jobs.discard(job)
        job.retired()


def _abort_check() -> Any:
    """libc's ``strlen`` as llama.cpp's abort callback (true once the flag byte is set), or None
    where there is no C library to take it from."""
    try:
        return ctypes.cast(ctypes.CDLL(None).strlen, llama_cpp.ggml_abort_callback)
    except (OSError, AttributeError, TypeError):
        return None


def _common_prefix(a: npt.NDArray[np.intc], b: npt.NDArray[np.intc]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class _GrammarFirstSampler:
    """Sampling from one row of logits, optionally grammar-constrained, asking the grammar about a
    few tokens rather than the whole vocabulary.

    llama.cpp's grammar sampler tests every vocabulary entry against the grammar at every step; with
    Qwen's 152k-token vocabulary that single-threaded work costs more than the forward pass itself
    (measured: a call's reply at 11 tokens/s instead of 22). Greedy (``temp == 0``): take the
    argmax and ask the grammar about that one token, then about the ``top_k`` best. Sampled: ask it
    about the ``top_k`` best tokens only, then apply top-p, min-p and the temperature among those
    it allows, as llama.cpp's chain does. Only when none of them is allowed is the whole vocabulary
    masked (``full_mask``: always, for comparison). Greedy results are exact; sampled ones differ
    from llama.cpp's order (grammar first, then top-k) only when fewer than ``top_k`` of the best
    tokens are allowed, in the tail that top-p and min-p cut anyway.
    """

    def __init__(
        self,
        vocab: Any,
        n_vocab: int,
        grammar: llama_cpp.LlamaGrammar | None,
        *,
        temp: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        seed: int | None = None,
        full_mask: bool = False,
        banned_first: npt.NDArray[np.intc] | None = None,
    ):
        self._vocab = vocab
        self._banned_first = banned_first if banned_first is not None and banned_first.size else None
        self._n_vocab = n_vocab
        self._grammar: Any = None
        if grammar is not None:
            ptr = llama_cpp.llama_sampler_init_grammar(
                vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
            )
            if not ptr:
                raise ValueError("llama.cpp could not parse the grammar")
            self._grammar = ptr
            weakref.finalize(self, llama_cpp.llama_sampler_free, ptr)
        self.full_mask = full_mask
        self.temp = temp
        self.top_k = max(1, min(top_k if top_k > 0 else 40, n_vocab))
        self.top_p = top_p
        self.min_p = min_p
        self._rng = np.random.default_rng(seed)
        self._some = np.zeros(self.top_k, dtype=_TOKEN_DATA)
        self._some_p = llama_cpp.llama_token_data_array(
            data=self._some.ctypes.data_as(llama_cpp.llama_token_data_p), size=1, selected=-1, sorted=False
        )

    def _allowed(self, ids: npt.NDArray[np.int32], logits: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
        """Which of ``ids`` (at most ``top_k``) the grammar allows next."""
        if self._grammar is None:
            return np.ones(len(ids), dtype=bool)
        n = len(ids)
        self._some["id"][:n] = ids
        self._some["logit"][:n] = logits
        self._some_p.size, self._some_p.selected = n, -1
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._some_p))
        return np.isfinite(self._some["logit"][:n])

    def _mask_all(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        every = np.zeros(self._n_vocab, dtype=_TOKEN_DATA)
        every["id"] = np.arange(self._n_vocab, dtype=np.int32)
        every["logit"] = logits
        array = llama_cpp.llama_token_data_array(
            data=every.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=self._n_vocab,
            selected=-1,
            sorted=False,
        )
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        masked: npt.NDArray[np.float32] = every["logit"].copy()
        return masked

    def _top(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.int32]:
        top = np.argpartition(logits, -self.top_k)[-self.top_k :].astype(np.int32)
        ordered: npt.NDArray[np.int32] = top[np.argsort(-logits[top], kind="stable")]
        return ordered

    def sample(self, logits: npt.NDArray[np.float32]) -> int:
        """The next token from one row of logits (``n_vocab`` floats); the grammar accepts it."""
        if self._banned_first is not None:
            logits = logits.copy()  # a view into llama.cpp's buffer
            logits[self._banned_first] = -np.inf
            self._banned_first = None
        if self._grammar is not None and self.full_mask:
            logits = self._mask_all(logits)
            if not np.isfinite(logits).any():
                return self._nothing_allowed()
        if self.temp <= 0.0:
            token = int(np.argmax(logits))
            if not self._allowed(np.array([token], dtype=np.int32), logits[[token]])[0]:
                # Rejected: the best allowed token is usually among the next best few.
                top = self._top(logits)
                allowed = np.flatnonzero(self._allowed(top, logits[top]))
                if allowed.size:
                    token = int(top[allowed[0]])
                else:
                    masked = self._mask_all(logits)
                    token = int(np.argmax(masked))
                    if not np.isfinite(masked[token]):
                        return self._nothing_allowed()
        else:
            top = self._top(logits)
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
        if self._grammar is not None:
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
