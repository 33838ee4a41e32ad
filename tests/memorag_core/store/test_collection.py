import json
import threading

import pyarrow as pa
import pytest

from memorag_core.errors import (
    ArtifactNotFoundError,
    CorruptArtifactError,
    InvalidInputError,
    PublishConflictError,
    SchemaVersionError,
)
from memorag_core.store import fs as sfs
from memorag_core.store.collection import CollectionStore, version_time
from memorag_core.store.schemas import SCHEMA_VERSION, Manifest, ModelRef
from tests.memorag_core.store.conftest import make_memory


def chunks_table(unit_id: str, n: int = 3) -> pa.Table:
    return pa.table({
        "chunk_id": [f"{unit_id}-{i}" for i in range(n)], "doc_id": ["d0"] * n, "unit_id": [unit_id] * n,
        "chunk_index": list(range(n)), "start": [10 * i for i in range(n)], "end": [10 * i + 9 for i in range(n)],
        "text": [f"text {i}" for i in range(n)], "embedding": [[float(i), 1.0] for i in range(n)],
    })


def publish_version(store: CollectionStore, collection: str, unit_id: str, seed: int = 0, **kw) -> str:
    info = store.write_unit_memory(unit_id, make_memory(seed=seed))
    w = store.new_version(collection)
    w.write_table("chunks", "part-000", chunks_table(unit_id))
    w.write_bytes("index/shard-000.faiss", f"index of {unit_id}".encode())
    m = Manifest(models={"memory": ModelRef("tiny", "rev")}, config={"ratio": 4},
                 units={unit_id: info.to_dict()}, stats={"chunks": 3})
    return w.publish(m, **kw)


def test_publish_read_and_list(backend):
    store = CollectionStore(backend.root_url, backend.storage_options)
    assert store.current_version("books") is None
    with pytest.raises(ArtifactNotFoundError, match="no live version"):
        store.open_version("books")
    v1 = publish_version(store, "books", "u1")
    v2 = publish_version(store, "books", "u2", seed=1)
    assert v1 < v2 and version_time(v1) is not None
    assert store.current_version("books") == v2 and store.list_versions("books") == [v1, v2]
    r = store.open_version("books")
    assert r.version == v2 and r.manifest.parent == v1
    assert r.read_table("chunks").column("unit_id").to_pylist() == ["u2"] * 3
    assert r.read_table("chunks").schema.field("chunk_index").type == pa.int32()
    assert r.read_bytes("index/shard-000.faiss") == b"index of u2"
    assert r.files("index/") == ["index/shard-000.faiss"]
    assert r.read_unit_memory("u2").header["kind"] == "compressed_kv"
    old = store.open_version("books", v1)
    assert old.read_bytes("index/shard-000.faiss") == b"index of u1"
    assert store.read_manifest("books", v1).units["u1"]["sha256"] == old.manifest.units["u1"]["sha256"]


def test_publish_refuses_missing_units_and_bad_tables(backend):
    store = CollectionStore(backend.root_url, backend.storage_options)
    w = store.new_version("c")
    with pytest.raises(InvalidInputError, match="lacks column 'embedding'"):
        w.write_table("chunks", "p", chunks_table("u").drop_columns(["embedding"]))
    with pytest.raises(InvalidInputError, match="unknown table kind"):
        w.write_table("bogus", "p", chunks_table("u"))
    with pytest.raises(ArtifactNotFoundError, match="unit 'ghost'"):
        w.publish(Manifest(units={"ghost": {"sha256": "0" * 64, "nbytes": 1}}))
    assert store.current_version("c") is None
    with pytest.raises(InvalidInputError, match="collection name"):
        store.new_version("../evil")


def test_two_publishers_cannot_both_win(backend):
    store = CollectionStore(backend.root_url, backend.storage_options)
    base = publish_version(store, "c", "u0")
    a, b = store.new_version("c"), store.new_version("c")
    for w in (a, b):
        w.write_bytes("index/x", w.version.encode())
    a.publish(Manifest())
    with pytest.raises(PublishConflictError, match=f"live version is '{a.version}'"):
        b.publish(Manifest())
    assert store.current_version("c") == a.version
    assert store.open_version("c").read_bytes("index/x") == a.version.encode()
    with pytest.raises(PublishConflictError):
        store.new_version("c").publish(Manifest(), expected_current=base)


def test_concurrent_publishers_exactly_one_wins(backend):
    store = CollectionStore(backend.root_url, backend.storage_options)
    publish_version(store, "c", "u0")
    writers = [store.new_version("c") for _ in range(4)]
    for w in writers:
        w.write_bytes("index/x", w.version.encode())
    outcomes: dict[str, str] = {}
    barrier = threading.Barrier(len(writers))

    def run(w):
        barrier.wait()
        try:
            w.publish(Manifest())
            outcomes[w.version] = "won"
        except PublishConflictError:
            outcomes[w.version] = "lost"

    threads = [threading.Thread(target=run, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [v for v, o in outcomes.items() if o == "won"]
    assert len(outcomes) == 4 and len(winners) == 1
    assert store.current_version("c") == winners[0]


def test_gc_keeps_live_and_units_of_kept_versions(backend):
    store = CollectionStore(backend.root_url, backend.storage_options)
    v1 = publish_version(store, "c", "u1")
    v2 = publish_version(store, "c", "u2", seed=1)
    publish_version(store, "other", "u1")  # another collection shares u1
    # the live version, and a newer one that lost the race to it: has a manifest, is not live
    info3 = store.write_unit_memory("u3", make_memory(seed=2))
    w_live = store.new_version("c")
    loser = store.new_version("c")
    live = w_live.publish(Manifest(units={"u3": info3.to_dict()}))
    store.write_unit_memory("orphan", make_memory(seed=3))
    # the memorize job's staged chunk tables: one per unit, under an embedder key
    fs, root = sfs.open_url(backend.root_url, backend.storage_options)
    fs.makedirs(f"{root}/staging/chunks/k1", exist_ok=True)
    for uid in ("u1", "u2", "u3", "orphan"):
        fs.pipe_file(f"{root}/staging/chunks/k1/{uid}.parquet", b"staged " + uid.encode())
    with pytest.raises(PublishConflictError):
        loser.publish(Manifest())
    assert store.current_version("c") == live and loser.version > live
    young = store.gc("c", keep_last=1)  # default min_age_s: everything is too young to delete
    assert young.removed_versions == [] and young.removed_units == [] and young.removed_staging == []
    dry = store.gc("c", keep_last=1, min_age_s=0, dry_run=True)  # says what would go, deletes nothing
    assert store.list_versions("c") == sorted([v1, v2, live, loser.version]) and store.has_unit("orphan")
    assert len(fs.ls(f"{root}/staging/chunks/k1", detail=False)) == 4
    report = store.gc("c", keep_last=1, min_age_s=0)
    assert (sorted(dry.removed_versions), sorted(dry.removed_units), sorted(dry.removed_staging), dry.freed_bytes) \
        == (sorted(report.removed_versions), sorted(report.removed_units), sorted(report.removed_staging),
            report.freed_bytes)
    assert report.live == live
    assert sorted(report.removed_versions) == sorted([v1, v2])
    assert sorted(report.removed_units) == ["orphan", "u2"]  # u1 is used by 'other', u3 by the live version
    assert sorted(report.removed_staging) == ["k1/orphan", "k1/u2"]
    assert sorted(p.split("/")[-1] for p in fs.ls(f"{root}/staging/chunks/k1", detail=False)) == [
        "u1.parquet", "u3.parquet"]
    assert report.freed_bytes > 0
    assert store.list_versions("c") == [live, loser.version]
    assert store.open_version("c").read_unit_memory("u3").header["model"] == "tiny"
    assert store.has_unit("u1") and not store.has_unit("u2")
    with pytest.raises(InvalidInputError):
        store.gc("c", keep_last=0)


def test_current_pointer_names_the_live_version_and_when_it_went_live(backend):
    from datetime import datetime

    store = CollectionStore(backend.root_url, backend.storage_options)
    assert store.current_pointer("c") is None
    v = publish_version(store, "c", "u1")
    pointer = store.current_pointer("c")
    assert pointer["version"] == v == store.current_version("c")
    assert datetime.fromisoformat(pointer["published_at"]) >= version_time(v)


def test_newer_or_corrupt_manifests_and_pointer_fail_clearly(backend):
    store = CollectionStore(backend.root_url, backend.storage_options)
    v = publish_version(store, "c", "u1")
    fs, root = sfs.open_url(backend.root_url, backend.storage_options)
    mpath = f"{root}/collections/c/versions/{v}/manifest.json"
    data = json.loads(fs.cat_file(mpath))
    fs.pipe_file(mpath, json.dumps(data | {"schema_version": SCHEMA_VERSION + 1}).encode())
    with pytest.raises(SchemaVersionError, match=f"{v}/manifest.json"):
        store.open_version("c")
    fs.pipe_file(f"{root}/collections/c/CURRENT", b"garbage")
    with pytest.raises(CorruptArtifactError, match="CURRENT"):
        store.current_version("c")
