"""Conversations that remember: session memories and lifelong user memories, each a compressed KV memory.

A **session** keeps its own compressed memory of the conversation. Each turn (question, answer, titles of the
cited evidence) is added with :meth:`~memorag_core.memory.Memory.append`, so the conversation is read once, turn
by turn, never re-read from scratch. At query time the memory model, attending to the session memory, writes two
things in one batched decode (:meth:`Conversations.prepare`):

* a **standalone question**: the follow-up ("when was he born?") rewritten so that it names what it refers to;
* **recalls**: spans of the conversation that bear on the follow-up.

Both join the retrieval queries with source ``session`` (see :mod:`memorag_core.retrieval.fusion`); the
standalone question also drives routing and the unit memories' clues. A **user** memory (``user_id``) is grown
the same way from what that user's sessions revealed (their questions and the titles they read), every
``user_every`` turns and when a session ends; its recalls join the retrieval queries with source ``user``.

A session is bound to one collection and one owner (a tenant's token, see :mod:`.ids`); another owner gets "not
found", exactly as for a session that does not exist. Storage: :mod:`.store`; bounds and folding: :mod:`.memories`;
ends, deletion and expiry: :mod:`.lifecycle`. Concurrency: one process serializes turns (and deletions) with one
lock; two replicas writing the same session at the same instant keep the last write (a conversation is one
user's sequential turns). The session memory uses the collection's memory model (shared weights, its own state)
with :class:`SessionConfig`'s compression; a beacon collection (whose model runs its own remote code) is refused.
"""

from __future__ import annotations

import time

from memorag_core.errors import ArtifactNotFoundError, InvalidInputError
from memorag_core.query.sessions.history import chat_session_id, history_turns
from memorag_core.query.sessions.ids import check_session_id, check_user_id
from memorag_core.query.sessions.lifecycle import Lifecycle
from memorag_core.query.sessions.memories import ConversationMemories
from memorag_core.query.sessions.state import ConversationState, SessionContext, Turn
from memorag_core.query.sessions.text import RECALL_PROMPT, STANDALONE_PROMPT, USER_PROMPT, _lines, turn_text


class Conversations(Lifecycle, ConversationMemories):
    """Session and user memories for the query engine: read them for a query, grow them after the answer, end
    and delete them (see :class:`~memorag_core.query.sessions.memories.ConversationMemories` for the arguments).
    """

    # -- per query -------------------------------------------------------------------------------------------
    def prepare(self, collection: str, owner: str, query: str, *, session_id: str | None = None,
                user_id: str | None = None) -> SessionContext:
        """Read the session and user memories for ``query``: the standalone question, session and user recalls.

        Raises ArtifactNotFoundError for an unknown, expired or foreign session (or one of another collection);
        InvalidInputError for malformed ids, or a ``user_id`` that differs from the session's.
        """
        t0 = time.perf_counter()
        ctx = SessionContext(session_id=session_id, user_id=user_id)
        state = None
        if session_id is not None:
            state = self.sessions.get("session", check_session_id(session_id), owner, collection)
            if user_id is not None and state.user_id not in (None, user_id):
                raise InvalidInputError(f"session {session_id!r} belongs to another user id")
            ctx.user_id = user_id = user_id or state.user_id
            ctx.turn = state.turn_count + 1
        if user_id is not None:
            check_user_id(user_id)
        with self._lock:
            memory = None
            if state is not None and state.turns:
                memory = self.memory_for(collection)
                if self.load_into(memory, state):
                    standalone, recalls = memory.generate([STANDALONE_PROMPT, RECALL_PROMPT], query,
                                                          max_new_tokens=max(self.config.standalone_tokens,
                                                                             self.config.recall_tokens))
                    from memorag_core.retrieval.fusion import normalize_query

                    echo = self.echo(memory, STANDALONE_PROMPT + " " + RECALL_PROMPT, query)
                    line = (_lines(standalone, 1, echo) or [""])[0]
                    ctx.standalone = line if line and normalize_query(line) != normalize_query(query) else None
                    ctx.session_recalls = _lines(recalls, echo_of=echo)
            if user_id is not None:
                ustate = self.sessions.get("user", user_id, owner, collection)
                if ustate is not None and ustate.turns:
                    memory = memory or self.memory_for(collection)
                    if self.load_into(memory, ustate):
                        ctx.user_pointed = self.point_records(memory, ustate, query)
                        ctx.user_recalls = _lines(memory.generate(USER_PROMPT, query,
                                                                  max_new_tokens=self.config.recall_tokens)[0],
                                                  echo_of=self.echo(memory, USER_PROMPT, query))
        ctx.seconds = time.perf_counter() - t0
        return ctx

    def record(self, collection: str, owner: str, session_id: str, question: str, answer: str,
               titles: list[str], standalone: str | None = None) -> ConversationState:
        """Append one turn to the session memory (fold, save); every ``user_every`` turns, feed the user memory.

        Raises ArtifactNotFoundError as :meth:`prepare` does.
        """
        with self._lock:
            state = self.sessions.get("session", check_session_id(session_id), owner, collection)
            memory = self.memory_for(collection)
            self.load_into(memory, state)
            state.turn_count += 1
            turn = Turn(question, answer, list(titles), standalone, n=state.turn_count, at=self.sessions.clock())
            self.append(memory, state, turn, turn_text(state.turn_count, question, answer, titles,
                                                        self.config.max_answer_chars))
            tensors = self.bound(memory, state, self.config.max_turns, self.config.max_bytes)
            now = self.sessions.clock()
            state.updated_at, state.expires_at = now, now + self.config.ttl_s
            self.sessions.write(state, tensors)
            if state.user_id and state.turn_count - state.user_flushed >= self.config.user_every:
                self._flush_user(memory, state)
            return state

    def sync_history(self, collection: str, owner: str, messages: list[dict], user_id: str | None = None
                     ) -> tuple[str, str]:
        """A chat history -> (session id, last question): the history's completed turns are appended to its
        session (created on first sight, keyed by :func:`chat_session_id`) unless already recorded; a history
        that no longer matches the recorded turns (edited) starts its session afresh.

        Raises PayloadTooLargeError / InvalidInputError from :func:`history_turns`.
        """
        turns, last = history_turns(messages, self.config)
        if not turns:
            return "", last
        sid = chat_session_id(owner, collection, turns[0][0], user_id)
        with self._lock:
            try:
                state = self.sessions.get("session", sid, owner, collection)
            except ArtifactNotFoundError:
                state = None
            recorded = [(t.question, t.answer) for t in state.turns] if state else []
            have = state.turn_count if state else 0
            # The recorded (unfolded) turns must be the history's turns [folded, have).
            if state is None or have > len(turns) or recorded != [
                    tuple(t) for t in turns[state.folded:have]]:
                if state is not None:
                    self.sessions.delete("session", sid, owner)
                self.sessions.create(collection, owner, user_id, session_id=sid)
                have = 0
            for q, a in turns[have:]:
                self.record(collection, owner, sid, q, a, [])
        return sid, last
