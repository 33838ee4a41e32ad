"""API keys per collection, stored hashed in the artifact store.

Layout (beside the collection's versions, under the same fsspec root)::

    collections/<name>/keys/<key_id>.json   {"key_id", "collection", "salt", "sha256", "label", "created_at"}

A key is ``mrg_<key_id>_<secret>``: ``key_id`` is 16 hex characters (public, names the record), ``secret`` is 32
random bytes, url-safe base64. Only ``sha256(salt || secret)`` is stored, with a per-key random salt; the key
itself is shown once, by :meth:`ApiKeyStore.create`. Secrets are high-entropy random strings, so one salted
SHA-256 is enough (a slow password hash buys nothing against a 256-bit secret and would cost every request).
Hashes are compared with :func:`hmac.compare_digest` (constant time).

:meth:`ApiKeyStore.check` tells a key of this collection (``ok``) from a key of another collection (``forbidden``,
HTTP 403) and from a missing, malformed, revoked or unknown one (``unknown``, HTTP 401). Revoking deletes the
record; a service that caches verdicts (the Serve ingress does, for a few seconds) sees it within that time.
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


@dataclass(frozen=True)
class ApiKeyRecord:
    """What the store keeps about one key (never the key itself).

    Attributes:
        key_id: public id (16 hex). collection: the collection the key opens. label: a note for humans.
        created_at: ISO-8601 UTC time of creation.
    """

    key_id: str
    collection: str
    label: str
    created_at: str


def parse_key(key: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else None."""
    m = _KEY_RE.match(key or "") if isinstance(key, str) else None
    return (m.group(1), m.group(2)) if m else None


def _digest(salt: bytes, secret: str) -> str:
    return hashlib.sha256(salt + secret.encode()).hexdigest()


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

    def create(self, collection: str, label: str = "") -> tuple[ApiKeyRecord, str]:
        """Make a new key for ``collection``; returns its record and the key (shown once, not stored)."""
        key_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_bytes(16)
        record = ApiKeyRecord(key_id, _check_collection(collection), str(label or ""),
                              datetime.now(timezone.utc).isoformat())
        body = {"key_id": key_id, "collection": collection, "label": record.label, "created_at": record.created_at,
                "salt": base64.b64encode(salt).decode(), "sha256": _digest(salt, secret)}
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
                    out.append(ApiKeyRecord(d["key_id"], d["collection"], d.get("label", ""), d["created_at"]))
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
        if d is None:
            return False
        return hmac.compare_digest(_digest(base64.b64decode(d["salt"]), secret), str(d["sha256"]))

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
