"""The brain: text in, text out. Prompt, retrieval, grammar-constrained function calls, dispatch."""

from .dispatch import Dispatcher, HttpDispatcher
from .engine import Conversation, Retriever
from .types import (
    AgentConfig,
    ConversationContext,
    EndCall,
    FunctionCallFinished,
    FunctionCallStarted,
    FunctionResult,
    FunctionSpec,
    Parameter,
    TextDelta,
    Transfer,
    TurnDone,
    TurnEvent,
)

__all__ = [
    "AgentConfig",
    "Conversation",
    "ConversationContext",
    "Dispatcher",
    "EndCall",
    "FunctionCallFinished",
    "FunctionCallStarted",
    "FunctionResult",
    "FunctionSpec",
    "HttpDispatcher",
    "Parameter",
    "Retriever",
    "TextDelta",
    "Transfer",
    "TurnDone",
    "TurnEvent",
]
