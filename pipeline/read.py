"""Read a corpus with Ray Data into raw document rows.

Inputs: a JSONL file, a Parquet file, or a folder of ``.txt`` / ``.jsonl`` / ``.parquet`` files (searched
recursively), local or any fsspec URL (``s3://``). Every format becomes the same row schema, ``RAW_COLUMNS``:

* ``doc_id`` (str): from ``id_column`` when present, else derived from the path (see :class:`CorpusConfig`);
  ``""`` when the row could not be parsed at all.
* ``raw`` (binary): the document text as bytes, not decoded yet: decoding is the validate stage's job, so that a
  non-UTF-8 document is quarantined with a reason instead of failing the read.
* ``source`` (str): the file path relative to the corpus root, ``position`` (int64): line number (JSONL, 1-based)
  or 0.
* ``meta`` (str): the row's other fields as a JSON object (JSONL, Parquet), ``"{}"`` for text files.
* ``error`` (str): ``""``, or why the row is malformed (bad JSON, missing text column, text not a string).

Text and JSONL files are read with ``ray.data.read_binary_files`` (one file per row, then split into lines), so
one JSONL file should stay well below a worker's memory: shard big corpora into many files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from typing import Any

import fsspec
import pyarrow as pa

from memorag_core.errors import InvalidInputError
from pipeline.config import CorpusConfig

logger = logging.getLogger(__name__)

RAW_COLUMNS = ("doc_id", "raw", "source", "position", "meta", "error")
_EXT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text"}


def _format_of(path: str) -> str | None:
    for ext, fmt in _EXT.items():
        if path.endswith(ext):
            return fmt
    return None


def list_corpus_files(config: CorpusConfig, sizes: dict[str, int] | None = None) -> tuple[str, Any, str, list[str]]:
    """Find the corpus files: ``(format, fs, root_path, sorted file paths)``; a folder costs one recursive listing
    (S3: one request per 1,000 keys), whose sizes go into ``sizes`` (path -> bytes) when a dict is given.

    Raises:
        InvalidInputError: the URL does not exist, holds no readable file, or mixes formats.
    """
    fs, root = fsspec.core.url_to_fs(config.url, **config.storage_options)
    if not fs.exists(root):
        raise InvalidInputError(f"corpus {config.url!r} does not exist")
    if fs.isdir(root):
        found = fs.find(root, detail=True)
        files = sorted(p for p in found if _format_of(p) is not None
                       and not posixpath.basename(p).startswith((".", "_")))
        if sizes is not None:
            sizes.update({p: int(found[p].get("size") or 0) for p in files})
        base = root.rstrip("/")
    else:
        files = [root]
        if sizes is not None:
            sizes[root] = int(fs.size(root) or 0)
        base = posixpath.dirname(root)
    if config.format != "auto":
        files = [p for p in files if _format_of(p) == config.format] if len(files) > 1 or fs.isdir(root) else files
        fmt = config.format
    else:
        fmts = {_format_of(p) for p in files}
        if None in fmts:
            raise InvalidInputError(f"corpus file {files[0]!r} has no known extension (.jsonl, .parquet, .txt); "
                                    "set corpus.format")
        if len(fmts) > 1:
            raise InvalidInputError(f"corpus {config.url!r} mixes formats {sorted(fmts)}; set corpus.format")
        fmt = fmts.pop() if fmts else "text"
    if not files:
        raise InvalidInputError(f"corpus {config.url!r} holds no {config.format} files")
    return fmt, fs, base, files


def _rel(path: str, base: str) -> str:
    path = path.split("://", 1)[-1]
    base = base.split("://", 1)[-1]
    if base and path.startswith(base.rstrip("/") + "/"):
        return path[len(base.rstrip("/")) + 1:]
    return posixpath.basename(path)


def _raw_row(doc_id: str, raw: bytes, source: str, position: int, meta: str = "{}", error: str = "") -> dict:
    return {"doc_id": doc_id, "raw": raw, "source": source, "position": position, "meta": meta, "error": error}


class TextFilesToRows:
    """Ray Data batch fn: ``read_binary_files`` rows (``bytes``, ``path``) -> raw document rows, one per file."""

    def __init__(self, base: str):
        self.base = base

    def __call__(self, batch: dict) -> dict:
        rows = []
        for data, path in zip(batch["bytes"], batch["path"]):
            rel = _rel(str(path), self.base)
            doc_id = rel[:-4] if rel.endswith(".txt") else rel
            rows.append(_raw_row(doc_id, bytes(data), rel, 0))
        return _columns(rows)


class JsonlFilesToRows:
    """Ray Data batch fn: ``read_binary_files`` rows -> one raw document row per non-blank JSONL line.

    A line that is not UTF-8, not JSON, not an object, lacks the text column, or whose text is not a string
    becomes a row with ``error`` set (the validate stage quarantines it); the read itself never fails on data.
    """

    def __init__(self, base: str, text_column: str, id_column: str | None):
        self.base, self.text_column, self.id_column = base, text_column, id_column

    def _line(self, rel: str, lineno: int, line: bytes) -> dict:
        fallback_id = f"{rel}:{lineno}"
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            # The text may still be recoverable by a human: keep the bytes, validate reports "not UTF-8".
            return _raw_row(fallback_id, line, rel, lineno, error=f"not UTF-8: {exc.reason} at byte {exc.start}")
        except json.JSONDecodeError as exc:
            return _raw_row(fallback_id, line, rel, lineno, error=f"malformed JSON: {exc.msg} at column {exc.colno}")
        if not isinstance(obj, dict):
            return _raw_row(fallback_id, line, rel, lineno, error=f"malformed: a JSON {type(obj).__name__}, "
                                                                  "not an object")
        doc_id = obj.pop(self.id_column, None) if self.id_column else None
        if doc_id is not None and not isinstance(doc_id, (str, int)):
            return _raw_row(fallback_id, line, rel, lineno,
                            error=f"malformed: {self.id_column!r} is a {type(doc_id).__name__}, not a string")
        doc_id = fallback_id if doc_id is None or doc_id == "" else str(doc_id)
        if self.text_column not in obj:
            return _raw_row(doc_id, line, rel, lineno, error=f"malformed: no {self.text_column!r} field")
        text = obj.pop(self.text_column)
        if not isinstance(text, str):
            return _raw_row(doc_id, line, rel, lineno,
                            error=f"malformed: {self.text_column!r} is a {type(text).__name__}, not a string")
        # surrogatepass keeps lone surrogates (valid JSON escapes) as bytes that fail strict decoding later.
        raw = text.encode("utf-8", errors="surrogatepass")
        return _raw_row(doc_id, raw, rel, lineno, meta=json.dumps(obj, sort_keys=True, ensure_ascii=False))

    def __call__(self, batch: dict) -> dict:
        rows = []
        for data, path in zip(batch["bytes"], batch["path"]):
            rel = _rel(str(path), self.base)
            for lineno, line in enumerate(bytes(data).split(b"\n"), start=1):
                if line.strip():
                    rows.append(self._line(rel, lineno, line.rstrip(b"\r")))
        return _columns(rows)


class ParquetToRows:
    """Ray Data batch fn: ``read_parquet`` rows (with ``path``) -> raw document rows.

    The text column may be string or binary (binary is decoded by validate); any other type is malformed.
    """

    def __init__(self, base: str, text_column: str, id_column: str | None):
        self.base, self.text_column, self.id_column = base, text_column, id_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        others = [c for c in batch.column_names if c not in (self.text_column, self.id_column, "path")]
        texts = batch.column(self.text_column).to_pylist()
        ids = batch.column(self.id_column).to_pylist() if self.id_column in batch.column_names else [None] * len(texts)
        paths = batch.column("path").to_pylist()
        other_vals = {c: batch.column(c).to_pylist() for c in others}
        for i, (text, doc_id, path) in enumerate(zip(texts, ids, paths)):
            rel = _rel(path, self.base)
            meta = json.dumps({c: other_vals[c][i] for c in others}, sort_keys=True, ensure_ascii=False, default=str)
            if text is None:
                rows.append(_raw_row(str(doc_id or f"{rel}#null"), b"", rel, 0, meta, f"malformed: null "
                                                                                        f"{self.text_column!r}"))
                continue
            raw = text if isinstance(text, bytes) else str(text).encode("utf-8", errors="surrogatepass")
            if doc_id is None or doc_id == "":
                doc_id = f"{rel}#{hashlib.sha256(raw).hexdigest()[:16]}"
            rows.append(_raw_row(str(doc_id), raw, rel, 0, meta))
        return pa.Table.from_pydict(_columns(rows), schema=RAW_SCHEMA)


RAW_SCHEMA = pa.schema([("doc_id", pa.string()), ("raw", pa.binary()), ("source", pa.string()),
                        ("position", pa.int64()), ("meta", pa.string()), ("error", pa.string())])


def _columns(rows: list[dict]) -> dict:
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA) if rows else RAW_SCHEMA.empty_table()


def read_corpus(config: CorpusConfig):
    """Build the Ray Dataset of raw document rows (``RAW_SCHEMA``) for a corpus.

    Raises:
        InvalidInputError: no corpus files, mixed formats, or a Parquet file without the text column.
    """
    import pyarrow.fs as pafs
    import ray.data

    fmt, fs, base, files = list_corpus_files(config)
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    logger.info("reading %d %s file(s) from %s", len(files), fmt, config.url)
    if fmt == "parquet":
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.parquet as pq

        def names(path: str) -> list[str]:
            with fs.open(path, "rb") as fh:
                return pq.ParquetFile(fh).schema_arrow.names

        # footers read concurrently (a few ranged GETs each), not one file after another
        with ThreadPoolExecutor(max_workers=min(32, len(files))) as pool:
            for path, cols in zip(files, pool.map(names, files)):
                if config.text_column not in cols:
                    raise InvalidInputError(f"Parquet file {path!r} has no text column {config.text_column!r} "
                                            f"(columns: {cols})")
        ds = ray.data.read_parquet(files, filesystem=filesystem, include_paths=True)
        return ds.map_batches(ParquetToRows(base, config.text_column, config.id_column), batch_format="pyarrow")
    ds = ray.data.read_binary_files(files, filesystem=filesystem, include_paths=True)
    if fmt == "jsonl":
        fn = JsonlFilesToRows(base, config.text_column, config.id_column)
    else:
        fn = TextFilesToRows(base)
    return ds.map_batches(fn, batch_format="numpy", batch_size=16)



def corpus_nbytes(config: CorpusConfig) -> int:
    """Total size in bytes of the corpus files (what decides whether the job prepares it on the driver)."""
    sizes: dict[str, int] = {}
    _, _, _, files = list_corpus_files(config, sizes)
    return int(sum(sizes[p] for p in files))  # from the listing: no request per file


def read_corpus_table(config: CorpusConfig) -> pa.Table:
    """Read a (small) corpus in this process into a ``RAW_SCHEMA`` table.

    The same row functions as :func:`read_corpus` run over the same files in the same order, so the rows are the
    ones the Ray Data read yields; the job uses this for corpora below ``MemorizeJobConfig.local_prepare_bytes``,
    where starting Ray Data tasks costs more than the work.

    Raises:
        InvalidInputError: as :func:`read_corpus`.
    """
    import pyarrow.parquet as pq

    fmt, fs, base, files = list_corpus_files(config)
    logger.info("reading %d %s file(s) from %s on the driver", len(files), fmt, config.url)
    tables = []
    if fmt == "parquet":
        fn = ParquetToRows(base, config.text_column, config.id_column)
        for path in files:
            with fs.open(path, "rb") as fh:
                table = pq.read_table(fh)
            if config.text_column not in table.column_names:
                raise InvalidInputError(f"Parquet file {path!r} has no text column {config.text_column!r} "
                                        f"(columns: {table.column_names})")
            tables.append(fn(table.append_column("path", pa.array([path] * table.num_rows, pa.string()))))
    else:
        fn = (JsonlFilesToRows(base, config.text_column, config.id_column) if fmt == "jsonl"
              else TextFilesToRows(base))
        for k in range(0, len(files), 16):
            paths = files[k:k + 16]
            data = fs.cat(paths) if len(paths) > 1 else {paths[0]: fs.cat_file(paths[0])}  # concurrent on S3
            out = fn({"bytes": [data[p] for p in paths], "path": paths})
            tables.append(out if isinstance(out, pa.Table) else pa.Table.from_pydict(out, schema=RAW_SCHEMA))
    return pa.concat_tables(tables) if tables else RAW_SCHEMA.empty_table()
