"""Garbage collection of a store: old versions, and unit memories and staged files no kept version uses
(:class:`GCMixin`, a part of :class:`~memorag_core.store.collection.CollectionStore`). See :meth:`GCMixin.gc`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

from memorag_core.errors import InvalidInputError
from memorag_core.store import fs as sfs
from memorag_core.store.names import check_collection

logger = logging.getLogger(__name__)


@dataclass
class GCReport:
    """What :meth:`CollectionStore.gc` removed (or, with ``dry_run``, would remove) and kept."""

    live: str | None
    """The live version (never removed)."""
    kept_versions: list[str] = field(default_factory=list)
    """Versions kept (the live one, the last ``keep_last`` and recent unpublished ones)."""
    removed_versions: list[str] = field(default_factory=list)
    """Version folders deleted."""
    removed_units: list[str] = field(default_factory=list)
    """Unit ids whose memory was deleted (referenced by no kept version of any collection)."""
    removed_staging: list[str] = field(default_factory=list)
    """Staged per-unit chunk tables deleted (``staging/chunks/<key>/<unit_id>.parquet``, as ``<key>/<unit_id>``)
    whose unit no kept version uses: the memorize job's resume cache for units that were dropped."""
    freed_bytes: int = 0
    """Bytes deleted (or that would be, in a dry run)."""
    dry_run: bool = False
    """Nothing was deleted: the lists say what would have been."""
    deferred: str | None = None
    """Why unreferenced units and staged files were not considered (running jobs hold leases), or None."""


class GCMixin:
    """gc of a store. Needs the store's paths, ``current_version``, ``list_versions``, ``list_collections``,
    ``read_manifest``, ``leased_versions``, ``job_leases`` and ``_version_dir``."""

    def gc(self, collection: str, keep_last: int = 1, *, min_age_s: float = 3600.0,
           dry_run: bool = False) -> GCReport:
        """Delete old versions of ``collection``, and unit memories and staged chunk tables that no kept version of
        any collection uses; with ``dry_run`` delete nothing and report what would be deleted.

        Kept: the live version; the newest ``keep_last`` versions with a manifest; versions named by an unexpired
        lease (a serving replica's, :meth:`write_lease`, or a running job's, :meth:`job_lease`); and anything
        whose newest file is younger than ``min_age_s`` (ages come from the files' modification times, never from
        the version id, which is the time a job *started*). While any job holds a lease, no unreferenced unit or
        staged file is deleted (``report.deferred`` says why): a running or resumed job may be about to publish
        them. The live version and its units are never removed.

        Raises InvalidInputError for keep_last < 1 or a negative min_age_s.
        """
        if keep_last < 1 or min_age_s < 0:
            raise InvalidInputError(f"gc needs keep_last >= 1 and min_age_s >= 0 (got {keep_last}, {min_age_s})")
        now = datetime.now(timezone.utc).timestamp()
        live = self.current_version(collection)
        report = GCReport(live=live, dry_run=dry_run)
        base = sfs.join(self._p("collections", check_collection(collection)), "versions")
        files = sfs.list_files(self.fs, base, what=f"list {self._u(base)}")
        by_version: dict[str, list[dict]] = {}
        for path, info in files.items():
            by_version.setdefault(path[len(base):].strip("/").split("/")[0], []).append(info)
        with_manifest = set(self.list_versions(collection))
        leased = self.leased_versions(collection)
        keep = {live} | set(sorted(with_manifest)[-keep_last:]) | leased
        for v in sorted(by_version):
            times = [t for t in (sfs.modified_ts(i) for i in by_version[v]) if t is not None]
            young = not times or now - max(times) < min_age_s
            if v in keep or young:
                report.kept_versions.append(v)
                continue
            path = self._version_dir(collection, v)
            report.freed_bytes += sum(int(i.get("size") or 0) for i in by_version[v])
            if not dry_run:
                sfs.with_retries(lambda: self.fs.rm(path, recursive=True), what=f"delete {self._u(path)}")
            report.removed_versions.append(v)
        jobs = self.job_leases()
        if jobs:
            report.deferred = (f"{len(jobs)} running job(s) hold leases ("
                               + ", ".join(f"{j['job']} {j['holder']} on {j['collection']}" for j in jobs)
                               + "): unreferenced units and staged files are kept")
            logger.info("gc %s: %s", collection, report.deferred)
        else:
            # Units: referenced by any remaining manifest of any collection are kept.
            referenced: set[str] = set()
            for c in self.list_collections():
                for v in self.list_versions(c):
                    if c == collection and v in report.removed_versions:
                        continue
                    referenced.update(self.read_manifest(c, v).units)
            self._gc_units(referenced, now, min_age_s, report)
            self._gc_staging(referenced, now, min_age_s, report)
        logger.info("gc %s%s: removed %d versions, %d units, %d staged chunk tables, %d bytes; live %s", collection,
                    " (dry run)" if dry_run else "", len(report.removed_versions), len(report.removed_units),
                    len(report.removed_staging), report.freed_bytes, live)
        return report

    def _gc_units(self, referenced: set[str], now: float, min_age_s: float, report: GCReport) -> None:
        """Delete unit folders that no kept version uses and whose files are all older than ``min_age_s``."""
        units_dir = self._p("units")
        by_unit: dict[str, list[dict]] = {}
        for path, info in sfs.list_files(self.fs, units_dir, what=f"list {self._u(units_dir)}").items():
            by_unit.setdefault(path[len(units_dir):].strip("/").split("/")[0], []).append(info)
        for uid, infos in sorted(by_unit.items()):
            if uid in referenced:
                continue
            times = [t for t in (sfs.modified_ts(i) for i in infos) if t is not None]
            if times and now - max(times) < min_age_s:
                continue
            path = sfs.join(units_dir, uid)
            report.freed_bytes += sum(int(i.get("size") or 0) for i in infos)
            if not report.dry_run:
                sfs.with_retries(lambda: self.fs.rm(path, recursive=True), what=f"delete {self._u(path)}")
            report.removed_units.append(uid)

    def _gc_staging(self, referenced: set[str], now: float, min_age_s: float, report: GCReport) -> None:
        """Delete staged chunk tables (the memorize job's per-unit cache) of units no kept version uses."""
        staging = self._p("staging", "chunks")
        for f, info in sorted(sfs.list_files(self.fs, staging, what=f"list {self._u(staging)}").items()):
            rel = f[len(staging):].strip("/").split("/")  # [<embed key>, <unit_id>.parquet]
            if len(rel) != 2:
                continue
            key, name = rel
            if not name.endswith(".parquet") or name[: -len(".parquet")] in referenced:
                continue
            t = sfs.modified_ts(info)
            if t is None or now - t < min_age_s:  # a running job may be about to publish it
                continue
            if not report.dry_run:
                sfs.with_retries(lambda: self.fs.rm(f), what=f"delete {self._u(f)}")
            report.freed_bytes += int(info.get("size") or 0)
            report.removed_staging.append(f"{key}/{name[: -len('.parquet')]}")
