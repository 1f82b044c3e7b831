"""HttpDispatcher against a real local HTTP server: every failure is a result, never an exception."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from appliance.conversation.dispatch import HttpDispatcher
from appliance.conversation.types import FunctionSpec

from .conftest import HandlerServer, closed_port_url

CONTEXT = {"agent_id": "agent-1", "session_id": "s-1", "from": "+1555", "to": "+1666"}


@pytest.fixture
async def dispatcher() -> AsyncIterator[HttpDispatcher]:
    d = HttpDispatcher(timeout_s=1.0, max_reply_bytes=4096)
    yield d
    await d.aclose()


def _spec(url: str) -> FunctionSpec:
    return FunctionSpec("get_order_status", handler_url=url)


async def test_posts_arguments_and_context_and_reads_json(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    result = await dispatcher.dispatch(
        _spec(handler.url("/order")), {"order_id": "12345", "api_key": "secret-key-1"}, CONTEXT
    )
    assert result.ok and result.status_code == 200
    assert result.result == {"order_id": "12345", "status": "shipped, arriving Friday"}
    assert handler.bodies("/order") == [
        {"arguments": {"order_id": "12345", "api_key": "secret-key-1"}, "context": CONTEXT}
    ]


async def test_text_reply_is_kept_as_text(dispatcher: HttpDispatcher, handler: HandlerServer) -> None:
    result = await dispatcher.dispatch(_spec(handler.url("/text")), {}, CONTEXT)
    assert result.ok and result.result == "The store opens at nine."


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/slow", "did not answer within 1 seconds"),
        ("/fail", "HTTP status 500"),
        ("/badjson", "not valid"),
        ("/big", "larger than 4096 bytes"),
    ],
)
async def test_handler_failures_become_results(
    dispatcher: HttpDispatcher, handler: HandlerServer, path: str, words: str
) -> None:
    result = await dispatcher.dispatch(_spec(handler.url(path)), {"x": 1}, CONTEXT)
    assert not result.ok
    assert result.error is not None and words in result.error
    assert len(handler.bodies(path)) == 1


async def test_connection_refused_is_a_result(dispatcher: HttpDispatcher) -> None:
    result = await dispatcher.dispatch(_spec(closed_port_url()), {}, CONTEXT)
    assert not result.ok and result.error is not None and "could not be reached" in result.error


async def test_missing_or_bad_url_is_a_result(dispatcher: HttpDispatcher) -> None:
    assert not (await dispatcher.dispatch(_spec(""), {}, CONTEXT)).ok
    assert not (await dispatcher.dispatch(_spec("not a url"), {}, CONTEXT)).ok
