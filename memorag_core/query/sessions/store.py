"""Where conversation memories live in the store, and nothing else (no model here).

Layout (under the collection store's root; every write atomic)::

    tenants/<owner32>/sessions/<session_id>/state.json         collection, owner, user id, turns, expiry, sha256
    tenants/<owner32>/sessions/<session_id>/memory.safetensors  the session memory (memorag_core.store format)
    tenants/<owner32>/users/<user_key>/state.json               one user's lifelong memory: state and file
    tenants/<owner32>/users/<user_key>/memory.safetensors
    tenants/<owner32>/users/<user_key>/sessions/<session_id>    an empty marker per session that feeds this user

``owner32`` is the first half of the owner token (:mod:`~memorag_core.query.sessions.ids`), ``user_key`` a hash
of owner and user id: no path names a user. Everything one owner holds sits under one folder (quotas are one
listing), and everything of one user is reachable from the user's folder (deletion follows the markers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError, InvalidInputError, QuotaExceededError
from memorag_core.query.sessions.ids import (
    check_owner,
    check_session_id,
    check_user_id,
    new_session_id,
    user_key,
    user_tag,
)
from memorag_core.query.sessions.state import ConversationState, SessionConfig

logger = logging.getLogger("memorag_core.query.sessions")


class SessionStore:
    """Session and user states and memory files under a store root.

    Args:
        store: a :class:`~memorag_core.store.CollectionStore` or its root URL.
        storage_options: fsspec options when ``store`` is a URL.
        config: bounds and quotas (TTLs are applied on read).
        clock: seconds since the epoch (tests pass a fake clock).
        cache_bytes: memory files kept in process after a write or read (by checksum), so that a turn reads its
            session memory from the store at most once (prepare, then record).
    """

    def __init__(self, store, storage_options: dict | None = None, *, config: SessionConfig | None = None,
                 clock: Callable[[], float] = time.time, cache_bytes: int = 256 << 20) -> None:
        from memorag_core.query.clues import ByteLRU
        from memorag_core.store import CollectionStore

        self.store = store if isinstance(store, CollectionStore) else CollectionStore(store, storage_options)
        self.config = config or SessionConfig()
        self.clock = clock
        self.files = ByteLRU(cache_bytes)
        self.memory_reads = 0

    # -- paths -----------------------------------------------------------------------------------------------
    def tenant_dir(self, owner: str) -> str:
        return self.store._p("tenants", check_owner(owner)[:32])

    def _dir(self, kind: str, ident: str, owner: str) -> str:
        from memorag_core.store import fs as sfs

        if kind == "session":
            return sfs.join(self.tenant_dir(owner), "sessions", check_session_id(ident))
        return sfs.join(self.tenant_dir(owner), "users", user_key(owner, ident))

    def _file(self, kind: str, ident: str, owner: str, name: str) -> str:
        from memorag_core.store import fs as sfs

        return sfs.join(self._dir(kind, ident, owner), name)

    def _markers(self, owner: str, user_id: str) -> str:
        from memorag_core.store import fs as sfs

        return sfs.join(self._dir("user", user_id, owner), "sessions")

    def _marker(self, owner: str, user_id: str, session_id: str) -> str:
        from memorag_core.store import fs as sfs

        return sfs.join(self._markers(owner, user_id), check_session_id(session_id))

    def _read(self, path: str) -> bytes | None:
        from memorag_core.store import fs as sfs

        try:
            return sfs.with_retries(lambda: self.store.fs.cat_file(path), what=f"read {self.store._u(path)}")
        except ArtifactNotFoundError:
            return None

    def _ls(self, path: str) -> list[str]:
        from memorag_core.store import fs as sfs

        try:
            return sfs.with_retries(lambda: self.store.fs.ls(path, detail=False), what=f"list {self.store._u(path)}")
        except (ArtifactNotFoundError, FileNotFoundError):
            return []

    def _rm(self, path: str) -> None:
        from memorag_core.store import fs as sfs

        try:
            sfs.with_retries(lambda: self.store.fs.rm(path, recursive=True), what=f"delete {self.store._u(path)}")
        except (ArtifactNotFoundError, FileNotFoundError):
            pass

    # -- states ----------------------------------------------------------------------------------------------
    def create(self, collection: str, owner: str, user_id: str | None = None,
               session_id: str | None = None) -> ConversationState:
        """A new empty session of ``collection`` owned by ``owner`` (optionally feeding ``user_id``'s memory).

        Raises InvalidInputError for a bad id or when ``session_id`` exists already; QuotaExceededError when
        ``owner`` holds ``max_sessions_per_owner`` sessions or ``max_bytes_per_owner`` bytes.
        """
        from memorag_core.store import fs as sfs
        from memorag_core.store.collection import _check_collection

        _check_collection(collection)
        sid = check_session_id(session_id) if session_id else new_session_id()
        if user_id is not None:
            check_user_id(user_id)
        if session_id and self._read(self._file("session", sid, owner, "state.json")) is not None:
            raise InvalidInputError(f"session {sid!r} exists already")
        self.check_quota(owner)
        now = self.clock()
        state = ConversationState(sid, "session", collection, owner, user_id, now, now, now + self.config.ttl_s)
        if user_id is not None:  # the marker first: a session that carries a user id is always found from it
            sfs.write_atomic(self.store.fs, self._marker(owner, user_id, sid), b"")
        self.write(state, None)
        return state

    def usage(self, owner: str) -> tuple[int, int]:
        """``(sessions, bytes)`` that ``owner`` holds (one recursive listing of its folder)."""
        base = self.tenant_dir(owner)
        try:
            sizes = self.store.fs.find(base, detail=True)
        except (FileNotFoundError, ArtifactNotFoundError):
            return 0, 0
        rel = [p[len(base):].lstrip("/") for p in sizes]  # sessions/<sid>/..., users/<key>/...
        sessions = {r.split("/")[1] for r in rel if r.startswith("sessions/") and r.count("/") >= 2}
        return len(sessions), sum(int(d.get("size") or 0) for d in sizes.values())

    def check_quota(self, owner: str) -> None:
        """Raise QuotaExceededError when ``owner`` may not open another session."""
        n, nbytes = self.usage(owner)
        cfg = self.config
        if n >= cfg.max_sessions_per_owner:
            raise QuotaExceededError(f"this API key's tenant holds {n} sessions, its quota is "
                                     f"{cfg.max_sessions_per_owner}: end sessions (DELETE /v1/sessions/{{id}}) or "
                                     "wait for them to expire")
        if nbytes >= cfg.max_bytes_per_owner:
            raise QuotaExceededError(f"this API key's tenant stores {nbytes} bytes of conversation memories, its "
                                     f"quota is {cfg.max_bytes_per_owner}: end sessions or delete user memories")

    def get(self, kind: str, ident: str, owner: str, collection: str | None = None, *,
            allow_expired: bool = False) -> ConversationState | None:
        """The state of a session / user memory visible to ``owner`` (and bound to ``collection`` when given).

        Returns None for a user memory that does not exist (or expired). Raises ArtifactNotFoundError for a
        session that does not exist, has expired, belongs to another owner or another collection (one message
        for all four: a caller learns nothing about sessions that are not theirs); InvalidInputError for a
        malformed id.
        """
        path = self._file(kind, ident, owner, "state.json")
        data = self._read(path)
        missing = ArtifactNotFoundError(f"session {ident!r} does not exist or has expired")
        if data is None:
            if kind == "user":
                return None
            raise missing
        state = ConversationState.from_json(data, f"{kind} state")
        if state.owner != owner or (collection is not None and state.collection != collection):
            if kind == "user":
                return None
            raise missing
        if not allow_expired and state.expires_at <= self.clock():
            if kind == "user":
                return None
            raise missing
        return state

    def read_memory(self, state: ConversationState, dtype=None, device: str = "cpu"):
        """The memory tensors of ``state`` (None when it has none yet), from the in-process copy when its
        checksum matches (a file written or read by this process), else from the store. A file whose checksum
        differs from the state's (a crash between the two writes) raises CorruptArtifactError."""
        import hashlib

        import torch

        from memorag_core.store.memory_file import decode_memory

        if state.memory_sha256 is None:
            return None
        path = self._file(state.kind, state.id, state.owner, "memory.safetensors")
        key = (path, state.memory_sha256)
        data = self.files.get(key)
        if data is None:
            data = self._read(path)
            if data is None:
                raise ArtifactNotFoundError(f"{state.kind} memory file is missing")
            self.memory_reads += 1
            if hashlib.sha256(data).hexdigest() != state.memory_sha256:
                raise CorruptArtifactError(f"{state.kind} memory file does not match its state's checksum")
            self.files.put(key, data, len(data))
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # (nbytes,) uint8, a private copy
        return decode_memory(buf, f"{state.kind} memory", dtype=dtype, device=device)

    def write(self, state: ConversationState, tensors) -> None:
        """Write the memory (when given) and then the state that names its checksum; both atomic."""
        from memorag_core.store import fs as sfs
        from memorag_core.store.memory_file import encode_memory

        if tensors is not None:
            data = encode_memory(tensors, self.config.storage_dtype)
            path = self._file(state.kind, state.id, state.owner, "memory.safetensors")
            sfs.write_atomic(self.store.fs, path, data)
            state.memory_sha256 = sfs.sha256_hex(data)
            self.files.put((path, state.memory_sha256), data, len(data))
        sfs.write_atomic(self.store.fs, self._file(state.kind, state.id, state.owner, "state.json"), state.to_json())

    def delete(self, kind: str, ident: str, owner: str) -> ConversationState:
        """Delete a session (with its user marker) or a user memory of ``owner``; returns its last state.

        Raises ArtifactNotFoundError when there is none visible to ``owner``.
        """
        state = self.get(kind, ident, owner, allow_expired=True)
        if state is None:
            raise ArtifactNotFoundError("this user has no memory")
        if kind == "session" and state.user_id is not None:
            self._rm(self._marker(owner, state.user_id, ident))
        self._rm(self._dir(kind, ident, owner) if kind == "session" else
                 self._file(kind, ident, owner, "state.json"))
        if kind == "user":
            self._rm(self._file(kind, ident, owner, "memory.safetensors"))
        logger.info("deleted %s %s", kind, ident if kind == "session" else user_tag(ident))
        return state

    def delete_user(self, owner: str, user_id: str) -> dict:
        """Delete everything of ``owner``'s user ``user_id``: every session that carries the id (state, turns,
        memory file) and the user memory. Returns ``{"sessions": n, "records": m}``.

        Raises ArtifactNotFoundError when there is nothing of that user.
        """
        base = self._dir("user", user_id, owner)
        ustate = self.get("user", user_id, owner, allow_expired=True)
        sids = [p.rstrip("/").rsplit("/", 1)[-1] for p in self._ls(self._markers(owner, user_id))]
        if ustate is None and not sids and not self._ls(base):
            raise ArtifactNotFoundError("this user has no memory")
        for sid in sids:
            self._rm(self._dir("session", sid, owner))
        self._rm(base)
        logger.info("deleted user %s: memory and %d sessions", user_tag(user_id), len(sids))
        return {"sessions": len(sids), "records": ustate.turn_count if ustate else 0}

    def _states(self, pattern: str) -> list[ConversationState]:
        from memorag_core.store import fs as sfs

        try:
            paths = sfs.with_retries(lambda: self.store.fs.glob(pattern), what="list conversation states")
        except ArtifactNotFoundError:
            return []
        out = []
        for p in paths:
            data = self._read(p)
            if data is None:
                continue
            try:
                out.append(ConversationState.from_json(data, "state"))
            except CorruptArtifactError as exc:
                logger.warning("skipping a damaged conversation state: %s", exc)
        return out

    def expired_sessions(self) -> list[ConversationState]:
        """States of expired sessions of every owner (for :meth:`Conversations.sweep`)."""
        now = self.clock()
        return [s for s in self._states(self.store._p("tenants", "*", "sessions", "*", "state.json"))
                if s.expires_at <= now]

    def expired_users(self) -> list[ConversationState]:
        """States of user memories untouched for ``user_ttl_s`` (for :meth:`Conversations.sweep`)."""
        now = self.clock()
        return [s for s in self._states(self.store._p("tenants", "*", "users", "*", "state.json"))
                if s.expires_at <= now]
