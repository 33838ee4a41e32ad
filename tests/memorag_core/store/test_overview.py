"""The store at a glance (memorag_core.store.overview) on a local folder and on moto S3: counts of the live
version, keys, summaries, and per version the units and documents it added or removed."""

from __future__ import annotations

import pyarrow as pa
import pytest

from memorag_core.errors import ArtifactNotFoundError
from memorag_core.store.collection import CollectionStore
from memorag_core.store.keys import ApiKeyStore
from memorag_core.store.overview import collection_overview, manifest_bytes, store_overview, version_history
from memorag_core.store.schemas import Manifest
from tests.memorag_core.store.conftest import make_memory


def publish(store: CollectionStore, docs_by_unit: dict[str, list[str]], seed: int = 0) -> str:
    """A version whose units (memories written here) hold ``docs_by_unit``; stats name documents and tokens."""
    units = {}
    for i, uid in enumerate(sorted(docs_by_unit)):
        units[uid] = store.write_unit_memory(uid, make_memory(seed=seed + i)).to_dict()
    w = store.new_version("c")
    w.write_table("units", "shard-00000", pa.table({
        "unit_id": list(docs_by_unit), "doc_ids": list(docs_by_unit.values()),
        "text": ["t"] * len(docs_by_unit), "n_tokens": [10] * len(docs_by_unit),
        "start": pa.array([None] * len(docs_by_unit), pa.int64()), "end": pa.array([None] * len(docs_by_unit),
                                                                                  pa.int64())}))
    docs = {d for ds in docs_by_unit.values() for d in ds}
    return w.publish(Manifest(units=units, stats={"documents": len(docs), "tokens": 10 * len(units)}))


def test_overview_and_history(backend):
    store = CollectionStore(backend.root_url, backend.storage_options)
    assert store_overview(store) == []
    with pytest.raises(ArtifactNotFoundError, match="no collection 'c'"):
        collection_overview(store, "c")
    v1 = publish(store, {"u1": ["a", "b"], "u2": ["c"]})
    v2 = publish(store, {"u1": ["a", "b"], "u3": ["d"]}, seed=5)
    ApiKeyStore(store).create("c")
    [info] = store_overview(store)
    m = store.read_manifest("c")
    assert (info.collection, info.live_version, info.versions, info.keys) == ("c", v2, 2, 1)
    assert (info.documents, info.units, info.tokens) == (3, 2, 20) and info.summaries_version is None
    assert info.bytes == manifest_bytes(m) == sum(f["nbytes"] for f in m.files.values()) + sum(
        u["nbytes"] for u in m.units.values())
    assert info.published_at == store.current_pointer("c")["published_at"]
    first, second = version_history(store, "c")
    assert (first.version, first.live, second.version, second.live, second.parent) == (v1, False, v2, True, v1)
    assert first.units_added == ["u1", "u2"] and first.documents_added == ["a", "b", "c"]
    assert second.units_added == ["u3"] and second.units_removed == ["u2"]
    assert second.documents_added == ["d"] and second.documents_removed == ["c"]
    assert second.to_dict()["documents_removed"] == ["c"] and info.to_dict()["live_version"] == v2
