"""Conversations that remember: session memories and lifelong user memories (see :mod:`.conversations`).

The package's rooms: :mod:`.ids` (id checks, owner tokens), :mod:`.state` (config, turns, states, per-query
context), :mod:`.store` (where they live), :mod:`.memories` (the memory object, bounds, folding), :mod:`.text`
(prompts, turn texts), :mod:`.history` (chat histories), :mod:`.conversations` (per query) and
:mod:`.lifecycle` (ends, expiry, deletion). Everything is importable from here.
"""

from memorag_core.query.sessions.conversations import Conversations
from memorag_core.query.sessions.history import chat_session_id, history_turns
from memorag_core.query.sessions.ids import (
    check_owner,
    check_session_id,
    check_user_id,
    new_session_id,
    owner_of,
    tenant_owner,
    user_key,
    user_tag,
)
from memorag_core.query.sessions.memories import ConversationMemories, fold_oldest
from memorag_core.query.sessions.state import (
    STATE_SCHEMA,
    ConversationState,
    SessionConfig,
    SessionContext,
    Turn,
)
from memorag_core.query.sessions.store import SessionStore
from memorag_core.query.sessions.text import (
    RECALL_PROMPT,
    STANDALONE_PROMPT,
    USER_PROMPT,
    _lines,
    clean_lines,
    turn_text,
    user_text,
)

__all__ = [
    "Conversations", "ConversationMemories", "ConversationState", "RECALL_PROMPT", "STANDALONE_PROMPT",
    "STATE_SCHEMA", "SessionConfig", "SessionContext", "SessionStore", "Turn", "USER_PROMPT", "chat_session_id",
    "check_owner", "check_session_id", "check_user_id", "clean_lines", "fold_oldest", "history_turns",
    "new_session_id", "owner_of", "tenant_owner", "turn_text", "user_key", "user_tag", "user_text", "_lines",
]
