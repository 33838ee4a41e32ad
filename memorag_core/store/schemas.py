"""Every schema of the artifact store in one place: Arrow tables, the memory file header, the version manifest.

Tables (Parquet on disk) and their required columns:

* :data:`DOCUMENTS`  ``doc_id, text, metadata`` (metadata: a JSON object as a string).
* :data:`UNITS`      ``unit_id, doc_ids, text, n_tokens, start, end`` (a unit is documents packed together, or a
  span of one long document: ``start``/``end`` are char offsets in that document, null when packed).
* :data:`CHUNKS`     ``chunk_id, doc_id, unit_id, chunk_index, start, end, text, embedding`` (offsets are chars
  in the unit text; embedding ``list<float32>`` may be null before the embed stage).
* :data:`SUMMARIES`  ``unit_id`` (null = the collection summary), ``summary, key_points, model``.
* :data:`QUARANTINE` ``doc_id, source, reason, detail`` (documents refused at validation, with why).

Every artifact carries an integer schema version. Code reading a version newer than :data:`SCHEMA_VERSION`
raises :class:`~memorag_core.errors.SchemaVersionError` instead of guessing (older versions are read as long as
this module still understands them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa

from memorag_core.errors import CorruptArtifactError, InvalidInputError, SchemaVersionError

logger = logging.getLogger(__name__)

SCHEMA_VERSION: int = 1
"""Version of every schema in this module (tables, memory file header, manifests). Bump on incompatible change."""

MEMORY_FILE_FORMAT = "memorag.memory"
"""Value of ``format`` in a memory file's safetensors metadata (key ``memorag``)."""
BUNDLE_FORMAT = "memorag.bundle"
"""Value of ``format`` in a bundle's ``manifest.json``."""
VERSION_MANIFEST_FORMAT = "memorag.collection-version"
"""Value of ``format`` in a collection version's ``manifest.json``."""
UNIT_SIDECAR_FORMAT = "memorag.memory-info"
"""Value of ``format`` in a unit's ``memory.json`` sidecar (header, sha256 and size of its memory file)."""


def _meta(description: str) -> dict[bytes, bytes]:
    return {b"description": description.encode()}


def _schema(name: str, cols: list[tuple[str, pa.DataType, bool, str]]) -> pa.Schema:
    return pa.schema(
        [pa.field(n, t, nullable=nullable, metadata=_meta(d)) for n, t, nullable, d in cols],
        metadata={b"memorag.table": name.encode(), b"memorag.schema_version": str(SCHEMA_VERSION).encode()},
    )


DOCUMENTS: pa.Schema = _schema("documents", [
    ("doc_id", pa.string(), False, "stable document id (given, or a content hash)"),
    ("text", pa.string(), False, "the document text, UTF-8"),
    ("metadata", pa.string(), True, "JSON object with the document's metadata (title, source, ...)"),
])

UNITS: pa.Schema = _schema("units", [
    ("unit_id", pa.string(), False, "content hash of (model id and revision, memory config, text)"),
    ("doc_ids", pa.list_(pa.string()), False, "documents packed into this unit, in order"),
    ("text", pa.string(), False, "the unit text that the memory read"),
    ("n_tokens", pa.int64(), False, "tokens of the unit text under the memory model's tokenizer"),
    ("start", pa.int64(), True, "char offset in the document when the unit is a span of one long document"),
    ("end", pa.int64(), True, "end char offset (exclusive) of that span"),
])

CHUNKS: pa.Schema = _schema("chunks", [
    ("chunk_id", pa.string(), False, "stable chunk id"),
    ("doc_id", pa.string(), False, "document the chunk comes from"),
    ("unit_id", pa.string(), False, "memory unit holding the chunk"),
    ("chunk_index", pa.int32(), False, "position of the chunk in its unit, from 0"),
    ("start", pa.int64(), False, "char offset of the chunk in the unit text"),
    ("end", pa.int64(), False, "end char offset (exclusive) in the unit text"),
    ("text", pa.string(), False, "chunk text"),
    ("embedding", pa.list_(pa.float32()), True, "dense embedding (float32), null before the embed stage"),
])

SUMMARIES: pa.Schema = _schema("summaries", [
    ("unit_id", pa.string(), True, "unit summarized; null for the collection summary"),
    ("summary", pa.string(), False, "the summary text"),
    ("key_points", pa.list_(pa.string()), True, "key points the memory model recalled"),
    ("model", pa.string(), False, "generator model id (and revision) that wrote the summary"),
])

QUARANTINE: pa.Schema = _schema("quarantine", [
    ("doc_id", pa.string(), True, "document id when known"),
    ("source", pa.string(), False, "where the document came from (file, line, URL)"),
    ("reason", pa.string(), False, "short machine-readable reason (empty, undecodable, too_long, ...)"),
    ("detail", pa.string(), True, "human-readable detail"),
])

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "documents": DOCUMENTS, "units": UNITS, "chunks": CHUNKS, "summaries": SUMMARIES, "quarantine": QUARANTINE,
}


def check_schema_version(found: Any, what: str) -> None:
    """Fail clearly when an artifact's schema version is missing, malformed or newer than this code knows.

    Args:
        found: the version recorded in the artifact. what: names the artifact in the message.

    Raises:
        SchemaVersionError: ``found`` > :data:`SCHEMA_VERSION` (upgrade memorag to read it).
        CorruptArtifactError: ``found`` is not a positive integer.
    """
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise CorruptArtifactError(f"{what}: schema version {found!r} is not a positive integer")
    if found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{what}: written with schema version {found}, this code reads up to {SCHEMA_VERSION}; upgrade memorag"
        )


def parse_versioned_json(text: str | bytes, what: str, fmt: str, describe: str) -> dict:
    """Parse one of our JSON artifacts: a dict whose ``format`` is ``fmt`` and whose schema version we can read.

    Args:
        text: the JSON text. what: names the artifact in errors. fmt: the expected ``format`` value.
        describe: what the artifact is, for the error (e.g. "a memorag bundle manifest").

    Raises:
        CorruptArtifactError: not JSON, not a dict, or another format. SchemaVersionError: a newer schema version.
    """
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptArtifactError(f"{what}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CorruptArtifactError(f"{what}: not {describe} (format {found!r})")
    check_schema_version(data.get("schema_version"), what)
    return data


def conform_table(table: pa.Table, kind: str) -> pa.Table:
    """Check that ``table`` has the columns of the ``kind`` schema and cast them to it; extra columns are kept.

    Raises:
        InvalidInputError: unknown kind, a missing column, a column that cannot be cast, or nulls in a non-null
            column, naming the column.
    """
    if kind not in TABLE_SCHEMAS:
        raise InvalidInputError(f"unknown table kind {kind!r}; expected one of {sorted(TABLE_SCHEMAS)}")
    schema = TABLE_SCHEMAS[kind]
    columns, out_fields = [], []
    for f in schema:
        if f.name not in table.column_names:
            raise InvalidInputError(f"{kind} table lacks column {f.name!r} (has {table.column_names})")
        col = table.column(f.name)
        if not f.nullable and col.null_count:
            raise InvalidInputError(f"{kind} table column {f.name!r} has {col.null_count} nulls; it may not")
        try:
            col = col.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InvalidInputError(f"{kind} table column {f.name!r} of type {col.type} is not {f.type}: {exc}")
        columns.append(col)
        out_fields.append(f)
    for name in table.column_names:
        if name not in schema.names:
            columns.append(table.column(name))
            out_fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(out_fields, metadata=schema.metadata))


@dataclass
class ModelRef:
    """A model that produced artifacts of a version."""

    id: str
    """Hub id or local path (the embedded default's ``embedded:...`` id)."""
    revision: str | None = None
    """Commit hash or version of the weights; None when unknown (a local folder)."""


@dataclass
class Manifest:
    """The manifest of one collection version (``collections/<c>/versions/<v>/manifest.json``).

    Readers trust nothing that is not listed here: every file and unit memory is recorded with its sha256 and
    size and verified on read. ``collection``, ``version``, ``created_at``, ``parent`` and ``files`` are filled
    in by :meth:`VersionWriter.publish`; callers fill ``models``, ``config``, ``units`` and ``stats``.
    """

    schema_version: int = SCHEMA_VERSION
    """Schema version of this manifest; a newer one than the code knows fails with SchemaVersionError."""
    collection: str = ""
    """Collection name."""
    version: str = ""
    """Version id (sortable: UTC time then random suffix)."""
    created_at: str = ""
    """ISO-8601 UTC time of publication."""
    parent: str | None = None
    """Version that was live when this one was published (None for the first)."""
    models: dict[str, ModelRef] = field(default_factory=dict)
    """Models by role (``memory``, ``embedder``, ``generator``) with their revisions."""
    config: dict[str, Any] = field(default_factory=dict)
    """The configuration that produced the version (JSON-serializable)."""
    units: dict[str, dict[str, Any]] = field(default_factory=dict)
    """unit_id -> {sha256, nbytes, storage_dtype} of ``units/<unit_id>/memory.safetensors``."""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Path relative to the version folder -> {sha256, nbytes}."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Counts and sizes for reports (documents, chunks, tokens, bytes ...)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else a job wants to record (JSON-serializable)."""

    def to_json(self) -> str:
        """Serialize to JSON text (sorted keys). Raises InvalidInputError if a field is not JSON-serializable."""
        data = {"format": VERSION_MANIFEST_FORMAT, **asdict(self)}
        try:
            return json.dumps(data, indent=1, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"manifest of {self.collection}/{self.version} is not JSON-serializable: {exc}")

    @classmethod
    def from_json(cls, text: str | bytes, what: str = "manifest") -> "Manifest":
        """Parse a manifest. Raises CorruptArtifactError (not JSON / wrong format) or SchemaVersionError."""
        data = parse_versioned_json(text, what, VERSION_MANIFEST_FORMAT, "a collection version manifest")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            logger.warning("%s: ignoring unknown fields %s", what, unknown)
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            kwargs["models"] = {role: ModelRef(**ref) for role, ref in (kwargs.get("models") or {}).items()}
            return cls(**kwargs)
        except TypeError as exc:
            raise CorruptArtifactError(f"{what}: malformed field ({exc})") from exc


STORAGE_DTYPES = ("keep", "int8", "fp8")
"""Storage choices of a memory file: the tensors' own dtype, or 8-bit with one float32 scale per (head, entry)."""


@dataclass
class MemoryFileHeader:
    """The JSON header of a memory file, stored in the safetensors metadata under the key ``memorag``.

    Tensor names in the file: ``layers.<i>.key`` / ``layers.<i>.value`` each ``(kv_heads, entries, head_dim)``;
    with 8-bit storage also ``layers.<i>.key_scale`` / ``layers.<i>.value_scale`` each
    ``(kv_heads, entries, 1)`` float32; optional ``extra.<name>`` tensors of any dtype.
    """

    layers: int
    """Number of layers (K and V tensors each)."""
    dtype: str
    """Original dtype of K/V (``float32``, ``bfloat16``, ``float16``); 8-bit storage dequantizes to it."""
    storage_dtype: str = "keep"
    """``keep`` (stored as ``dtype``), ``int8`` (absmax over head_dim, /127) or ``fp8`` (e4m3, absmax/448)."""
    extra: list[str] = field(default_factory=list)
    """Names of the extra tensors."""
    header: dict[str, Any] = field(default_factory=dict)
    """The memory's own header (model, model_revision, kind, ratio, window, raw_tokens, entries, ...)."""
    schema_version: int = SCHEMA_VERSION
    """Schema version of the memory file."""

    def to_json(self) -> str:
        """JSON text. Raises InvalidInputError if the memory header is not JSON-serializable."""
        try:
            return json.dumps({"format": MEMORY_FILE_FORMAT, **asdict(self)}, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"memory header is not JSON-serializable: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | None, what: str) -> "MemoryFileHeader":
        """Parse and validate. Raises CorruptArtifactError (missing/not JSON/wrong format) or SchemaVersionError."""
        if text is None:
            raise CorruptArtifactError(f"{what}: safetensors file without a memorag header (not a memory file)")
        data = parse_versioned_json(text, what, MEMORY_FILE_FORMAT, "a memorag memory header")
        data.pop("format")
        known = {f.name for f in fields(cls)}
        try:
            out = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise CorruptArtifactError(f"{what}: malformed memory header ({exc})") from exc
        if out.storage_dtype not in STORAGE_DTYPES or not isinstance(out.layers, int) or out.layers < 1:
            raise CorruptArtifactError(f"{what}: bad storage_dtype {out.storage_dtype!r} or layers {out.layers!r}")
        return out
