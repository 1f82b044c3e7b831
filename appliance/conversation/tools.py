"""What the model may answer, as a JSON schema, and how its answer is read.

Each generation is one JSON object: ``{"say": "..."}`` or ``{"name": function, "arguments": {...}}``.
The LLM engine compiles the schema into a llama.cpp grammar, so every output parses; the checks
here are the second line (a truncated generation, a hand-written fake) and the grounding rule that
stops the model from dispatching details the caller never gave.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .types import FunctionSpec, Parameter

# Bounds on what the model can emit; the grammar enforces them character by character.
ARGUMENT_MAX_CHARS = 120
SAY_MIN_CHARS = 80
SAY_MAX_CHARS = 600

END_CALL = FunctionSpec(
    name="end_call",
    description="Hang up the phone call. Use only after the caller says goodbye or asks to end the call.",
    builtin=True,
)
TRANSFER_CALL = FunctionSpec(
    name="transfer_call",
    description="Transfer the caller to another phone number, when the caller asks for a person or "
    "the instructions say to transfer.",
    user_parameters=(Parameter("number", "string", "The phone number to transfer to", True),),
    builtin=True,
)
BUILTINS = (END_CALL, TRANSFER_CALL)


def say_max_chars(max_tokens: int) -> int:
    # About 3 characters per token of English prose; a spoken reply should stay short anyway.
    return max(SAY_MIN_CHARS, min(SAY_MAX_CHARS, 3 * max_tokens))


def _parameter_schema(param: Parameter) -> dict[str, Any]:
    if param.enum:
        return {"enum": list(param.enum)}
    if param.type == "string":
        return {"type": "string", "maxLength": ARGUMENT_MAX_CHARS}
    return {"type": param.type}


def arguments_schema(spec: FunctionSpec) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {p.name: _parameter_schema(p) for p in spec.user_parameters},
        "required": [p.name for p in spec.user_parameters if p.required],
        "additionalProperties": False,
    }


def say_schema(max_chars: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"say": {"type": "string", "maxLength": max_chars}},
        "required": ["say"],
        "additionalProperties": False,
    }


def function_schema(spec: FunctionSpec) -> dict[str, Any]:
    return {
        "type": "object",
        # "name" + "arguments" is the shape Qwen-style models were trained to emit for tool calls.
        "properties": {"name": {"const": spec.name}, "arguments": arguments_schema(spec)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def output_schema(functions: Sequence[FunctionSpec], say_chars: int) -> dict[str, Any]:
    """The whole answer: one of the functions, or speech. Speech alone when no function is allowed."""
    if not functions:
        return say_schema(say_chars)
    return {"oneOf": [function_schema(f) for f in functions] + [say_schema(say_chars)]}


# The fast path for engines that take raw grammars (see ``Conversation._generate``): the model's
# first key decides between speech and a call; speech then continues after this opening.
KEY_OPENING = '{"'  # what every answer object starts with, up to its first key
SAY_OPENING = KEY_OPENING + 'say": "'
FIRST_KEY_GRAMMAR = 'root ::= "say" | "name"'


def say_body_grammar(max_chars: int) -> str:
    """GBNF for what follows ``SAY_OPENING``: the rest of the JSON string, then ``"}``. String
    characters exclude control characters, as ``LlamaLlm`` does for schema grammars."""
    return (
        f'root ::= char{{0,{max_chars}}} "\\"}}"\n'
        r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})' + "\n"
    )


def function_choice_schema(functions: Sequence[FunctionSpec]) -> dict[str, Any]:
    """One of ``functions`` must be called (no speech)."""
    if len(functions) == 1:
        return function_schema(functions[0])
    return {"oneOf": [function_schema(f) for f in functions]}


def max_output_chars(schema: dict[str, Any]) -> int:
    """A generous upper bound on the characters the grammar can produce, for ``max_tokens``."""
    if "oneOf" in schema:
        return max(max_output_chars(s) for s in schema["oneOf"])
    total = 2
    for key, sub in schema.get("properties", {}).items():
        total += len(key) + 6
        if "properties" in sub:
            total += max_output_chars(sub)
        elif "maxLength" in sub:
            # Escapes (\uXXXX) can take six characters per character of text.
            total += 2 + sub["maxLength"] * 2
        elif "enum" in sub:
            total += max(len(json.dumps(v)) for v in sub["enum"])
        elif "const" in sub:
            total += len(json.dumps(sub["const"]))
        else:
            total += 24  # numbers and booleans
    return total


# -- reading the answer -------------------------------------------------------------------------

_SAY_OPENING = re.compile(r'\s*\{\s*"say"\s*:\s*"')
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class StreamingAnswer:
    """Incremental reader of one generation. ``feed`` returns the newly decoded characters of the
    ``say`` string as soon as they arrive, so speech can start before the JSON is complete."""

    def __init__(self) -> None:
        self.raw = ""
        self.mode: str = "undecided"  # undecided | say | say-closed | other
        self.said = ""
        self._pos = 0  # next undecoded index into ``raw`` while in the say string

    def feed(self, piece: str) -> str:
        self.raw += piece
        if self.mode == "undecided":
            match = _SAY_OPENING.match(self.raw)
            if match:
                self.mode = "say"
                self._pos = match.end()
            elif not _could_become_say(self.raw):
                self.mode = "other"
        if self.mode != "say":
            return ""
        return self._decode()

    def _decode(self) -> str:
        out: list[str] = []
        raw, i = self.raw, self._pos
        while i < len(raw):
            ch = raw[i]
            if ch == '"':
                self.mode = "say-closed"
                i += 1
                break
            if ch != "\\":
                out.append(ch)
                i += 1
                continue
            if i + 1 >= len(raw):
                break  # escape split across pieces: wait for the rest
            code = raw[i + 1]
            if code == "u":
                decoded, used = _decode_unicode_escape(raw, i)
                if used == 0:
                    break
                out.append(decoded)
                i += used
                continue
            out.append(_ESCAPES.get(code, code))
            i += 2
        self._pos = i
        text = "".join(out)
        self.said += text
        return text

    def result(self) -> Answer:
        """The complete answer. A generation cut off by ``max_tokens`` inside speech keeps what was
        said; anything else unreadable becomes an ``Answer`` with ``error`` set."""
        try:
            value = json.loads(self.raw)
        except json.JSONDecodeError as exc:
            if self.mode in ("say", "say-closed"):
                return Answer(say=self.said, truncated=True)
            return Answer(error=f"invalid JSON: {exc.msg}", raw=self.raw)
        return parse_answer(value, raw=self.raw)


def _could_become_say(raw: str) -> bool:
    """True while ``raw`` is still a prefix of some ``{"say": "`` opening."""
    compact = re.sub(r"\s+", "", raw)
    target = '{"say":"'
    return target.startswith(compact) or compact.startswith(target)


def _decode_unicode_escape(raw: str, i: int) -> tuple[str, int]:
    """Decode ``\\uXXXX`` (and a following low surrogate) at ``raw[i]``; (text, length) or ("", 0)
    when the escape is not complete yet."""
    hexdigits = raw[i + 2 : i + 6]
    if len(hexdigits) < 4:
        return "", 0
    try:
        code = int(hexdigits, 16)
    except ValueError:
        return "\ufffd", 6
    if 0xD800 <= code < 0xDC00:
        low = raw[i + 6 : i + 12]
        if len(low) < 6:
            # A lone high surrogate at the very end is completed by the next piece (or never).
            return "", 0
        if low.startswith("\\u"):
            try:
                low_code = int(low[2:], 16)
            except ValueError:
                return "\ufffd", 6
            if 0xDC00 <= low_code < 0xE000:
                return chr(0x10000 + ((code - 0xD800) << 10) + (low_code - 0xDC00)), 12
        return "\ufffd", 6
    return chr(code), 6


@dataclass(frozen=True)
class Answer:
    say: str | None = None
    function: str | None = None
    arguments: dict[str, Any] | None = None
    truncated: bool = False
    error: str | None = None
    raw: str = ""


def parse_answer(value: Any, *, raw: str = "") -> Answer:
    if not isinstance(value, dict):
        return Answer(error="answer is not an object", raw=raw)
    if "say" in value and isinstance(value["say"], str) and len(value) == 1:
        return Answer(say=value["say"], raw=raw)
    name, args = value.get("name"), value.get("arguments", {})
    if isinstance(name, str) and isinstance(args, dict) and set(value) <= {"name", "arguments"}:
        return Answer(function=name, arguments=args, raw=raw)
    return Answer(error="answer is neither speech nor a function call", raw=raw)


def validate_arguments(spec: FunctionSpec, arguments: dict[str, Any]) -> list[str]:
    """Problems with the model's arguments for ``spec`` (empty when they fit the schema)."""
    problems: list[str] = []
    known = {p.name: p for p in spec.user_parameters}
    for key in arguments:
        if key not in known:
            problems.append(f"unknown argument {key!r}")
    for param in spec.user_parameters:
        if param.name not in arguments:
            if param.required:
                problems.append(f"missing argument {param.name!r}")
            continue
        value = arguments[param.name]
        if param.enum and value not in param.enum:
            problems.append(f"{param.name!r} not one of {list(param.enum)}")
        elif not _type_ok(param.type, value):
            problems.append(f"{param.name!r} is not a {param.type}")
        elif isinstance(value, str) and len(value) > ARGUMENT_MAX_CHARS:
            problems.append(f"{param.name!r} is too long")
    return problems


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return False


# -- grounded arguments -------------------------------------------------------------------------

_NUMBER_WORDS = {
    "zero": "0", "oh": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9",
}  # fmt: skip
_WORD = re.compile(r"[a-z]+")
_DIGITS = re.compile(r"\d")


def _digits_of(text: str) -> str:
    spoken = _WORD.sub(lambda m: _NUMBER_WORDS.get(m.group(0), m.group(0)), text.lower())
    return "".join(_DIGITS.findall(spoken))


def _email_form(text: str) -> str:
    lowered = f" {text.lower()} "
    lowered = lowered.replace(" at ", "@").replace(" dot ", ".")
    return re.sub(r"\s+", "", lowered)


def _needs_grounding(value: str) -> bool:
    return "@" in value or len(_DIGITS.findall(value)) >= 3


def ungrounded_arguments(spec: FunctionSpec, arguments: dict[str, Any], sources: Iterable[str]) -> list[str]:
    """Names of identifier-like arguments (ids with three or more digits, emails, numbers) whose value
    does not occur in any of ``sources`` (the caller's own words, the agent's instructions, earlier
    function results). Such a call is not dispatched: small models invent placeholder ids."""
    texts = list(sources)
    digit_sources = [_digits_of(t) for t in texts]
    email_sources = [_email_form(t) for t in texts]
    missing: list[str] = []
    for param in spec.user_parameters:
        if param.enum or param.name not in arguments:
            continue
        value = arguments[param.name]
        text = str(value) if not isinstance(value, bool) else ""
        if param.type in ("integer", "number") and text:
            # Counts and amounts too ("for 2 people" when nobody said how many).
            if not any(_digits_of(text) in src for src in digit_sources):
                missing.append(param.name)
            continue
        if not _needs_grounding(text):
            continue
        if "@" in text:
            email = text.lower().replace(" ", "")
            if not any(email in src for src in email_sources):
                missing.append(param.name)
            continue
        digits = _digits_of(text)
        if not any(digits in src for src in digit_sources):
            missing.append(param.name)
    return missing


def humanize(name: str) -> str:
    return name.replace("_", " ").strip()


def given_in(spec: FunctionSpec, arguments: dict[str, Any], text: str) -> bool:
    """True when there is a non-enum argument and every such value occurs in ``text`` (identifiers
    by their digits or spoken email form, others word for word)."""
    lowered = text.lower()
    checked = False
    for param in spec.user_parameters:
        if param.enum or param.name not in arguments:
            continue
        checked = True
        value = str(arguments[param.name])
        if _needs_grounding(value) or param.type in ("integer", "number"):
            if ungrounded_arguments(spec, {param.name: arguments[param.name]}, [text]):
                return False
        elif not value.strip() or value.lower() not in lowered:
            return False
    # Enum values alone are no evidence that the caller gave a detail.
    return checked


# Words of a function's name that say nothing of what it is for.
_NAME_FILLERS = frozenset("get set check lookup look find make call the for".split())


def asked_for_in(
    spec: FunctionSpec, arguments: dict[str, Any], text: str, called: Iterable[str] = ()
) -> bool:
    """True when ``text`` asks for this very call after the ``called`` functions have answered: it
    names the option chosen ("sales") or a word of the function's name that the called ones' names
    lack ("cancel" for ``cancel_order`` after ``get_order_status``), and gives the call's details
    (``given_in``; a built-in's come from the agent's instructions)."""
    words = set(_WORD.findall(text.lower()))
    words |= {w[:-1] for w in words if w.endswith("s")}
    options = {str(arguments[p.name]).lower() for p in spec.user_parameters if p.enum and p.name in arguments}
    named = _name_words(spec.name).difference(*(_name_words(name) for name in called))
    if not words & (options | named):
        return False
    if spec.builtin or not any(not p.enum and p.name in arguments for p in spec.user_parameters):
        return True
    return given_in(spec, arguments, text)


def _name_words(name: str) -> set[str]:
    return {w for w in name.lower().split("_") if len(w) >= 3 and w not in _NAME_FILLERS}


_SPACED_DIGITS = re.compile(r"^\d+(?: \d+)+$")


# A number as the caller said it: digits, or groups of them apart ("1 1 2 2 3", "555-0100").
_DIGIT_RUN = re.compile(r"\d+(?:[ -]\d+)*")
_GROUP_MAX_DIGITS = 4  # longer groups side by side are numbers of their own ("12345 777")


def _numbers_said(text: str) -> set[str]:
    numbers = set()
    for match in _DIGIT_RUN.finditer(text):
        groups = re.split(r"[ -]", match.group(0))
        if any(len(g) > _GROUP_MAX_DIGITS for g in groups):
            numbers.update(groups)
        else:
            numbers.add("".join(groups))
    return numbers


def normalize_arguments(spec: FunctionSpec, arguments: dict[str, Any], said: str = "") -> dict[str, Any]:
    """Identifiers spoken digit by digit come out of speech recognition (and small models) as
    "1 1 2 2 3"; a handler expects "11223". A small model given such digits sometimes writes only
    the first of them ("1"): a value that is a part of exactly one longer number in ``said`` (the
    caller's message) and matches none whole is that number."""
    out = dict(arguments)
    runs = _numbers_said(said)
    for param in spec.user_parameters:
        value = out.get(param.name)
        if param.type == "string" and not param.enum and isinstance(value, str):
            stripped = value.strip()
            if _SPACED_DIGITS.match(stripped):
                stripped = stripped.replace(" ", "")
            if stripped.isdigit() and stripped not in runs:
                longer = [r for r in runs if len(r) >= 3 and stripped in r]
                if len(longer) == 1:
                    stripped = longer[0]
            if stripped != value.strip():
                out[param.name] = stripped
    return out


# How a small model's refusal begins ("I'm sorry, I can't cancel orders").
REFUSAL_OPENINGS = (
    "i'm sorry", "im sorry", "i am sorry", "sorry", "i can't", "i cant", "i cannot", "i'm unable",
    "im unable", "i am unable", "unfortunately", "i don't have", "i dont have",
)  # fmt: skip


def _normalized_opening(text: str) -> str:
    return text.lstrip().replace("\u2019", "'").lower()


def looks_like_refusal(text: str) -> bool:
    return _normalized_opening(text).startswith(REFUSAL_OPENINGS)


def may_become_refusal(text: str) -> bool:
    """True while the start of a reply could still turn out to be a refusal: it is one, or it is
    the beginning of a refusal's opening ("I", "I'm s", "Unfortu"). "You have", "Sure", "I'd" are
    not, and can be spoken at once."""
    opening = _normalized_opening(text)
    return opening.startswith(REFUSAL_OPENINGS) or any(c.startswith(opening) for c in REFUSAL_OPENINGS)
