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

Storage (one fsspec root, the collection store's; atomic writes)::

    sessions/<session_id>/memory.safetensors    the session memory (memory file format, memorag_core.store)
    sessions/<session_id>/state.json           collection, owner, user id, turns, expiry, memory sha256
    users/<owner>/<user_id>/memory.safetensors  one user's memory, scoped to the API key that wrote it
    users/<owner>/<user_id>/state.json

``owner`` is :func:`owner_of` the request's API key (a SHA-256, never the key): another key gets "not found",
exactly as for a session that does not exist. A session is bound to one collection and one owner; its user
memory is scoped by owner too, so nothing a session or user memory holds can reach another collection's
queries (API keys open one collection each).

Bounds: a session keeps at most ``max_turns`` turns and ``max_bytes`` of K/V; beyond either, the oldest turns are
**folded away**: the state records how many KV entries each turn added, so the oldest turns' entries are sliced
out of the exported tensors and the later entries are re-rotated onto the freed positions (the compact-position
rule of :class:`~memorag_core.memory.CompressedKVMemory`); nothing is re-read. Sessions expire ``ttl_s`` after
their last turn (then 404, and :meth:`Conversations.sweep` folds what they revealed into the user memory and
deletes them). Concurrency: one process serializes turns of a session; two replicas writing the same session at
the same instant keep the last write (a conversation is one user's sequential turns).

The session memory uses the collection's memory model (shared weights, its own state) with
:class:`SessionConfig`'s compression; a beacon collection (whose model runs its own remote code) is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memorag_core.errors import (
    ArtifactNotFoundError,
    CorruptArtifactError,
    InvalidInputError,
    MemoryNotReadyError,
    PayloadTooLargeError,
)

logger = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
STATE_SCHEMA = 1

#: the instruction that turns a follow-up into a standalone question (``{question}`` is the follow-up). Short and
#: direct: small memory models (SmolLM2-135M) echo long instructions back instead of following them.
STANDALONE_PROMPT = (
    "Follow-up question: {question}\n\n"
    "Rewrite the follow-up question as one complete question that uses the name from the conversation instead "
    "of he, she, it, they or that. Write only the complete question."
)
#: the instruction that recalls what the follow-up refers to in the conversation
RECALL_PROMPT = (
    "Follow-up question: {question}\n\n"
    "Who or what in the conversation does the follow-up question refer to? Write only the names, one per line."
)
#: the instruction that recalls what a user's past sessions revealed (preferences, background, questions)
USER_PROMPT = (
    "New request from the same user: {question}\n\n"
    "What did this user say earlier about their preferences, background or interests that bears on the new "
    "request? Write only those facts, one per line."
)


def check_session_id(session_id: Any) -> str:
    """``session_id`` if it is 8-64 characters of ``[A-Za-z0-9_-]``; else InvalidInputError naming the rule."""
    if not isinstance(session_id, str) or not _ID_RE.match(session_id):
        raise InvalidInputError(f"session id {session_id!r} must be 8-64 characters of letters, digits, '_' or '-'")
    return session_id


def check_user_id(user_id: Any) -> str:
    """``user_id`` if it is 1-64 characters of ``[A-Za-z0-9_.@-]`` starting with a letter or digit."""
    if not isinstance(user_id, str) or not _USER_RE.match(user_id):
        raise InvalidInputError(f"user id {user_id!r} must be 1-64 characters of letters, digits, '_', '.', '@' "
                                "or '-', starting with a letter or digit")
    return user_id


def owner_of(api_key: str | None, collection: str) -> str:
    """The owner token of sessions and user memories: SHA-256 of the API key (never stored in clear); without
    authentication, of the collection name (so that even then one collection's sessions stay its own)."""
    raw = f"key:{api_key}" if api_key else f"anonymous:{collection}"
    return hashlib.sha256(raw.encode()).hexdigest()


def new_session_id() -> str:
    """A fresh random session id (22 url-safe characters, 128 bits)."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class SessionConfig:
    """Bounds and compression of session and user memories.

    Attributes:
        ttl_s: a session expires this many seconds after its last turn.
        max_turns: turns a session memory keeps; older ones are folded away.
        max_bytes: K/V bytes a session memory may hold; the oldest turns are folded away beyond it.
        ratio, window: compression of the conversation (see :class:`~memorag_core.memory.MemoryConfig`).
        max_answer_chars: an answer is cut to this many characters in the memory (the state keeps it whole).
        max_history_messages, max_history_chars: largest chat history accepted (beyond: PayloadTooLargeError).
        standalone_tokens, recall_tokens: most tokens of the standalone question / of the recalls.
        user_every: a user memory grows every this many session turns (and when a session ends).
        user_max_entries: records a user memory keeps (oldest folded away); user_max_bytes: its K/V bytes.
        user_ttl_s: a user memory untouched this long is deleted.
        user_pointed: most user records pointed at per request (0: none; see :meth:`Conversations.point_records`).
        storage_dtype: K/V storage (None keeps the model's dtype; ``int8``/``fp8`` quarter the bytes).
    """

    ttl_s: float = 24 * 3600.0
    max_turns: int = 8
    max_bytes: int = 64 << 20
    ratio: int = 2
    window: int = 256
    max_answer_chars: int = 600
    max_history_messages: int = 64
    max_history_chars: int = 32_000
    standalone_tokens: int = 40
    recall_tokens: int = 48
    user_every: int = 4
    user_max_entries: int = 32
    user_max_bytes: int = 64 << 20
    user_ttl_s: float = 365 * 24 * 3600.0
    user_pointed: int = 2
    storage_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("ttl_s", "user_ttl_s"):
            if getattr(self, name) <= 0:
                raise InvalidInputError(f"session {name} must be > 0")
        for name in ("max_turns", "max_bytes", "ratio", "window", "max_answer_chars", "max_history_messages",
                     "max_history_chars", "standalone_tokens", "recall_tokens", "user_every", "user_max_entries",
                     "user_max_bytes", "user_pointed"):
            v, low = getattr(self, name), 0 if name == "user_pointed" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InvalidInputError(f"session {name} must be an integer >= {low}, got {v!r}")


@dataclass
class Turn:
    """One recorded turn (or, in a user memory, one record).

    Attributes:
        question: what the user asked. answer: what was answered (whole; the memory holds a cut).
        titles: doc ids of the cited evidence. standalone: the standalone question written for it (if any).
        n: its number in the session (1-based).
        entries: KV entries (per layer and head) this turn added to the memory; raw_tokens: tokens it read.
        at: UNIX time of the turn.
    """

    question: str
    answer: str = ""
    titles: list[str] = field(default_factory=list)
    standalone: str | None = None
    n: int = 0
    entries: int = 0
    raw_tokens: int = 0
    at: float = 0.0


@dataclass
class ConversationState:
    """The JSON state beside a session (or user) memory.

    Attributes:
        id: session id (or user id). kind: ``session`` or ``user``. collection: the collection it is bound to.
        owner: :func:`owner_of` the creating key. user_id: sessions: the user whose memory they feed.
        created_at, updated_at, expires_at: UNIX times. turns: the turns the memory holds, oldest first.
        folded: turns folded away so far. turn_count: turns ever recorded. prefix_entries: entries of the
        memory's never-folded preamble. user_flushed: sessions: turns (of ``turn_count``) already given to the
        user memory. memory_sha256: checksum of the memory file this state goes with (None: no memory yet).
    """

    id: str
    kind: str
    collection: str
    owner: str
    user_id: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    expires_at: float = 0.0
    turns: list[Turn] = field(default_factory=list)
    folded: int = 0
    turn_count: int = 0
    prefix_entries: int = 0
    user_flushed: int = 0
    memory_sha256: str | None = None
    schema: int = STATE_SCHEMA

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes, what: str) -> "ConversationState":
        try:
            d = json.loads(data)
            if int(d.get("schema", 1)) > STATE_SCHEMA:
                raise CorruptArtifactError(f"{what}: state schema {d['schema']} is newer than this code's "
                                           f"{STATE_SCHEMA}")
            d["turns"] = [Turn(**t) for t in d.get("turns", [])]
            return cls(**d)
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptArtifactError(f"{what}: not a valid conversation state ({exc})") from exc

    def public(self) -> dict:
        """What ``GET /v1/sessions/{id}`` shows (no owner hash, no memory internals)."""
        return {"id": self.id, "kind": self.kind, "collection": self.collection, "user_id": self.user_id,
                "created_at": self.created_at, "updated_at": self.updated_at, "expires_at": self.expires_at,
                "turn_count": self.turn_count, "folded": self.folded,
                "turns": [{"question": t.question, "answer": t.answer, "titles": t.titles,
                           "standalone": t.standalone, "at": t.at} for t in self.turns]}


@dataclass
class SessionContext:
    """What the session and user memories contribute to one query (see :meth:`Conversations.prepare`).

    Attributes:
        session_id, user_id: whose memories were read (None when not given).
        turn: number of this turn in the session (1-based). standalone: the rewritten question (None without
        earlier turns or when the rewrite restates the question). session_recalls, user_recalls: recalled lines.
        user_pointed: the user's own earlier records that the request's attention over the user memory points at.
        seconds: wall time spent on the memories.
    """

    session_id: str | None = None
    user_id: str | None = None
    turn: int = 1
    standalone: str | None = None
    session_recalls: list[str] = field(default_factory=list)
    user_recalls: list[str] = field(default_factory=list)
    user_pointed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def queries(self) -> list[tuple[str, str]]:
        """(source, text) retrieval queries: the standalone question and recalls (``session``), then the pointed
        user records (``user``) and the user memory's decoded recalls (``user_recall``)."""
        out = [("session", self.standalone)] if self.standalone else []
        out += [("session", s) for s in self.session_recalls]
        out += [("user", s) for s in self.user_pointed]
        out += [("user_recall", s) for s in self.user_recalls if s not in self.user_pointed]
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def chat_session_id(owner: str, collection: str, first_question: str) -> str:
    """Deterministic session id of a chat history: the same conversation maps to the same session, so a
    growing history only appends its new turns (no re-reading)."""
    digest = hashlib.sha256(f"{owner}\x00{collection}\x00{first_question}".encode()).hexdigest()
    return f"chat-{digest[:40]}"


class SessionStore:
    """Session and user states and memory files under a store root (no model here: pure storage).

    Args:
        store: a :class:`~memorag_core.store.CollectionStore` or its root URL.
        storage_options: fsspec options when ``store`` is a URL.
        config: bounds (TTLs are applied on read).
        clock: seconds since the epoch (tests pass a fake clock).
    """

    def __init__(self, store, storage_options: dict | None = None, *, config: SessionConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        from memorag_core.store import CollectionStore

        self.store = store if isinstance(store, CollectionStore) else CollectionStore(store, storage_options)
        self.config = config or SessionConfig()
        self.clock = clock

    # -- paths -----------------------------------------------------------------------------------------------
    def _dir(self, kind: str, ident: str, owner: str) -> str:
        if kind == "session":
            return self.store._p("sessions", check_session_id(ident))
        if not re.fullmatch(r"[0-9a-f]{64}", owner or ""):
            raise InvalidInputError("owner must be a SHA-256 hex digest (see owner_of)")
        return self.store._p("users", owner[:32], check_user_id(ident))

    def _read(self, path: str) -> bytes | None:
        from memorag_core.store import fs as sfs

        try:
            return sfs.with_retries(lambda: self.store.fs.cat_file(path), what=f"read {self.store._u(path)}")
        except ArtifactNotFoundError:
            return None

    # -- states ----------------------------------------------------------------------------------------------
    def create(self, collection: str, owner: str, user_id: str | None = None,
               session_id: str | None = None) -> ConversationState:
        """A new empty session of ``collection`` owned by ``owner`` (optionally feeding ``user_id``'s memory).

        Raises InvalidInputError for a bad id, or when ``session_id`` exists already.
        """
        from memorag_core.store.collection import _check_collection

        _check_collection(collection)
        sid = check_session_id(session_id) if session_id else new_session_id()
        if user_id is not None:
            check_user_id(user_id)
        if session_id and self._read(self._state_path("session", sid, owner)) is not None:
            raise InvalidInputError(f"session {sid!r} exists already")
        now = self.clock()
        state = ConversationState(sid, "session", collection, owner, user_id, now, now, now + self.config.ttl_s)
        self.write(state, None)
        return state

    def _state_path(self, kind: str, ident: str, owner: str) -> str:
        from memorag_core.store import fs as sfs

        return sfs.join(self._dir(kind, ident, owner), "state.json")

    def _memory_path(self, kind: str, ident: str, owner: str) -> str:
        from memorag_core.store import fs as sfs

        return sfs.join(self._dir(kind, ident, owner), "memory.safetensors")

    def get(self, kind: str, ident: str, owner: str, collection: str | None = None, *,
            allow_expired: bool = False) -> ConversationState | None:
        """The state of a session / user memory visible to ``owner`` (and bound to ``collection`` when given).

        Returns None for a user memory that does not exist. Raises ArtifactNotFoundError for a session that does
        not exist, has expired, belongs to another key or another collection (one message for all four, so that
        a caller learns nothing about sessions that are not theirs); InvalidInputError for a malformed id.
        """
        path = self._state_path(kind, ident, owner)
        data = self._read(path)
        what = f"{kind} {ident!r}"
        if data is None:
            if kind == "user":
                return None
            raise ArtifactNotFoundError(f"session {ident!r} does not exist or has expired")
        state = ConversationState.from_json(data, self.store._u(path))
        if state.owner != owner or (collection is not None and state.collection != collection):
            if kind == "user":
                return None
            raise ArtifactNotFoundError(f"session {ident!r} does not exist or has expired")
        if not allow_expired and state.expires_at <= self.clock():
            if kind == "user":
                logger.info("%s expired; starting it afresh", what)
                return None
            raise ArtifactNotFoundError(f"session {ident!r} does not exist or has expired")
        return state

    def read_memory(self, state: ConversationState, dtype=None, device: str = "cpu"):
        """The memory tensors of ``state`` (None when it has none yet). A memory file whose checksum differs
        from the state's (a crash between the two writes) raises CorruptArtifactError."""
        from memorag_core.store.memory_file import load_memory

        if state.memory_sha256 is None:
            return None
        url = self.store._u(self._memory_path(state.kind, state.id, state.owner))
        return load_memory(url, expected_sha256=state.memory_sha256, dtype=dtype, device=device,
                           storage_options=self.store.storage_options)

    def write(self, state: ConversationState, tensors) -> None:
        """Write the memory (when given) and then the state that names its checksum; both atomic."""
        from memorag_core.store import fs as sfs
        from memorag_core.store.memory_file import encode_memory

        if tensors is not None:
            data = encode_memory(tensors, self.config.storage_dtype)
            sfs.write_atomic(self.store.fs, self._memory_path(state.kind, state.id, state.owner), data)
            state.memory_sha256 = sfs.sha256_hex(data)
        sfs.write_atomic(self.store.fs, self._state_path(state.kind, state.id, state.owner), state.to_json())

    def delete(self, kind: str, ident: str, owner: str) -> ConversationState:
        """Delete a session (or user memory) of ``owner``; returns its last state (expired ones included).

        Raises ArtifactNotFoundError when there is none visible to ``owner``.
        """
        from memorag_core.store import fs as sfs

        state = self.get(kind, ident, owner, allow_expired=True)
        if state is None:
            raise ArtifactNotFoundError(f"user {ident!r} has no memory")
        base = self._dir(kind, ident, owner)
        sfs.with_retries(lambda: self.store.fs.rm(base, recursive=True), what=f"delete {self.store._u(base)}")
        logger.info("deleted %s %s", kind, ident)
        return state

    def expired_sessions(self) -> list[ConversationState]:
        """States of expired sessions (for :meth:`Conversations.sweep`)."""
        from memorag_core.store import fs as sfs

        base = self.store._p("sessions")
        try:
            dirs = sfs.with_retries(lambda: self.store.fs.ls(base, detail=False), what=f"list {self.store._u(base)}")
        except ArtifactNotFoundError:
            return []
        out, now = [], self.clock()
        for d in dirs:
            data = self._read(sfs.join(d, "state.json"))
            if data is None:
                continue
            try:
                s = ConversationState.from_json(data, d)
            except CorruptArtifactError as exc:
                logger.warning("skipping %s: %s", d, exc)
                continue
            if s.expires_at <= now:
                out.append(s)
        return out


def _rerotate(memory, keys, delta: int, layer_idx: int):
    """Keys ``(kv_heads, n, d)`` moved by ``delta`` rotary positions with the memory's own re-rotation."""
    import torch

    fn = getattr(memory, "_rerotate", None)
    if fn is None or delta == 0 or keys.shape[1] == 0:
        return keys
    heads, n, _ = keys.shape
    d = torch.full((1, heads, n), int(delta), dtype=torch.long, device=keys.device)  # (1, kv_heads, n)
    return fn(keys[None], d, layer_idx=layer_idx)[0]  # (kv_heads, n, d)


def fold_oldest(memory, tensors, state: ConversationState, n_turns: int):
    """Remove the oldest ``n_turns`` turns from ``tensors`` (exported by ``memory``) without re-reading anything.

    The turns' entries sit right after the preamble (``state.prefix_entries``), in turn order: they are sliced
    out of every layer's K and V ``(kv_heads, entries, d)``, the later keys are re-rotated back by the removed
    count (positions stay compact and inside the model's range), and the header's counts follow. Updates
    ``state.turns`` / ``state.folded``; returns the new tensors.
    """
    import torch

    from memorag_core.store.memory_file import MemoryTensors

    n_turns = min(n_turns, len(state.turns))
    if n_turns <= 0:
        return tensors
    drop = sum(t.entries for t in state.turns[:n_turns])
    raw = sum(t.raw_tokens for t in state.turns[:n_turns])
    p = state.prefix_entries
    keys, values = [], []
    for i, (k, v) in enumerate(zip(tensors.keys, tensors.values)):  # each (kv_heads, entries, d)
        if k.shape[1] < p + drop:
            raise CorruptArtifactError(f"{state.kind} {state.id}: memory holds {k.shape[1]} entries, fewer than "
                                       f"the {p} + {drop} its state records")
        rest_k = _rerotate(memory, k[:, p + drop:], -drop, i)  # (kv_heads, entries - p - drop, d)
        keys.append(torch.cat([k[:, :p], rest_k], dim=1))  # (kv_heads, entries - drop, d)
        values.append(torch.cat([v[:, :p], v[:, p + drop:]], dim=1))  # (kv_heads, entries - drop, d)
    header = dict(tensors.header)
    header["entries"] = int(header["entries"]) - drop
    if "next_position" in header and getattr(memory, "_rerotate", None) is not None:
        header["next_position"] = int(header["next_position"]) - drop
    header["raw_tokens"] = max(0, int(header.get("raw_tokens", 0)) - raw)
    stats = dict(header.get("stats") or {})
    stats["entries"] = header["entries"]
    stats["raw_tokens"] = max(0, int(stats.get("raw_tokens", 0)) - raw)
    stats["nbytes"] = sum(t.numel() * t.element_size() for t in keys + values)
    header["stats"] = stats
    state.turns = state.turns[n_turns:]
    state.folded += n_turns
    return MemoryTensors(keys=keys, values=values, header=header, extra=dict(tensors.extra))


def turn_text(n: int, question: str, answer: str, titles: list[str], max_answer_chars: int) -> str:
    """The text one session turn adds to the memory."""
    answer = " ".join(answer.split())
    if len(answer) > max_answer_chars:
        answer = answer[:max_answer_chars].rsplit(" ", 1)[0] + " ..."
    lines = [f"Turn {n}. The user asked: {' '.join(question.split())}", f"The assistant answered: {answer or '-'}"]
    if titles:
        lines.append("Sources cited: " + "; ".join(dict.fromkeys(titles)))
    return "\n".join(lines) + "\n\n"


def user_text(collection: str, turns: list[Turn]) -> str:
    """The text one flush of session turns adds to a user memory: what the user asked and read."""
    asked = " | ".join(" ".join(t.question.split()) for t in turns)
    titles = list(dict.fromkeys(x for t in turns for x in t.titles))
    line = f"In a conversation about {collection}, the user asked or said: {asked}"
    if titles:
        line += "\nThey read about: " + "; ".join(titles)
    return line + "\n\n"


_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|[A-Za-z][.)](?=\s))\s*")
_LABEL = re.compile(r"^(?:complete|standalone|rewritten)? ?question\s*:\s*|^names?\s*:\s*", re.IGNORECASE)


def _lines(text: str, limit: int = 6, echo_of: str = "") -> list[str]:
    """Generated text -> distinct non-empty lines (bullets, numbering and "Question:" labels stripped), at most
    ``limit``. A line that only echoes the prompt (``echo_of``: instruction, acknowledgement, context prompt; small
    models repeat them, sometimes paraphrased) is dropped: a piece of it, or 80% of its words from it.

    Short lines are kept: a recalled name ("Shirley Temple") is the most useful recall there is.
    """
    from memorag_core.retrieval.fusion import normalize_query

    echo = normalize_query(echo_of)
    echo_words = set(echo.split())
    out: list[str] = []
    for line in text.splitlines():
        line = _LABEL.sub("", _BULLET.sub("", line).strip()).strip().strip('"').strip()
        key = normalize_query(line)
        words = key.split()
        # an echo: the line is a piece of the prompt, or (paraphrased) at least 80% of its words come from it
        echoed = bool(echo and key) and (key in echo or sum(w in echo_words for w in words) >= 0.8 * len(words))
        if not re.search(r"\w\w", line) or line in out or echoed:
            continue
        out.append(line)
    return out[:limit]


class Conversations:
    """Session and user memories for the query engine: read them for a query, grow them after the answer.

    Args:
        sessions: the :class:`SessionStore`.
        base_memory: ``collection name -> Memory`` of the collection's memory model (e.g. the query engine's
            ``ClueWriter.memory_for``); the session memory shares its weights and tokenizer.
    """

    def __init__(self, sessions: SessionStore, base_memory: Callable[[str], Any]) -> None:
        self.sessions = sessions
        self.config = sessions.config
        self._base_memory = base_memory
        self._memories: dict[int, Any] = {}
        self._lock = threading.RLock()  # one conversation memory in the model at a time
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

    def _load_into(self, memory, state: ConversationState) -> bool:
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
                           state.id, exc, len(state.turns))
            turns, state.turns = state.turns, []
            state.memory_sha256, state.prefix_entries = None, 0
            memory.reset()
            for t in turns:
                self._append(memory, state, t, self._text_of(state, t))
            return bool(state.turns)

    def _text_of(self, state: ConversationState, t: Turn) -> str:
        if state.kind == "user":
            return user_text(state.collection, [t])
        return turn_text(t.n, t.question, t.answer, t.titles, self.config.max_answer_chars)

    def _append(self, memory, state: ConversationState, turn: Turn, text: str) -> None:
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

    def _bound(self, memory, state: ConversationState, max_turns: int, max_bytes: int):
        """Export ``memory``, folding the oldest turns while over ``max_turns`` or ``max_bytes``."""
        tensors = memory.export()
        over = max(0, len(state.turns) - max_turns)
        if over:
            tensors = fold_oldest(memory, tensors, state, over)
        while len(state.turns) > 1 and tensors.nbytes > max_bytes:
            tensors = fold_oldest(memory, tensors, state, 1)
        return tensors

    @staticmethod
    def _echo(memory, instructions: str, query: str) -> str:
        """The text a model may echo instead of answering: the instructions, the acknowledgement, the context
        prompt and the preamble (not the question: a standalone question may well contain all of its words)."""
        p = memory.prompts
        parts = [instructions.replace("{question}", " "), "This is a record of a conversation with an assistant "
                 "about the collection", "a user's earlier conversations"]
        if p is not None:
            parts += [p.ack, p.context.replace("{context}", " ")]
        return " \n ".join(parts)

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
                if self._load_into(memory, state):
                    standalone, recalls = memory.generate([STANDALONE_PROMPT, RECALL_PROMPT], query,
                                                          max_new_tokens=max(self.config.standalone_tokens,
                                                                             self.config.recall_tokens))
                    from memorag_core.retrieval.fusion import normalize_query

                    echo = self._echo(memory, STANDALONE_PROMPT + " " + RECALL_PROMPT, query)
                    line = (_lines(standalone, 1, echo) or [""])[0]
                    ctx.standalone = line if line and normalize_query(line) != normalize_query(query) else None
                    ctx.session_recalls = _lines(recalls, echo_of=echo)
            if user_id is not None:
                ustate = self.sessions.get("user", user_id, owner, collection)
                if ustate is not None and ustate.turns:
                    memory = memory or self.memory_for(collection)
                    if self._load_into(memory, ustate):
                        ctx.user_pointed = self.point_records(memory, ustate, query)
                        ctx.user_recalls = _lines(memory.generate(USER_PROMPT, query,
                                                                  max_new_tokens=self.config.recall_tokens)[0],
                                                  echo_of=self._echo(memory, USER_PROMPT, query))
        ctx.seconds = time.perf_counter() - t0
        return ctx

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
            logger.info("user %s: no pointers (%s)", state.id, exc)
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

    def record(self, collection: str, owner: str, session_id: str, question: str, answer: str,
               titles: list[str], standalone: str | None = None) -> ConversationState:
        """Append one turn to the session memory (fold, save); every ``user_every`` turns, feed the user memory.

        Raises ArtifactNotFoundError as :meth:`prepare` does.
        """
        with self._lock:
            state = self.sessions.get("session", check_session_id(session_id), owner, collection)
            memory = self.memory_for(collection)
            self._load_into(memory, state)
            state.turn_count += 1
            turn = Turn(question, answer, list(titles), standalone, n=state.turn_count, at=self.sessions.clock())
            self._append(memory, state, turn, turn_text(state.turn_count, question, answer, titles,
                                                        self.config.max_answer_chars))
            tensors = self._bound(memory, state, self.config.max_turns, self.config.max_bytes)
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
        sid = chat_session_id(owner, collection, turns[0][0])
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

    # -- ends ------------------------------------------------------------------------------------------------
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
        self._load_into(memory, ustate)
        record = Turn(" | ".join(t.question for t in turns), "", list(dict.fromkeys(x for t in turns
                                                                                     for x in t.titles)), at=now)
        ustate.turn_count += 1
        self._append(memory, ustate, record, user_text(state.collection, turns))
        tensors = self._bound(memory, ustate, self.config.user_max_entries, self.config.user_max_bytes)
        ustate.updated_at, ustate.expires_at = now, now + self.config.user_ttl_s
        self.sessions.write(ustate, tensors)
        state.user_flushed = state.turn_count
        self.sessions.write(state, None)
        logger.info("user %s: memory grew by %d turns of session %s", state.user_id, len(turns), state.id)

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

    def sweep(self, min_interval_s: float = 60.0) -> int:
        """End every expired session (user memories grow from them); at most once per ``min_interval_s``.
        Returns how many were ended."""
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
        return n
