"""The memory object of conversations: a compressed KV memory on the collection's memory model, loaded from and
bounded into the files of :class:`~memorag_core.query.sessions.store.SessionStore`.

Bounds: a session keeps at most ``max_turns`` turns and ``max_bytes`` of K/V; beyond either, the oldest turns are
**folded away** (:func:`fold_oldest`): the state records how many KV entries each turn added, so those entries are
cut out of the exported tensors by the memory's own :meth:`~memorag_core.memory.Memory.drop_entries` (later keys
re-rotated onto the freed positions); nothing is re-read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError, InvalidInputError, MemoryNotReadyError
from memorag_core.query.sessions.ids import user_tag
from memorag_core.query.sessions.state import ConversationState, Turn
from memorag_core.query.sessions.store import SessionStore
from memorag_core.query.sessions.text import turn_text, user_text

logger = logging.getLogger("memorag_core.query.sessions")


def fold_oldest(memory, tensors, state: ConversationState, n_turns: int):
    """Remove the oldest ``n_turns`` turns from ``tensors`` (exported by ``memory``) without re-reading anything.

    The turns' entries sit right after the preamble (``state.prefix_entries``), in turn order; they are cut with
    :meth:`~memorag_core.memory.Memory.drop_entries`. Updates ``state.turns`` / ``state.folded``; returns the new
    tensors. Raises CorruptArtifactError when the memory holds fewer entries than the state records.
    """
    n_turns = min(n_turns, len(state.turns))
    if n_turns <= 0:
        return tensors
    drop = sum(t.entries for t in state.turns[:n_turns])
    raw = sum(t.raw_tokens for t in state.turns[:n_turns])
    try:
        tensors = memory.drop_entries(tensors, state.prefix_entries, drop, raw_tokens=raw)
    except CorruptArtifactError as exc:
        raise CorruptArtifactError(f"{state.kind} memory: {exc} (its state records {state.prefix_entries} + "
                                   f"{drop})") from exc
    state.turns = state.turns[n_turns:]
    state.folded += n_turns
    return tensors


class ConversationMemories:
    """The memory half of :class:`~memorag_core.query.sessions.Conversations`.

    Args:
        sessions: the :class:`SessionStore`.
        base_memory: ``collection name -> Memory`` of the collection's memory model (e.g. the query engine's
            ``ClueWriter.memory_for``); the conversation memory shares its weights and tokenizer.
    """

    def __init__(self, sessions: SessionStore, base_memory: Callable[[str], Any]) -> None:
        self.sessions = sessions
        self.config = sessions.config
        self._base_memory = base_memory
        self._memories: dict[int, Any] = {}
        self._lock = threading.RLock()  # one conversation memory in the model at a time; deletes take it too
        self._last_sweep = 0.0

    # -- the memory object -----------------------------------------------------------------------------------
    def memory_for(self, collection: str):
        """A compressed KV memory on the collection's memory model (weights shared), this config's compression.

        Raises InvalidInputError for a beacon collection (its model runs its own remote code).
        """
        from memorag_core.memory import MemoryConfig, build_memory

        base = self._base_memory(collection)
        if base.config.kind == "beacon":
            raise InvalidInputError(f"collection {collection!r} uses a beacon memory model: sessions need a "
                                    "compressed_kv, full_kv or gist collection")
        key = id(base.model)
        mem = self._memories.get(key)
        if mem is None:
            cfg = MemoryConfig(kind="compressed_kv", model=base.config.model, ratio=self.config.ratio,
                               window=self.config.window, obs_window=min(base.config.obs_window, self.config.window),
                               positions="compact", language=base.config.language, load=base.config.load)
            mem = build_memory(cfg, model=base.model, tokenizer=base.tokenizer)
            self._memories[key] = mem
        return mem

    def load_into(self, memory, state: ConversationState) -> bool:
        """Import ``state``'s memory into ``memory``; False when it has none. A memory that no longer fits (a
        missing or damaged file, a collection republished with another model) is rebuilt from the state's
        turns, and that is logged: the only case where turns are read again."""
        if state.memory_sha256 is None:
            memory.reset()
            return False
        try:
            memory.import_tensors(self.sessions.read_memory(state, dtype=memory.model.dtype,
                                                            device=str(memory.model.device)))
            return True
        except (ArtifactNotFoundError, CorruptArtifactError) as exc:
            logger.warning("%s %s: memory unusable (%s); rebuilding it from its %d recorded turns", state.kind,
                           state.id if state.kind == "session" else user_tag(state.id), exc, len(state.turns))
            turns, state.turns = state.turns, []
            state.memory_sha256, state.prefix_entries = None, 0
            memory.reset()
            for t in turns:
                self.append(memory, state, t, self.text_of(state, t))
            return bool(state.turns)

    def text_of(self, state: ConversationState, t: Turn) -> str:
        if state.kind == "user":
            return user_text(state.collection, [t])
        return turn_text(t.n, t.question, t.answer, t.titles, self.config.max_answer_chars)

    def append(self, memory, state: ConversationState, turn: Turn, text: str) -> None:
        """Append ``text`` (one turn) to ``memory``; records the entries it added in ``turn``."""
        if memory.is_empty:
            who = "a user's earlier conversations" if state.kind == "user" else "a conversation"
            memory.append(f"This is a record of {who} with an assistant about the collection {state.collection}.\n\n")
            state.prefix_entries = memory.stats.entries
        before_e, before_t = memory.stats.entries, memory.stats.raw_tokens
        memory.append(text)
        turn.entries = memory.stats.entries - before_e
        turn.raw_tokens = memory.stats.raw_tokens - before_t
        state.turns.append(turn)

    def bound(self, memory, state: ConversationState, max_turns: int, max_bytes: int):
        """Export ``memory``, folding the oldest turns while over ``max_turns`` or ``max_bytes``."""
        tensors = memory.export()
        over = max(0, len(state.turns) - max_turns)
        if over:
            tensors = fold_oldest(memory, tensors, state, over)
        while len(state.turns) > 1 and tensors.nbytes > max_bytes:
            tensors = fold_oldest(memory, tensors, state, 1)
        return tensors

    @staticmethod
    def echo(memory, instructions: str, query: str) -> str:
        """The text a model may echo instead of answering: the instructions, the acknowledgement, the context
        prompt and the preamble (not the question: a standalone question may well contain all of its words)."""
        p = memory.prompts
        parts = [instructions.replace("{question}", " "), "This is a record of a conversation with an assistant "
                 "about the collection", "a user's earlier conversations"]
        if p is not None:
            parts += [p.ack, p.context.replace("{context}", " ")]
        return " \n ".join(parts)

    def point_records(self, memory, state: ConversationState, query: str) -> list[str]:
        """The user's own earlier records (what they asked or said) that ``query`` points at in their memory.

        The request is read after the user memory as a new user turn (one prefill, no decoding) and the attention
        its tokens pay to each memory entry is summed per record: a record's entries are the consecutive range it
        added (``Turn.entries``, kept exact by folding). Each (layer, head) is a distribution over entries;
        records are scored by their mean mass per entry, and at most ``user_pointed`` records scoring at least the
        records' mean are returned, best first. A small model's decoded recall is often generic ("this user
        asked about their preferences"); the pointer needs no generated text, so it carries the preference even
        then (tests/memorag_core/query/test_engine_sessions.py).
        """
        from memorag_core.memory.pointers import question_attention

        if self.config.user_pointed == 0 or not state.turns:
            return []
        try:
            mass = question_attention(memory, query)  # (layers, kv_heads, entries)
        except (InvalidInputError, MemoryNotReadyError) as exc:
            logger.info("user %s: no pointers (%s)", user_tag(state.id), exc)
            return []
        per_entry = (mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-12)).mean(dim=(0, 1))  # (entries,)
        scores, start = [], state.prefix_entries
        for t in state.turns:
            seg = per_entry[start:start + t.entries]
            scores.append(float(seg.mean()) if seg.numel() else 0.0)
            start += t.entries
        floor = sum(scores) / len(scores)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:self.config.user_pointed]
        return [" ".join(state.turns[i].question.split()) for i in order if scores[i] >= floor and scores[i] > 0]

    # the names the tests of the first layout used
    _append = append
    _load_into = load_into
