"""How conversations end: a session's turns reach its user memory, expired sessions and user memories are swept,
and a user is deleted with everything that names them.
"""

from __future__ import annotations

import logging
import time

from memorag_core.errors import ArtifactNotFoundError, InvalidInputError
from memorag_core.query.sessions.ids import check_session_id, check_user_id, user_tag
from memorag_core.query.sessions.state import ConversationState, Turn
from memorag_core.query.sessions.text import user_text

logger = logging.getLogger("memorag_core.query.sessions")


class Lifecycle:
    """Ends of conversations (mixed into :class:`~memorag_core.query.sessions.Conversations`; needs its
    ``sessions``, ``config``, ``_lock`` and memory methods)."""

    def _flush_user(self, memory, state: ConversationState) -> None:
        """Append the session's turns not yet given to its user memory, as one record (then fold, save)."""
        fresh = state.turn_count - state.user_flushed
        turns = state.turns[-fresh:] if fresh > 0 else []
        if not turns or not state.user_id:
            return
        ustate = self.sessions.get("user", state.user_id, state.owner, state.collection)
        now = self.sessions.clock()
        if ustate is None:
            ustate = ConversationState(state.user_id, "user", state.collection, state.owner, state.user_id, now)
        self.load_into(memory, ustate)
        record = Turn(" | ".join(t.question for t in turns), "", list(dict.fromkeys(x for t in turns
                                                                                     for x in t.titles)), at=now)
        ustate.turn_count += 1
        self.append(memory, ustate, record, user_text(state.collection, turns))
        tensors = self.bound(memory, ustate, self.config.user_max_entries, self.config.user_max_bytes)
        ustate.updated_at, ustate.expires_at = now, now + self.config.user_ttl_s
        self.sessions.write(ustate, tensors)
        state.user_flushed = state.turn_count
        self.sessions.write(state, None)
        logger.info("user %s: memory grew by %d turns of session %s", user_tag(state.user_id), len(turns),
                    state.id)

    def end(self, session_id: str, owner: str) -> ConversationState:
        """End a session: what it revealed goes to its user memory, then it is deleted. Returns its last state.

        Raises ArtifactNotFoundError when ``owner`` has no such session (expired ones can still be ended).
        """
        with self._lock:
            state = self.sessions.get("session", check_session_id(session_id), owner, allow_expired=True)
            if state.user_id and state.turn_count > state.user_flushed:
                try:
                    self._flush_user(self.memory_for(state.collection), state)
                except (ArtifactNotFoundError, InvalidInputError) as exc:  # collection gone: nothing to read with
                    logger.warning("session %s: user memory not grown (%s)", session_id, exc)
            return self.sessions.delete("session", session_id, owner)

    def delete_user(self, owner: str, user_id: str) -> dict:
        """Delete ``owner``'s user ``user_id``: the user memory and every session that carries the id (states,
        turns, memory files), under the lock that records turns, so that no turn of this process in flight
        writes them again. Returns ``{"sessions": n, "records": m}``; ArtifactNotFoundError when there is none.
        """
        check_user_id(user_id)
        with self._lock:
            return self.sessions.delete_user(owner, user_id)

    def sweep(self, min_interval_s: float = 60.0) -> int:
        """End every expired session (user memories grow from them) and delete user memories past
        ``user_ttl_s``; at most once per ``min_interval_s``. Returns how many sessions were ended. The Serve
        memory worker runs it on a timer thread, off the request path."""
        now = time.monotonic()
        if now - self._last_sweep < min_interval_s:
            return 0
        self._last_sweep = now
        n = 0
        for s in self.sessions.expired_sessions():
            try:
                self.end(s.id, s.owner)
                n += 1
            except ArtifactNotFoundError:
                continue
        users = 0
        for u in self.sessions.expired_users():
            with self._lock:
                current = self.sessions.get("user", u.id, u.owner, allow_expired=True)
                if current is not None and current.expires_at <= self.sessions.clock():
                    self.sessions.delete("user", u.id, u.owner)
                    users += 1
        if n or users:
            logger.info("sweep: %d expired sessions ended, %d expired user memories deleted", n, users)
        return n
