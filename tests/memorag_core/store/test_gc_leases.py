"""GC that cannot race a running job: job leases, ages from file times, dry runs, publish that checks its files."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from memorag_core.errors import ArtifactNotFoundError
from memorag_core.store import fs as sfs
from memorag_core.store.collection import CollectionStore, VersionWriter, new_version_id
from memorag_core.store.schemas import Manifest
from memorag_core.store.summaries import SummaryStore, content_key
from tests.memorag_core.store.conftest import make_memory
from tests.memorag_core.store.test_collection import chunks_table, publish_version


def test_version_age_comes_from_its_files_not_its_id(backend):
    """A job that started long ago (its version id says so) but wrote its files just now is not collected."""
    store = CollectionStore(backend.root_url, backend.storage_options)
    publish_version(store, "c", "u1")
    started = new_version_id(datetime.now(timezone.utc) - timedelta(hours=3))
    w = VersionWriter(store, "c", started, store.current_version("c"))
    w.write_table("chunks", "part-000", chunks_table("u2"))
    report = store.gc("c", keep_last=1, min_age_s=3600)
    assert started in report.kept_versions and started not in report.removed_versions
    assert store.fs.exists(sfs.join(w.dir, "chunks/part-000.parquet"))


def test_a_job_lease_holds_versions_units_and_staging(backend):
    store = CollectionStore(backend.root_url, backend.storage_options)
    live = publish_version(store, "c", "u1")
    fs, root = sfs.open_url(backend.root_url, backend.storage_options)
    # what a running (or resumed) memorize job has written or will reuse: units no manifest lists yet, staged
    # chunk tables, files of its unpublished version
    info = store.write_unit_memory("resumed", make_memory(seed=4))
    fs.makedirs(f"{root}/staging/chunks/k1", exist_ok=True)
    fs.pipe_file(f"{root}/staging/chunks/k1/resumed.parquet", b"staged")
    with store.job_lease("c", "memorize") as lease:
        w = store.new_version("c")
        lease.hold(w.version, w.base)
        w.write_table("chunks", "part-000", chunks_table("resumed"))
        assert [j["holder"] for j in store.job_leases()] == [lease.holder]
        report = store.gc("c", keep_last=1, min_age_s=0)
        assert report.removed_versions == [] and report.removed_units == [] and report.removed_staging == []
        assert report.deferred and lease.holder in report.deferred
        assert w.version in report.kept_versions
        # the job publishes what it wrote, and the collection reads back
        v = w.publish(Manifest(units={"resumed": info.to_dict()}))
    assert store.job_leases() == [] and store.current_version("c") == v
    assert store.open_version("c").read_table("chunks").num_rows == 3
    # without a lease the same gc collects the old version, u1 and its staged table are not referenced any more
    fs.pipe_file(f"{root}/staging/chunks/k1/u1.parquet", b"staged")
    dry = store.gc("c", keep_last=1, min_age_s=0, dry_run=True)
    assert dry.dry_run and dry.removed_versions == [live] and dry.removed_units == ["u1"]
    assert dry.removed_staging == ["k1/u1"] and dry.freed_bytes > 0
    assert store.list_versions("c") == sorted([live, v]) and store.has_unit("u1")  # nothing deleted
    real = store.gc("c", keep_last=1, min_age_s=0)
    assert (real.removed_versions, real.removed_units, real.removed_staging) == (
        dry.removed_versions, dry.removed_units, dry.removed_staging)
    assert real.freed_bytes == dry.freed_bytes and not store.has_unit("u1") and store.has_unit("resumed")


def test_publish_fails_when_its_files_were_collected(backend):
    store = CollectionStore(backend.root_url, backend.storage_options)
    w = store.new_version("c")
    w.write_table("chunks", "part-000", chunks_table("u1"))
    store.gc("c", keep_last=1, min_age_s=0)  # no lease: the unpublished folder goes (a gc that ignored the job)
    with pytest.raises(ArtifactNotFoundError, match="chunks/part-000.parquet' is missing"):
        w.publish(Manifest())
    assert store.current_version("c") is None


def test_missing_units_by_listing(backend):
    store = CollectionStore(backend.root_url, backend.storage_options)
    for u in ("a", "b"):
        store.write_unit_memory(u, make_memory())
    ids = ["a", "b", "ghost"]
    assert store.missing_units(ids) == ["ghost"] == store.missing_units(ids, list_above=0)


def test_summaries_gc_keeps_a_running_jobs_staged_records(tmp_path):
    s = SummaryStore(str(tmp_path / "store"))
    key = content_key("unit", "u1")
    s.stage("units", key, {"summary": "staged by a running job"})
    with s.versions.job_lease("c", "summarize"):
        report = s.gc("c", keep_last=1, min_age_s=0)
        assert report["removed_staged"] == 0 and report["deferred"]
        assert s.staged_keys("units") == [key]
    assert s.gc("c", keep_last=1, min_age_s=0, dry_run=True)["removed_staged"] == 1
    assert s.staged_keys("units") == [key]
    assert s.gc("c", keep_last=1, min_age_s=0)["removed_staged"] == 1 and s.staged_keys("units") == []
