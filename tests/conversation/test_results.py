"""Reading a function's result: the words that show a reply speaks of it, and its plain reading."""

from __future__ import annotations

from appliance.conversation.results import READING_OPENING, mentions_result, read_result, result_words

ORDER = {"order_id": "12345", "status": "shipped, arriving Friday", "gift": False}


def test_result_words_are_its_distinctive_values_not_its_keys() -> None:
    words = result_words(ORDER)
    assert {"12345", "shipped", "arriving", "friday"} <= words
    assert "status" not in words and "order" not in words and "false" not in words


def test_a_refusal_names_nothing_of_the_result_and_an_apology_for_it_does() -> None:
    words = result_words({"order_id": "99", "status": "not found"})
    assert not mentions_result("I'm sorry, but I can't assist with that request.", words)
    assert mentions_result("I'm sorry, order 99 was not found.", words)
    assert not mentions_result("Sorry, I could not do that.", words)  # "not" alone is no evidence


def test_nested_results_and_lists_are_read() -> None:
    result = {"orders": [{"id": "A1", "eta": "Monday"}, {"id": "B2", "eta": "Tuesday"}]}
    assert {"a1", "monday", "b2", "tuesday"} <= result_words(result)
    reading = read_result(result, 200)
    assert reading.startswith(READING_OPENING) and reading.endswith(".")
    assert "id A1" in reading and "eta Tuesday" in reading


def test_the_reading_is_plain_and_fits_the_reply_bound() -> None:
    assert read_result(ORDER, 200) == (f"{READING_OPENING}order id 12345; status shipped, arriving Friday.")
    long = read_result({"note": "word " * 200}, 120)
    assert len(long) <= 120 and long.endswith(".")
    assert read_result("Booked for 7 pm", 200) == f"{READING_OPENING}Booked for 7 pm."
    assert read_result({}, 200) == "That's done."
