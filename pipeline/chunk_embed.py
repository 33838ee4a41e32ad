"""The chunk + embed stage: split each unit's documents into retrieval chunks and embed them, plus the unit gist.

:class:`ChunkEmbedStage` is a Ray Data callable class (actor pool; the embedder is loaded once per actor). Chunks
never straddle two documents: each member span of a unit (see ``pipeline.pack.BuildUnit``) is split on its own
with :class:`memorag_core.retrieval.TokenChunker`, using the embedder's own tokenizer when it has a fast one (so a
chunk of ``chunk_tokens`` is what the embedder reads, not truncated), else the memory model's.

Per unit, the chunk table (``memorag_core.store.schemas.CHUNKS`` columns, plus ``doc_start``/``doc_end``: the
offsets in the document, and ``faiss_id``) is written as Parquet to a content-addressed staging file::

    <store>/staging/chunks/<embed_key>/<unit_id>.parquet

where ``embed_key`` hashes the embedder, the chunker and its tokenizer. A rerun (resume, or a new version that
keeps the unit) reads the file instead of embedding again. Each unit's chunks are embedded in their own
``encode`` call, so a vector never depends on which other units shared the batch: the staged bytes are the same
whichever run wrote them.

Output rows (:func:`embed_out_schema`): the unit's row from the memory stage with ``chunks_path``, ``n_chunks``,
``embedded`` (False when read from staging) and ``gist_embedding``. Embeddings are arrays throughout: the staged
``embedding`` column and ``gist_embedding`` are ``fixed_size_list<float32>[dim]`` built from the embedder's
``(n, dim)`` output, never Python lists of floats.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ChunkEmbedConfig

logger = logging.getLogger(__name__)

EMBED_OUT_SCHEMA = pa.schema([
    ("unit_id", pa.string()), ("n_tokens", pa.int64()), ("doc_ids", pa.list_(pa.string())),
    ("raw_tokens", pa.int64()), ("entries", pa.int64()), ("memory_sha256", pa.string()),
    ("memory_nbytes", pa.int64()), ("storage_dtype", pa.string()), ("memorized", pa.bool_()),
    ("seconds", pa.float64()), ("gist", pa.string()), ("text", pa.string()), ("members", pa.string()),
    ("chunks_path", pa.string()), ("n_chunks", pa.int64()), ("embedded", pa.bool_()),
    ("gist_embedding", pa.list_(pa.float32())), ("fingerprint", pa.string()), ("model_id", pa.string()),
    ("model_revision", pa.string()),
])


def embed_out_schema(dim: int) -> pa.Schema:
    """:data:`EMBED_OUT_SCHEMA` with ``gist_embedding`` as ``fixed_size_list<float32>[dim]`` (what the stage
    emits: one Arrow array per column, no Python list per vector)."""
    i = EMBED_OUT_SCHEMA.get_field_index("gist_embedding")
    return EMBED_OUT_SCHEMA.set(i, pa.field("gist_embedding", pa.list_(pa.float32(), dim)))


def chunk_id_for(unit_id: str, start: int, end: int) -> str:
    """Stable chunk id: sha256 of (unit id, char span in the unit), 32 hex chars."""
    return hashlib.sha256(f"{unit_id}:{start}:{end}".encode()).hexdigest()[:32]


def faiss_id_for(key: str) -> int:
    """A non-negative int64 FAISS id from a hex id (its first 15 hex digits, < 2**60)."""
    return int(key[:15], 16)


def parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet bytes (zstd, no statistics that vary) of a table."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


class ChunkEmbedStage:
    """Ray Data callable class: memory-stage rows -> ``EMBED_OUT_SCHEMA`` rows (chunks staged in the store).

    Args:
        config: chunk size, embedder and batch sizes.
        store_url, storage_options: the store whose ``staging/`` folder caches per-unit chunk tables.
        fallback_tokenizer: model name whose tokenizer chunks when the embedder has no fast tokenizer.
    """

    def __init__(self, config: ChunkEmbedConfig, store_url: str, storage_options: dict | None = None,
                 fallback_tokenizer: str | None = None):
        from memorag_core.models import load_tokenizer
        from memorag_core.retrieval import EmbedderConfig, TokenChunker, load_embedder
        from memorag_core.store import fs as sfs

        self.config = config
        self.embedder = load_embedder(EmbedderConfig(model=config.embedder, batch_size=config.encode_batch_size))
        tok = getattr(self.embedder, "tokenizer", None) or getattr(getattr(self.embedder, "model", None),
                                                                   "tokenizer", None)
        if tok is None or not getattr(tok, "is_fast", False):
            tok = load_tokenizer(fallback_tokenizer)
        # A chunk must fit the embedder, or its tail is never embedded: an unset chunk_tokens takes the embedder's
        # limit (logged), a configured one above it is refused (memorag_core.retrieval.chunk_size_for).
        from memorag_core.retrieval import chunk_size_for, max_chunk_tokens

        limit = max_chunk_tokens(self.embedder)
        chunk = config.chunk_tokens
        if limit and chunk > limit and "chunk_tokens" not in config.model_fields_set:
            logger.info("chunk_tokens defaults to the embedder's limit: %d tokens", limit)
            chunk = limit
        self.chunk_tokens = chunk_size_for(self.embedder, chunk) if tok is getattr(self.embedder, "tokenizer",
                                                                                   None) else chunk
        self.chunker = TokenChunker(tok, chunk_size=self.chunk_tokens)
        self.fs, root = sfs.open_url(store_url, storage_options)
        self.sfs = sfs
        self.embed_key = self.key(config, tok, self.embedder)
        self.dir = sfs.join(root, "staging", "chunks", self.embed_key)

    @staticmethod
    def key(config: ChunkEmbedConfig, tokenizer, embedder) -> str:
        """Hash of what decides a unit's chunks and vectors: embedder, its dim, chunk size, tokenizer vocab."""
        from memorag_core.models import EMBEDDED_EMBEDDER

        vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
        spec = {"embedder": config.embedder or EMBEDDED_EMBEDDER, "dim": int(embedder.dim),
                "chunk_tokens": config.chunk_tokens, "tokenizer": vocab, "encode_batch": config.encode_batch_size}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def chunk_unit(self, unit_id: str, text: str, members: list[dict]) -> pa.Table:
        """Split and embed one unit's documents: a CHUNKS table sorted by position in the unit."""
        rows = []
        for m in members:
            span = text[m["unit_start"]:m["unit_end"]]
            for c in self.chunker.split(span):
                start, end = m["unit_start"] + c.start, m["unit_start"] + c.end
                cid = chunk_id_for(unit_id, start, end)
                rows.append({"chunk_id": cid, "doc_id": m["doc_id"], "unit_id": unit_id, "start": start,
                             "end": end, "text": c.text, "doc_start": m["doc_start"] + c.start,
                             "doc_end": m["doc_start"] + c.end, "faiss_id": faiss_id_for(cid)})
        for i, r in enumerate(rows):
            r["chunk_index"] = i
        vecs = (self.embedder.encode([r["text"] for r in rows], batch_size=self.config.encode_batch_size)
                if rows else np.zeros((0, self.embedder.dim), np.float32))  # (n_chunks, dim)
        from pipeline.index import embedding_array

        dim = int(self.embedder.dim)
        schema = pa.schema([("chunk_id", pa.string()), ("doc_id", pa.string()), ("unit_id", pa.string()),
                            ("chunk_index", pa.int32()), ("start", pa.int64()), ("end", pa.int64()),
                            ("text", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
                            ("doc_start", pa.int64()), ("doc_end", pa.int64()), ("faiss_id", pa.int64())])
        cols = {name: pa.array([r[name] for r in rows], schema.field(name).type)
                for name in schema.names if name != "embedding"}
        cols["embedding"] = embedding_array(np.asarray(vecs, np.float32).reshape(len(rows), dim))  # (n_chunks, dim)
        return pa.Table.from_pydict(cols, schema=schema)

    def process(self, row: dict) -> tuple[dict, np.ndarray]:
        """Chunk + embed one unit (or read its staged chunks); returns the output row (without its gist
        embedding) and the gist embedding ``(dim,)``."""
        unit_id = row["unit_id"]
        path = self.sfs.join(self.dir, f"{unit_id}.parquet")
        embedded = not self.sfs.with_retries(lambda: self.fs.exists(path), what=f"stat {path}")
        if embedded:
            table = self.chunk_unit(unit_id, row["text"], json.loads(row["members"]))
            self.sfs.write_atomic(self.fs, path, parquet_bytes(table))
            n = table.num_rows
        else:
            n = pq.ParquetFile(io.BytesIO(bytes(self.sfs.read_all(self.fs, path)))).metadata.num_rows
        gist_vec = self.embedder.encode([row["gist"] or " "])[0].astype(np.float32)  # (dim,)
        out = {k: row[k] for k in EMBED_OUT_SCHEMA.names if k in row}
        out.update(chunks_path=path, n_chunks=n, embedded=embedded)
        return out, gist_vec

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Unit rows -> ``embed_out_schema(dim)`` rows; the gist embeddings as one ``(units, dim)`` array column."""
        from pipeline.index import embedding_array

        done = [self.process(r) for r in batch.to_pylist()]
        schema = embed_out_schema(int(self.embedder.dim))
        cols = {f.name: pa.array([r[f.name] for r, _ in done], f.type) for f in schema if f.name != "gist_embedding"}
        gists = np.stack([g for _, g in done]) if done else np.zeros((0, self.embedder.dim), np.float32)
        cols["gist_embedding"] = embedding_array(gists)  # (units, dim)
        return pa.table([cols[n] for n in schema.names], schema=schema)
