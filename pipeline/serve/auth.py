"""API keys at the ingress, cheap for keys that do not exist, and a token bucket per key.

:class:`KeyGate` answers "whose key is this?" without a store read per request:

* an **index** of every key id of the store (one listing, :meth:`ApiKeyStore.index`), refreshed at most every
  ``index_refresh_s`` when a key id is missing from it (so a key created a moment ago works within that time) and
  every ``cache_s`` otherwise. A well-formed key whose id is not in a fresh index is refused in the event loop, no
  thread and no store call: a flood of random keys costs one listing per ``index_refresh_s`` in all;
* **records** (salt, hash, tenant) cached per key id for ``cache_s`` (the revocation delay); while the store does
  not answer, the last records read keep known keys working;
* **negative verdicts** per key hash for ``cache_s`` (a bad key repeated does not cost a hash or a read).

:class:`RateLimiter` is a token bucket per key id: ``rate`` requests per second, bursts of ``burst``; an empty
bucket answers how long until the next token (the 429's Retry-After).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from memorag_core.errors import ArtifactError, CorruptArtifactError
from memorag_core.store.keys import ApiKeyStore, parse_key, secret_matches

logger = logging.getLogger("memorag.serve")


@dataclass(frozen=True)
class Identity:
    """A valid key: its id, the collection it opens and its tenant."""

    key_id: str
    collection: str
    tenant: str


class KeyGate:
    """Key verdicts with an index of key ids, cached records and cached refusals (see the module docstring).

    Args:
        keys: the store's :class:`ApiKeyStore`. cache_s: lifetime of cached records and refusals (seconds).
        index_refresh_s: the key-id index is re-listed at most this often when a key id is missing from it.
        max_entries: bound of each cache.
    """

    def __init__(self, keys: ApiKeyStore, *, cache_s: float = 5.0, index_refresh_s: float = 2.0,
                 max_entries: int = 10_000) -> None:
        self.keys = keys
        self.cache_s, self.index_refresh_s, self.max_entries = cache_s, index_refresh_s, max_entries
        self._index: dict[str, str] = {}
        self._index_at = -math.inf
        self._records: dict[str, tuple[dict, float]] = {}
        self._refused: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()
        self.store_reads = 0

    @staticmethod
    def _hash(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def refused(self, key: str) -> bool:
        """True when ``key`` is certainly not a valid key, decided without I/O (malformed, refused a moment ago,
        or an id missing from an index fresher than ``index_refresh_s``)."""
        parsed = parse_key(key)
        if parsed is None:
            return True
        now = time.monotonic()
        with self._lock:
            at = self._refused.get(self._hash(key))
            if at is not None and now - at < self.cache_s:
                return True
            return parsed[0] not in self._index and now - self._index_at < self.index_refresh_s

    def _refuse(self, key: str) -> None:
        with self._lock:
            self._refused[self._hash(key)] = time.monotonic()
            self._refused.move_to_end(self._hash(key))
            while len(self._refused) > self.max_entries:
                self._refused.popitem(last=False)

    def _refresh_index(self, force: bool = False) -> None:
        with self._index_lock:  # concurrent misses make one listing
            now = time.monotonic()
            if not force and now - self._index_at < self.index_refresh_s:
                return
            try:
                index = self.keys.index()
                self.store_reads += 1
            except ArtifactError as exc:  # store down: keep the last index
                logger.warning("key index not refreshed: %s", type(exc).__name__)
                return
            with self._lock:
                self._index, self._index_at = index, time.monotonic()

    def _record(self, collection: str, key_id: str) -> dict | None:
        now = time.monotonic()
        with self._lock:
            hit = self._records.get(key_id)
        if hit is not None and now - hit[1] < self.cache_s:
            return hit[0]
        try:
            record = self.keys.read_record(collection, key_id)
            self.store_reads += 1
        except CorruptArtifactError:
            raise
        except ArtifactError as exc:  # store down: a key known a moment ago stays known
            if hit is None:
                raise
            logger.warning("key record %s served from cache: %s", key_id, type(exc).__name__)
            return hit[0]
        with self._lock:
            if record is None:
                self._records.pop(key_id, None)
                self._index.pop(key_id, None)
            else:
                if len(self._records) >= self.max_entries:
                    self._records.clear()
                self._records[key_id] = (record, now)
        return record

    def identify(self, key: str | None) -> Identity | None:
        """The identity of a valid key, else None (missing, malformed, revoked or never issued). Blocking (may
        list the key index or read one record): call it from a worker thread unless :meth:`refused` said no."""
        parsed = parse_key(key) if key else None
        if parsed is None:
            return None
        key_id, secret = parsed
        if key_id not in self._index or time.monotonic() - self._index_at >= max(self.cache_s, self.index_refresh_s):
            self._refresh_index()
        collection = self._index.get(key_id)
        record = self._record(collection, key_id) if collection else None
        if record is None or not secret_matches(record, secret):
            self._refuse(key)
            return None
        return Identity(key_id, collection, record.get("tenant") or key_id)

    def cached(self, key: str | None) -> Identity | None:
        """The identity of ``key`` from the caches only (no I/O; None when not cached or not valid)."""
        parsed = parse_key(key) if key else None
        if parsed is None:
            return None
        collection = self._index.get(parsed[0])
        hit = self._records.get(parsed[0])
        if collection is None or hit is None or not secret_matches(hit[0], parsed[1]):
            return None
        return Identity(parsed[0], collection, hit[0].get("tenant") or parsed[0])


class RateLimiter:
    """Token buckets per key: ``rate`` tokens a second, at most ``burst`` stored; ``rate`` 0 disables it."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = float(rate), max(1, int(burst)), max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float | None:
        """Spend one token of ``key``'s bucket: None when there was one, else seconds until the next."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._buckets.clear()
        self._buckets[key] = (tokens - 1.0, now)
        return None
