"""The answer schema, the streaming JSON reader, argument validation and the grounding rule."""

from __future__ import annotations

import json

import jsonschema
import pytest

from appliance.conversation.tools import (
    ARGUMENT_MAX_CHARS,
    StreamingAnswer,
    asked_for_in,
    looks_like_refusal,
    max_output_chars,
    may_become_refusal,
    normalize_arguments,
    output_schema,
    parse_answer,
    say_max_chars,
    ungrounded_arguments,
    validate_arguments,
)
from appliance.conversation.types import FunctionSpec, Parameter

ORDER = FunctionSpec(
    "get_order_status",
    user_parameters=(Parameter("order_id", "string", required=True),),
    fixed_parameters={"api_key": "k"},
)
BOOK = FunctionSpec(
    "book",
    user_parameters=(
        Parameter("people", "integer", required=True),
        Parameter("area", "string", required=False, enum=("inside", "terrace")),
        Parameter("email", "string", required=False),
        Parameter("vip", "boolean", required=False),
    ),
)


def _feed_all(text: str, size: int) -> tuple[str, StreamingAnswer]:
    reader = StreamingAnswer()
    out = "".join(reader.feed(text[i : i + size]) for i in range(0, len(text), size))
    return out, reader


def test_schema_is_oneof_of_functions_and_say_with_bounded_strings() -> None:
    schema = output_schema([ORDER, BOOK], say_max_chars(100))
    assert [s["properties"].get("name", {}).get("const") for s in schema["oneOf"]] == [
        "get_order_status", "book", None,
    ]  # fmt: skip
    order_args = schema["oneOf"][0]["properties"]["arguments"]
    assert order_args["required"] == ["order_id"]
    assert order_args["properties"]["order_id"]["maxLength"] == ARGUMENT_MAX_CHARS
    assert "api_key" not in json.dumps(schema)  # fixed parameters never reach the model
    book_args = schema["oneOf"][1]["properties"]["arguments"]
    assert book_args["properties"]["area"] == {"enum": ["inside", "terrace"]}
    assert book_args["required"] == ["people"]
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"say": "hi"})
    assert validator.is_valid({"name": "book", "arguments": {"people": 2, "area": "terrace"}})
    assert not validator.is_valid({"name": "book", "arguments": {"people": 2, "area": "roof"}})
    assert not validator.is_valid({"name": "get_order_status", "arguments": {}})
    assert not validator.is_valid({"say": "x" * 1000})


def test_no_functions_means_speech_only() -> None:
    schema = output_schema([], 200)
    assert "oneOf" not in schema and schema["required"] == ["say"]


def test_max_output_chars_bounds_the_longest_answer() -> None:
    schema = output_schema([ORDER, BOOK], 200)
    longest = json.dumps({"say": "x" * 200})
    assert max_output_chars(schema) >= len(longest)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_streaming_reader_yields_say_text_incrementally(size: int) -> None:
    text = 'Hi "there"\\ caf\u00e9 \U0001f600 line\nend/'
    raw = json.dumps({"say": text})  # escapes quotes, backslash, newline and non-ASCII as \uXXXX
    out, reader = _feed_all(raw, size)
    assert out == text
    answer = reader.result()
    assert answer.say == text and not answer.truncated


def test_streaming_reader_accepts_spaces_the_grammar_allows() -> None:
    out, reader = _feed_all('{ "say" : "Hello there." }', 2)
    assert out == "Hello there."
    assert reader.result().say == "Hello there."


def test_streaming_reader_emits_first_words_before_the_json_closes() -> None:
    reader = StreamingAnswer()
    assert reader.feed('{"sa') == ""
    assert reader.feed('y": "Your order') == "Your order"
    assert reader.feed(" has shipped") == " has shipped"
    assert reader.feed('."}') == "."


def test_streaming_reader_is_silent_for_function_calls() -> None:
    raw = json.dumps({"name": "get_order_status", "arguments": {"order_id": "12345"}})
    out, reader = _feed_all(raw, 4)
    assert out == ""
    answer = reader.result()
    assert answer.function == "get_order_status" and answer.arguments == {"order_id": "12345"}


def test_truncated_speech_keeps_what_was_said_and_truncated_call_is_an_error() -> None:
    _, reader = _feed_all('{"say": "Your order is on its w', 5)
    answer = reader.result()
    assert answer.say == "Your order is on its w" and answer.truncated
    _, reader = _feed_all('{"name": "get_order_status", "argu', 5)
    assert reader.result().error


def test_parse_answer_rejects_other_shapes() -> None:
    assert parse_answer([1, 2]).error
    assert parse_answer({"say": "a", "name": "b"}).error
    assert parse_answer({"name": "f", "arguments": []}).error


def test_validate_arguments() -> None:
    assert validate_arguments(BOOK, {"people": 2, "area": "inside"}) == []
    problems = validate_arguments(BOOK, {"people": "two", "area": "roof", "extra": 1})
    assert any("extra" in p for p in problems)
    assert any("area" in p for p in problems)
    assert any("people" in p for p in problems)
    assert validate_arguments(BOOK, {}) == ["missing argument 'people'"]
    assert validate_arguments(BOOK, {"people": True}) == ["'people' is not a integer"]
    assert validate_arguments(ORDER, {"order_id": "1" * 500}) == ["'order_id' is too long"]


@pytest.mark.parametrize(
    ("said", "value", "grounded"),
    [
        ("my order is 12345", "12345", True),
        ("it's 1 2 3 4 5", "12345", True),
        ("one two three four five", "12345", True),
        ("I want to check my order", "12345", False),
        ("my order number is 12346", "12345", False),
        ("I'd like my order status", "ABC", True),  # no digits: not identifier-like
        ("order 42 please", "42", True),  # fewer than three digits: not checked
    ],
)
def test_identifier_arguments_must_come_from_the_callers_words(said: str, value: str, grounded: bool) -> None:
    missing = ungrounded_arguments(ORDER, {"order_id": value}, [said])
    assert (missing == []) is grounded


def test_email_grounding_understands_spoken_form() -> None:
    args = {"email": "jo@example.com"}
    assert ungrounded_arguments(BOOK, args, ["mail me at jo at example dot com"]) == []
    assert ungrounded_arguments(BOOK, args, ["jo@example.com"]) == []
    assert ungrounded_arguments(BOOK, args, ["use my usual email"]) == ["email"]


def test_numbers_must_be_said_too() -> None:
    assert ungrounded_arguments(BOOK, {"people": 2}, ["a table for 2 please"]) == []
    assert ungrounded_arguments(BOOK, {"people": 4}, ["we are four"]) == []
    assert ungrounded_arguments(BOOK, {"people": 2}, ["how are you doing?"]) == ["people"]


def test_spaced_digits_are_joined() -> None:
    assert normalize_arguments(ORDER, {"order_id": " 1 1 2 2 3 "}) == {"order_id": "11223"}
    assert normalize_arguments(ORDER, {"order_id": "AB 12"}) == {"order_id": "AB 12"}
    assert normalize_arguments(ORDER, {"order_id": "123-456"}) == {"order_id": "123-456"}


@pytest.mark.parametrize(
    ("value", "said", "expected"),
    [
        ("1", "Sure, 1 1 2 2 3.", "11223"),  # the model wrote only the first digit
        ("1 1 2", "It's 1 1 2 2 3", "11223"),
        ("555", "my number is 555-0100", "5550100"),
        ("2", "2 tickets for order 12345", "2"),  # a whole number the caller said
        ("1", "orders 12345 and 7771", "1"),  # part of two longer numbers: not guessed
        ("12345", "Where is 12345?", "12345"),
        ("12345", "orders 12345 777", "12345"),  # two numbers, not one read in groups
        ("7", "orders 12345 777", "777"),
        ("99", "", "99"),
    ],
)
def test_a_value_cut_short_of_the_one_number_the_caller_said_is_that_number(
    value: str, said: str, expected: str
) -> None:
    assert normalize_arguments(ORDER, {"order_id": value}, said) == {"order_id": expected}


@pytest.mark.parametrize(
    ("opening", "maybe"),
    [
        ("", True),
        ("  I", True),
        ("I\u2019m so", True),  # typographic apostrophe
        ("Unfortu", True),
        ("SORRY, we", True),
        ("I'm sorry, but", True),
        ("I can", True),
        ("I'd", False),
        ("You", False),
        ("Sure, I", False),
        ("I have your order", False),
        ("So", True),  # "Sorry" may follow
        ("So, your", False),
    ],
)
def test_may_become_refusal(opening: str, maybe: bool) -> None:
    assert may_become_refusal(opening) is maybe


def test_refusals_are_recognised_whatever_the_case_and_apostrophe() -> None:
    assert looks_like_refusal(" I\u2019m sorry, I can't do that")
    assert looks_like_refusal("unfortunately not") and looks_like_refusal("I dont have that")
    assert not looks_like_refusal("I'd love to") and not looks_like_refusal("So, your order")


TRANSFER = FunctionSpec(
    "transfer_to_human",
    user_parameters=(Parameter("department", "string", required=True, enum=("sales", "support")),),
)
CANCEL = FunctionSpec("cancel_order", user_parameters=(Parameter("order_id", "string", required=True),))
TRANSFER_CALL = FunctionSpec(
    "transfer_call", user_parameters=(Parameter("number", "string", required=True),), builtin=True
)


@pytest.mark.parametrize(
    ("spec", "arguments", "text", "asked"),
    [
        (TRANSFER, {"department": "sales"}, "Where is my order 12345?", False),
        (TRANSFER, {"department": "support"}, "order 12345, then a human please", True),
        (TRANSFER, {"department": "sales"}, "Check 12345 and put me through to sales.", True),
        (TRANSFER, {"department": "sales"}, "Then transfer me, thanks", True),
        (TRANSFER, {"department": "sales"}, "Are there humans there?", True),
        # The same order id, but only the lookup was asked for: "order" is in both names.
        (CANCEL, {"order_id": "12345"}, "Where is my order 12345?", False),
        (CANCEL, {"order_id": "12345"}, "Where is order 12345? If it has not shipped, cancel it.", True),
        (CANCEL, {"order_id": "777"}, "Where is order 12345? Cancel it.", False),  # not its details
        (TRANSFER_CALL, {"number": "+14155550123"}, "Check 12345, then transfer me to billing", True),
        (TRANSFER_CALL, {"number": "+14155550123"}, "Check 12345 please", False),
    ],
)
def test_a_further_call_is_asked_for_by_its_own_name_or_option_and_its_details(
    spec: FunctionSpec, arguments: dict[str, str], text: str, asked: bool
) -> None:
    assert asked_for_in(spec, arguments, text, called=["get_order_status"]) is asked
