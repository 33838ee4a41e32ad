"""Leases: a serving replica or a running job names the versions it uses, for a while, so that gc keeps them
(:class:`LeaseMixin`, a part of :class:`~memorag_core.store.collection.CollectionStore`; :class:`JobLease`).

Layout: ``collections/<name>/leases/<holder>.json`` = ``{holder, versions, expires_at[, job]}``. A replica renews
its lease whenever it re-reads the live pointer; a job holds a :class:`JobLease`, renewed by a daemon thread.
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import datetime, timezone

from memorag_core.errors import InvalidInputError
from memorag_core.store import fs as sfs
from memorag_core.store.names import UNIT_RE, check_collection

logger = logging.getLogger(__name__)


class LeaseMixin:
    """Leases of a store's collections. Needs ``_p``, ``_u``, ``fs`` and ``list_collections`` of the store."""

    def _lease_path(self, collection: str, holder: str) -> str:
        if not isinstance(holder, str) or not UNIT_RE.match(holder):
            raise InvalidInputError(f"lease holder {holder!r} must match {UNIT_RE.pattern}")
        return self._p("collections", check_collection(collection), "leases", f"{holder}.json")

    def write_lease(self, collection: str, holder: str, versions: list[str], ttl_s: float = 600.0, *,
                    job: str | None = None) -> None:
        """Record that ``holder`` (a serving replica, or a running job when ``job`` names its kind) uses
        ``versions`` of ``collection`` for the next ``ttl_s`` seconds; :meth:`gc` keeps them. Renew before it
        expires; :meth:`delete_lease` when done. A job's lease also stops :meth:`gc` from deleting unreferenced
        units and staged files anywhere in the store (see :meth:`job_lease`)."""
        now = datetime.now(timezone.utc).timestamp()
        body = {"holder": holder, "versions": sorted(versions), "expires_at": now + float(ttl_s)}
        if job is not None:
            body["job"] = str(job)
        sfs.write_atomic(self.fs, self._lease_path(collection, holder), json.dumps(body).encode())

    def delete_lease(self, collection: str, holder: str) -> None:
        """Remove ``holder``'s lease (nothing happens when there is none)."""
        path = self._lease_path(collection, holder)
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass

    def _leases(self, collection: str) -> list[dict]:
        """The unexpired leases of ``collection``. A malformed lease is ignored (logged)."""
        base = self._p("collections", check_collection(collection), "leases")
        try:
            paths = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        now = datetime.now(timezone.utc).timestamp()
        out = []
        for p in paths:
            try:
                lease = json.loads(self.fs.cat_file(p))
                if float(lease["expires_at"]) > now:
                    out.append({**lease, "collection": collection, "versions": [str(v) for v in lease["versions"]]})
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("ignoring malformed lease %s: %s", self._u(p), exc)
        return out

    def leased_versions(self, collection: str) -> set[str]:
        """Versions of ``collection`` named by an unexpired lease (a serving replica's or a running job's)."""
        return {v for lease in self._leases(collection) for v in lease["versions"]}

    def job_leases(self) -> list[dict]:
        """The unexpired leases of running jobs in this store, any collection: ``{holder, job, collection,
        versions, expires_at}`` each."""
        return [lease for c in self.list_collections() for lease in self._leases(c) if lease.get("job")]

    def job_lease(self, collection: str, job: str, versions=(), *, ttl_s: float = 600.0) -> "JobLease":
        """A lease for a running ``job`` (``"memorize"``, ``"summarize"``) on ``collection``, renewed in the
        background every ``ttl_s / 3`` seconds until released; use it as a context manager.

        While it is held, :meth:`gc` keeps ``versions`` (add more with :meth:`JobLease.hold`: the version the job
        is writing, the one it reads) and deletes no unreferenced unit memory or staged file anywhere in the
        store: a running or resumed job may reuse any of them, and none is listed by a manifest until it publishes.
        A job killed without releasing its lease holds nothing once ``ttl_s`` has passed.
        """
        return JobLease(self, collection, job, list(versions), ttl_s)


class JobLease:
    """A running job's lease on a collection (see :meth:`CollectionStore.job_lease`), renewed by a daemon thread.

    Use as a context manager, or :meth:`start` and :meth:`release`. The holder id is ``job-<kind>-<12 hex>``.
    """

    def __init__(self, store, collection: str, job: str, versions: list[str], ttl_s: float):
        if ttl_s <= 0:
            raise InvalidInputError(f"lease ttl_s must be > 0, got {ttl_s}")
        self.store, self.collection, self.job, self.ttl_s = store, check_collection(collection), job, float(ttl_s)
        self.holder = f"job-{job}-{secrets.token_hex(6)}"
        self.versions = {v for v in versions if v}
        self._stop = None
        self._thread = None
        self._lock = None

    def _write(self) -> None:
        self.store.write_lease(self.collection, self.holder, sorted(self.versions), self.ttl_s, job=self.job)

    def start(self) -> "JobLease":
        """Write the lease and start renewing it every ``ttl_s / 3`` seconds."""
        import threading

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._write()

        def renew() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    with self._lock:
                        self._write()
                except Exception as exc:  # noqa: BLE001 - a failed renewal is retried at the next tick
                    logger.warning("renewing lease %s failed: %s", self.holder, exc)

        self._thread = threading.Thread(target=renew, name=f"lease-{self.holder}", daemon=True)
        self._thread.start()
        logger.info("job lease %s on %s: versions %s", self.holder, self.collection, sorted(self.versions))
        return self

    def hold(self, *versions: str) -> None:
        """Add versions to the lease (rewritten at once)."""
        self.versions.update(v for v in versions if v)
        if self._lock is not None:
            with self._lock:
                self._write()

    def release(self) -> None:
        """Stop renewing and delete the lease."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
        self.store.delete_lease(self.collection, self.holder)

    def __enter__(self) -> "JobLease":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.release()
