"""Opens the long-lived services (store, knowledge index, chat sessions, call manager) for an app.

Each service registers its own cleanup on the exit stack so shutdown is orderly and complete.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import AppState


async def open_services(state: AppState, stack: contextlib.AsyncExitStack) -> None:
    # SERVICES: each service is opened here, in dependency order (store first).
    from .store.migrate import open_database  # store: migrated to head, disposed at shutdown

    state.services["db"] = await open_database(state.settings.resolved_database_url)
    stack.push_async_callback(state.services["db"].dispose)
    from .knowledge.service import open_knowledge  # knowledge: needs "db"; stops its indexer at shutdown

    await open_knowledge(state, stack)
    from .conversation.chat import open_chat  # chat: uses "knowledge" for retrieval

    await open_chat(state, stack)
    from .call.manager import open_calls  # calls: needs "db" (and "knowledge" for retrieval)

    await open_calls(state, stack)
    return None
