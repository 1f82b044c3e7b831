"""Text chat with an agent: sessions that keep their history between HTTP requests.

Sessions are bounded in number (least recently used goes first) and in age (idle past the TTL is
forgotten). Each request builds a fresh ``Conversation`` over the session's history, so an agent
edited between two messages is used as it is now.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .dispatch import HttpDispatcher
from .engine import Conversation, Retriever
from .prompt import HistoryItem
from .types import AgentConfig, ConversationContext, TurnEvent

if TYPE_CHECKING:
    from ..config import Settings
    from ..engines.types import LlmEngine
    from ..server import AppState


@dataclass
class ChatSession:
    id: str
    history: list[HistoryItem] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)


class ChatSessions:
    def __init__(self, *, max_sessions: int, ttl_s: float):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._sessions: OrderedDict[tuple[str, str, str], ChatSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def get_or_create(self, account_id: str, agent_id: str, session_id: str | None) -> ChatSession:
        """The session (scoped to one account and agent: another's id starts a new one)."""
        self._expire()
        session_id = session_id or str(uuid.uuid4())
        key = (account_id, agent_id, session_id)
        session = self._sessions.get(key)
        if session is None:
            session = ChatSession(session_id)
            self._sessions[key] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(key)
        session.last_used = time.monotonic()
        return session

    def _expire(self) -> None:
        limit = time.monotonic() - self.ttl_s
        while self._sessions:
            key, oldest = next(iter(self._sessions.items()))
            if oldest.last_used >= limit:
                break
            del self._sessions[key]


class ChatService:
    """Owns the chat sessions and the handler dispatcher used by chat conversations."""

    def __init__(self, settings: Settings, retriever: Retriever | None = None):
        limits = settings.limits
        self.sessions = ChatSessions(max_sessions=limits.chat_sessions_max, ttl_s=limits.chat_session_ttl_s)
        self.dispatcher = HttpDispatcher(
            timeout_s=limits.handler_timeout_s, max_reply_bytes=limits.handler_max_reply_bytes
        )
        self.retriever = retriever

    async def aclose(self) -> None:
        await self.dispatcher.aclose()

    async def turn(
        self,
        agent: AgentConfig,
        llm: LlmEngine,
        session: ChatSession,
        message: str,
        variables: dict[str, Any] | None = None,
    ) -> AsyncGenerator[TurnEvent, None]:
        """One chat turn as events. Turns of one session run one at a time."""
        async with session.lock:
            context = ConversationContext(session_id=session.id, channel="chat", variables=variables or {})
            conversation = Conversation(
                agent, llm, context, dispatcher=self.dispatcher, retriever=self.retriever
            )
            conversation.history = session.history
            try:
                async with contextlib.aclosing(conversation.turn(message)) as events:
                    async for event in events:
                        yield event
            finally:
                # The conversation may have replaced the list while bounding it.
                session.history = conversation.history
                session.last_used = time.monotonic()


async def open_chat(state: AppState, stack: contextlib.AsyncExitStack) -> ChatService:
    """Register the chat service (after "knowledge", whose search it uses when present)."""
    service = ChatService(state.settings, retriever=state.services.get("knowledge"))
    stack.push_async_callback(service.aclose)
    state.services["chat"] = service
    return service
