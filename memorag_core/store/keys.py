"""API keys per collection, stored hashed in the artifact store.

Layout (beside the collection's versions, under the same fsspec root)::

    collections/<name>/keys/<key_id>.json   {"key_id", "collection", "tenant", "salt", "sha256", "label",
                                             "created_at"}

A key is ``mrg_<key_id>_<secret>``: ``key_id`` is 16 hex characters (public, names the record), ``secret`` is 32
random bytes, url-safe base64. Only ``sha256(salt || secret)`` is stored, with a per-key random salt; the key
itself is shown once, by :meth:`ApiKeyStore.create`. Secrets are high-entropy random strings, so one salted
SHA-256 is enough (a slow password hash buys nothing against a 256-bit secret and would cost every request).
Hashes are compared with :func:`hmac.compare_digest` (constant time).

:meth:`ApiKeyStore.check` tells a key of this collection (``ok``) from a key of another collection (``forbidden``,
HTTP 403) and from a missing, malformed, revoked or unknown one (``unknown``, HTTP 401). Revoking deletes the
record; a service that caches verdicts (the Serve ingress does, for a few seconds) sees it within that time.

A key's **tenant** (``--tenant`` at creation; default: the key's own id) owns what the key's callers leave behind
(conversation sessions, user memories): revoke a key and create another for the same tenant, and those are still
there (rotation). :meth:`ApiKeyStore.index` lists every key id of the store in one listing, so that a service can
tell a key id that does not exist without a store read per request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError, InvalidInputError
from memorag_core.store import fs as sfs
from memorag_core.store.collection import CollectionStore, _check_collection

logger = logging.getLogger(__name__)

KEY_PREFIX = "mrg_"
_KEY_RE = re.compile(r"^mrg_([0-9a-f]{16})_([A-Za-z0-9_-]{20,128})$")
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


@dataclass(frozen=True)
class ApiKeyRecord:
    """What the store keeps about one key (never the key itself).

    Attributes:
        key_id: public id (16 hex). collection: the collection the key opens. label: a note for humans.
        created_at: ISO-8601 UTC time of creation. tenant: who owns what the key's callers store (sessions, user
        memories); keys of one tenant share them (records written before tenants existed: the key id).
    """

    key_id: str
    collection: str
    label: str
    created_at: str
    tenant: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "ApiKeyRecord":
        return cls(d["key_id"], d["collection"], d.get("label", ""), d["created_at"], d.get("tenant") or d["key_id"])


def parse_key(key: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else None."""
    m = _KEY_RE.match(key or "") if isinstance(key, str) else None
    return (m.group(1), m.group(2)) if m else None


def _digest(salt: bytes, secret: str) -> str:
    return hashlib.sha256(salt + secret.encode()).hexdigest()


def secret_matches(record: dict, secret: str) -> bool:
    """True when ``secret`` is the one whose salted hash ``record`` (a stored key record) holds; constant time."""
    return hmac.compare_digest(_digest(base64.b64decode(record["salt"]), secret), str(record["sha256"]))


class ApiKeyStore:
    """Create, list, revoke and check the API keys of a store's collections.

    Args:
        store: a :class:`~memorag_core.store.CollectionStore` or its root URL.
        storage_options: fsspec options when ``store`` is a URL.
    """

    def __init__(self, store, storage_options: dict | None = None) -> None:
        self.store = store if isinstance(store, CollectionStore) else CollectionStore(store, storage_options)

    def _dir(self, collection: str) -> str:
        return self.store._p("collections", _check_collection(collection), "keys")

    def _path(self, collection: str, key_id: str) -> str:
        if not isinstance(key_id, str) or not _KEY_ID_RE.match(key_id):
            raise InvalidInputError(f"key id {key_id!r} must be 16 hex characters")
        return sfs.join(self._dir(collection), f"{key_id}.json")

    def create(self, collection: str, label: str = "", tenant: str | None = None) -> tuple[ApiKeyRecord, str]:
        """Make a new key for ``collection``; returns its record and the key (shown once, not stored).

        ``tenant`` (1-64 characters of letters, digits, ``_ . @ -``; default: the new key's id) owns what the
        key's callers store; give a revoked key's tenant to a new key to rotate it.
        """
        key_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_bytes(16)
        if tenant is not None and (not isinstance(tenant, str) or not _TENANT_RE.match(tenant)):
            raise InvalidInputError(f"tenant {tenant!r} must be 1-64 characters of letters, digits, '_', '.', '@' "
                                    "or '-', starting with a letter or digit")
        record = ApiKeyRecord(key_id, _check_collection(collection), str(label or ""),
                              datetime.now(timezone.utc).isoformat(), tenant or key_id)
        body = {"key_id": key_id, "collection": collection, "label": record.label, "created_at": record.created_at,
                "tenant": record.tenant, "salt": base64.b64encode(salt).decode(), "sha256": _digest(salt, secret)}
        sfs.write_atomic(self.store.fs, self._path(collection, key_id), json.dumps(body).encode())
        logger.info("created API key %s for collection %s", key_id, collection)
        return record, f"{KEY_PREFIX}{key_id}_{secret}"

    def revoke(self, collection: str, key_id: str) -> None:
        """Delete a key of ``collection``. Raises ArtifactNotFoundError when it has no such key."""
        path = self._path(collection, key_id)
        if not sfs.with_retries(lambda: self.store.fs.exists(path), what=f"stat {self.store._u(path)}"):
            raise ArtifactNotFoundError(f"collection {collection!r} has no API key {key_id!r}")
        sfs.with_retries(lambda: self.store.fs.rm(path), what=f"delete {self.store._u(path)}")
        logger.info("revoked API key %s of collection %s", key_id, collection)

    def list(self, collection: str) -> list[ApiKeyRecord]:
        """The keys of ``collection`` (records only), oldest first."""
        base = self._dir(collection)
        try:
            paths = sfs.with_retries(lambda: self.store.fs.ls(base, detail=False), what=f"list {self.store._u(base)}")
        except ArtifactNotFoundError:
            return []
        out = []
        for p in paths:
            if p.endswith(".json"):
                d = self._read(p)
                if d is not None:
                    out.append(ApiKeyRecord.from_dict(d))
        return sorted(out, key=lambda r: r.created_at)

    def _read(self, path: str) -> dict | None:
        try:
            data = sfs.with_retries(lambda: self.store.fs.cat_file(path), what=f"read {self.store._u(path)}")
        except ArtifactNotFoundError:
            return None
        try:
            d = json.loads(data)
            base64.b64decode(d["salt"], validate=True), str(d["sha256"]), str(d["key_id"])
            return d
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptArtifactError(f"{self.store._u(path)}: not a valid key record ({exc})") from exc

    def _matches(self, path: str, secret: str) -> bool:
        d = self._read(path)
        return d is not None and secret_matches(d, secret)

    def read_record(self, collection: str, key_id: str) -> dict | None:
        """The stored record of ``collection``'s key ``key_id`` (salt and hash included), None when there is none.
        Raises CorruptArtifactError for a damaged record; StoreUnavailableError when the store does not answer."""
        return self._read(self._path(collection, key_id))

    def index(self) -> dict[str, str]:
        """``key id -> collection`` of every key of the store, from one listing (no record is read)."""
        pattern = self.store._p("collections", "*", "keys", "*.json")
        try:
            paths = sfs.with_retries(lambda: self.store.fs.glob(pattern), what="list API keys")
        except ArtifactNotFoundError:
            return {}
        out = {}
        for p in paths:
            parts = p.rstrip("/").split("/")
            key_id = parts[-1][:-len(".json")]
            if _KEY_ID_RE.match(key_id):
                out[key_id] = parts[-3]
        return out

    def check(self, collection: str, key: str | None) -> str:
        """Verdict for ``key`` on ``collection``: ``ok``, ``forbidden`` (a valid key of another collection) or
        ``unknown`` (missing, malformed, revoked or never issued)."""
        parsed = parse_key(key) if key else None
        if parsed is None:
            return "unknown"
        key_id, secret = parsed
        if self._matches(self._path(collection, key_id), secret):
            return "ok"
        return "forbidden" if self.owner(key) not in (None, collection) else "unknown"

    def owner(self, key: str | None) -> str | None:
        """The collection a valid key opens, or None. Looks the key id up under every collection."""
        parsed = parse_key(key) if key else None
        if parsed is None:
            return None
        key_id, secret = parsed
        pattern = self.store._p("collections", "*", "keys", f"{key_id}.json")
        try:
            paths = sfs.with_retries(lambda: self.store.fs.glob(pattern), what=f"list {self.store._u(pattern)}")
        except ArtifactNotFoundError:
            return None
        for p in paths:
            if self._matches(p, secret):
                return p.rstrip("/").split("/")[-3]
        return None
