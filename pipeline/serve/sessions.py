"""Session and user memories in the Serve app: the memory worker's calls (:class:`SessionWorker`, mixed into
:class:`~pipeline.serve.deployments.MemoryWorker`, which owns the memory models).

Conversation memories read and write the memory model, so they live where it lives: the memory worker. Their
state is in the store (``sessions/``, ``users/``; see :mod:`memorag_core.query.sessions`), so any replica serves any
session and a restarted replica carries on. The ingress asks for a :class:`~memorag_core.query.sessions.
SessionContext` before routing (``session_prepare``) and records the turn after the answer (``session_record``).
Expired sessions are ended (their turns fed to user memories) and expired user memories deleted by a sweeper
thread every ``sweep_every_s`` per replica, off the request path.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from memorag_core.query.sessions import ConversationState, SessionContext

logger = logging.getLogger(__name__)


class SessionWorker:
    """Conversation calls of the memory worker. Needs ``self.writer`` (a ClueWriter) and ``self.catalog``."""

    def _conversations(self):
        conv = getattr(self, "_conv", None)
        if conv is None:
            from memorag_core.query.sessions import Conversations, SessionConfig, SessionStore

            cfg = getattr(self, "session_config", None) or SessionConfig()
            conv = Conversations(SessionStore(self.catalog.store, config=cfg),
                                 lambda name: self.writer.memory_for(self.catalog.view(name)))
            self._conv = conv
        return conv

    def start_sweeper(self, every_s: float) -> threading.Event:
        """Sweep expired sessions and user memories every ``every_s`` seconds on a daemon thread (never on the
        request path); returns the event that stops it."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    self._conversations().sweep(min_interval_s=0)
                except Exception as exc:  # noqa: BLE001 - a store hiccup must not end the thread
                    logger.warning("session sweep failed: %s", type(exc).__name__)

        threading.Thread(target=loop, daemon=True, name="session-sweeper").start()
        return stop

    async def _run(self, fn, *args, **kwargs):
        conv = self._conversations()
        return await asyncio.to_thread(getattr(conv, fn) if isinstance(fn, str) else fn, *args, **kwargs)

    async def session_create(self, name: str, owner: str, user_id: str | None) -> dict:
        """A new session of collection ``name`` (its public state)."""
        conv = self._conversations()
        state: ConversationState = await asyncio.to_thread(conv.sessions.create, name, owner, user_id)
        return state.public()

    async def session_get(self, session_id: str, owner: str) -> dict:
        """The public state of a session of ``owner`` (ArtifactNotFoundError otherwise)."""
        conv = self._conversations()
        state = await asyncio.to_thread(conv.sessions.get, "session", session_id, owner)
        return state.public()

    async def session_end(self, session_id: str, owner: str) -> dict:
        """End (and delete) a session; its turns reach its user memory first."""
        state = await self._run("end", session_id, owner)
        return state.public()

    async def user_delete(self, user_id: str, owner: str) -> dict:
        """Delete ``owner``'s user ``user_id``: the user memory and every session that carries the id."""
        out = await self._run("delete_user", owner, user_id)
        return {"id": user_id, "deleted": True, **out}

    async def session_prepare(self, name: str, owner: str, query: str, session_id: str | None,
                              user_id: str | None) -> SessionContext:
        """What the session / user memories contribute to ``query`` (standalone question, recalls)."""
        return await self._run("prepare", name, owner, query, session_id=session_id, user_id=user_id)

    async def session_record(self, name: str, owner: str, session_id: str, question: str, answer: str,
                             titles: list[str], standalone: str | None) -> int:
        """Append one turn to the session memory; returns the session's turn count."""
        state = await self._run("record", name, owner, session_id, question, answer, titles, standalone)
        return state.turn_count

    async def session_sync(self, name: str, owner: str, messages: list[dict], user_id: str | None
                           ) -> tuple[str, str]:
        """A chat history -> (session id or "" for a first message, last user message); new turns appended."""
        return await self._run("sync_history", name, owner, messages, user_id)
