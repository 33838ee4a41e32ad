"""The records of conversation memories: their bounds (:class:`SessionConfig`), turns, the JSON state beside each
memory file (:class:`ConversationState`) and what the memories contribute to one query (:class:`SessionContext`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from memorag_core.errors import CorruptArtifactError, InvalidInputError

STATE_SCHEMA = 1


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
        user_ttl_s: a user memory untouched this long is deleted (by :meth:`Conversations.sweep`).
        max_sessions_per_owner, max_bytes_per_owner: quotas of one owner (live sessions; bytes of its session and
        user files); a new session beyond either raises QuotaExceededError.
        sweep_every_s: the Serve memory worker ends expired sessions and deletes expired user memories this often,
        on a timer thread (never on the request path).
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
    max_sessions_per_owner: int = 1000
    max_bytes_per_owner: int = 4 << 30
    sweep_every_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("ttl_s", "user_ttl_s", "sweep_every_s"):
            if getattr(self, name) <= 0:
                raise InvalidInputError(f"session {name} must be > 0")
        for name in ("max_turns", "max_bytes", "ratio", "window", "max_answer_chars", "max_history_messages",
                     "max_history_chars", "standalone_tokens", "recall_tokens", "user_every", "user_max_entries",
                     "user_max_bytes", "user_pointed", "max_sessions_per_owner", "max_bytes_per_owner"):
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
