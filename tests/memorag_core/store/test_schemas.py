import json

import pyarrow as pa
import pytest

from memorag_core.errors import CorruptArtifactError, InvalidInputError, SchemaVersionError
from memorag_core.store import schemas
from memorag_core.store.schemas import CHUNKS, SCHEMA_VERSION, Manifest, ModelRef, check_schema_version, conform_table


def test_chunk_schema_columns_and_types():
    expected = {"chunk_id": pa.string(), "doc_id": pa.string(), "unit_id": pa.string(), "chunk_index": pa.int32(),
                "start": pa.int64(), "end": pa.int64(), "text": pa.string(), "embedding": pa.list_(pa.float32())}
    assert {f.name: f.type for f in CHUNKS} == expected
    assert CHUNKS.field("embedding").nullable
    for schema in schemas.TABLE_SCHEMAS.values():
        assert all(f.metadata and f.metadata[b"description"] for f in schema)
    assert schemas.QUARANTINE.names == ["doc_id", "source", "reason", "detail"]
    assert schemas.SUMMARIES.field("unit_id").nullable


def test_conform_table_casts_and_keeps_extra_columns():
    t = pa.table({"chunk_id": ["c0"], "doc_id": ["d"], "unit_id": ["u"], "chunk_index": [0], "start": [0],
                  "end": [5], "text": ["hello"], "embedding": [[0.5, 1.0]], "score": [1.5]})
    out = conform_table(t, "chunks")
    assert out.schema.field("chunk_index").type == pa.int32()
    assert out.schema.field("embedding").type == pa.list_(pa.float32())
    assert out.column_names[-1] == "score"


def test_conform_table_names_the_bad_column():
    t = pa.table({"doc_id": ["d"], "text": ["x"]})
    with pytest.raises(InvalidInputError, match="metadata"):
        conform_table(t, "documents")
    t = pa.table({"doc_id": pa.array([None], pa.string()), "text": ["x"], "metadata": ["{}"]})
    with pytest.raises(InvalidInputError, match="'doc_id' has 1 nulls"):
        conform_table(t, "documents")
    with pytest.raises(InvalidInputError, match="unknown table kind"):
        conform_table(t, "nope")


def test_manifest_roundtrip_and_version_checks():
    m = Manifest(collection="c", version="v", models={"memory": ModelRef("m", "rev1")}, config={"ratio": 4},
                 units={"u1": {"sha256": "ab", "nbytes": 3, "storage_dtype": "keep"}}, stats={"chunks": 2})
    back = Manifest.from_json(m.to_json())
    assert back == m and back.models["memory"].revision == "rev1"
    newer = json.loads(m.to_json()) | {"schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Manifest.from_json(json.dumps(newer), what="s3://b/manifest.json")
    with pytest.raises(CorruptArtifactError, match="not valid JSON"):
        Manifest.from_json("{trunc")
    with pytest.raises(CorruptArtifactError, match="not a collection version manifest"):
        Manifest.from_json('{"format": "other"}')
    with pytest.raises(InvalidInputError, match="not JSON-serializable"):
        Manifest(config={"x": object()}).to_json()


def test_check_schema_version():
    check_schema_version(SCHEMA_VERSION, "x")
    with pytest.raises(SchemaVersionError, match="upgrade"):
        check_schema_version(SCHEMA_VERSION + 1, "thing")
    for bad in (None, "1", 0, True):
        with pytest.raises(CorruptArtifactError):
            check_schema_version(bad, "thing")
