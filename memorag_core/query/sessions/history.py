"""OpenAI-style chat histories as conversation turns: bounds, shape, and the session id a history maps to."""

from __future__ import annotations

import hashlib

from memorag_core.errors import InvalidInputError, PayloadTooLargeError
from memorag_core.query.sessions.state import SessionConfig


def history_turns(messages: list[dict], cfg: SessionConfig) -> tuple[list[tuple[str, str]], str]:
    """Split an OpenAI-style chat history into completed (question, answer) turns and the last user message.

    Raises:
        PayloadTooLargeError: more than ``max_history_messages`` messages or ``max_history_chars`` characters.
        InvalidInputError: not a list of ``{role, content}`` with string content, or not ending with a user turn.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {role, content} objects")
    if len(messages) > cfg.max_history_messages:
        raise PayloadTooLargeError(f"history has {len(messages)} messages; the limit is {cfg.max_history_messages}")
    total = 0
    turns: list[tuple[str, str]] = []
    pending: str | None = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise InvalidInputError(f"messages[{i}] must be {{role: system|user|assistant, content: string}}")
        total += len(m["content"])
        if m["role"] == "user":
            if pending is not None:  # two user messages in a row: one question
                pending = pending + "\n" + m["content"]
            else:
                pending = m["content"]
        elif m["role"] == "assistant" and pending is not None:
            turns.append((pending, m["content"]))
            pending = None
    if total > cfg.max_history_chars:
        raise PayloadTooLargeError(f"history holds {total} characters; the limit is {cfg.max_history_chars}")
    if pending is None or not pending.strip():
        raise InvalidInputError("the last message must be a non-empty user message")
    return turns, pending


def chat_session_id(owner: str, collection: str, first_question: str, user_id: str | None = None) -> str:
    """Deterministic session id of a chat history: the same conversation maps to the same session, so a
    growing history only appends its new turns (no re-reading). The end user (OpenAI's ``user``) is part of
    it: two users behind one key who open with the same question keep two sessions."""
    digest = hashlib.sha256(f"{owner}\x00{collection}\x00{user_id or ''}\x00{first_question}".encode()).hexdigest()
    return f"chat-{digest[:40]}"
