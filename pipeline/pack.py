"""Pack documents into memory units: small ones together, a long one split; ids are content hashes.

Three steps, so that the only global decision (which documents share a unit) is made on tiny metadata:

1. :class:`TokenizeSplitStage` (Ray Data, parallel): tokenizes each valid document with the memory model's
   tokenizer and cuts one longer than ``unit_tokens`` into pieces of at most ``unit_tokens`` tokens (at token
   boundaries, by character offsets). Each piece is an *item* ``(doc_id, part, text, n_tokens, doc_start,
   doc_end)``.
2. :func:`plan_units` (driver, over ``(doc_id, part, n_tokens)`` only): walks the items in sorted order and
   groups whole small documents greedily up to ``unit_tokens``; a piece of a split document is a unit of its own.
   Packing is *content-defined*: a group also ends after any document whose ``sha256(doc_id) % boundary_every ==
   0``, so adding or removing a document changes only the unit it lands in (and rarely its neighbour through the
   size cap), never every unit after it. That is what lets an incremental run memorize only new units.
3. :func:`build_unit` (Ray Data ``map_groups``): joins a group's items, in order, with ``separator``.

A unit's id is :func:`unit_id_for` ``(memory fingerprint, unit text)``, computed where the memory model is loaded
(the memory stage), so the same text under another model or memory config is another unit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import pyarrow as pa

from pipeline.config import PackConfig

logger = logging.getLogger(__name__)

ITEM_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("part", pa.int64()), ("text", pa.string()), ("n_tokens", pa.int64()),
    ("doc_start", pa.int64()), ("doc_end", pa.int64()),
])
UNIT_ROW_SCHEMA = pa.schema([
    ("pack_key", pa.string()), ("text", pa.string()), ("n_tokens", pa.int64()), ("members", pa.string()),
    ("doc_ids", pa.list_(pa.string())),
])


def unit_id_for(fingerprint: str, text: str, storage_dtype: str = "keep") -> str:
    """Content-addressed unit id: sha256 over the memory fingerprint, the unit text and, for 8-bit storage, the
    storage dtype (64 hex chars).

    The memory file's bytes depend on its storage dtype, so an int8 unit and a kept-dtype unit of the same text
    are different units (a kept-dtype id is the same as before 8-bit storage existed, so old stores resume).
    """
    h = hashlib.sha256()
    h.update(fingerprint.encode("utf-8"))
    h.update(b"\x00")
    h.update(text.encode("utf-8"))
    if storage_dtype != "keep":
        h.update(b"\x00storage=" + storage_dtype.encode("utf-8"))
    return h.hexdigest()


def is_boundary(doc_id: str, every: int) -> bool:
    """Whether a unit ends after this document (content-defined packing boundary)."""
    return int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:12], 16) % every == 0


class TokenizeSplitStage:
    """Ray Data batch fn: validated documents -> items (``ITEM_SCHEMA``), splitting long documents.

    The tokenizer (the memory model's) is loaded lazily, once per worker process that runs the fn.
    """

    def __init__(self, model: str | None, config: PackConfig, load_options=None):
        self.model, self.config, self.load_options = model, config, load_options
        self._tok = None

    def _tokenizer(self):
        if self._tok is None:
            from memorag_core.models import LoadOptions, load_tokenizer

            self._tok = load_tokenizer(self.model, self.load_options or LoadOptions())
        return self._tok

    def split(self, text: str) -> list[tuple[int, int, int]]:
        """Cut ``text`` into ``(char_start, char_end, n_tokens)`` pieces of at most ``unit_tokens`` tokens that
        cover it exactly (a piece boundary sits at the start of a token)."""
        enc = self._tokenizer()(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        n, cap = len(offsets), self.config.unit_tokens
        if n <= cap:
            return [(0, len(text), n)]
        pieces = []
        for k in range(0, n, cap):
            start = 0 if k == 0 else offsets[k][0]
            end = len(text) if k + cap >= n else offsets[k + cap][0]
            pieces.append((start, end, min(cap, n - k)))
        return pieces

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = {name: [] for name in ITEM_SCHEMA.names}
        for doc_id, text in zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist()):
            for part, (a, b, n) in enumerate(self.split(text)):
                out["doc_id"].append(doc_id)
                out["part"].append(part)
                out["text"].append(text[a:b])
                out["n_tokens"].append(n)
                out["doc_start"].append(a)
                out["doc_end"].append(b)
        return pa.Table.from_pydict(out, schema=ITEM_SCHEMA)


@dataclass(frozen=True)
class PlannedItem:
    """One item in a packing plan: which group (future unit) it joins."""

    doc_id: str
    part: int
    n_tokens: int
    group: str


def plan_units(items: list[tuple[str, int, int]], config: PackConfig, split_docs: set[str] | None = None,
               separator_tokens: int = 1) -> list[PlannedItem]:
    """Assign each item ``(doc_id, part, n_tokens)`` to a group; deterministic for a given set of items.

    Args:
        items: every item of the corpus, any order (sorted here by ``(doc_id, part)``).
        config: ``unit_tokens`` cap and ``boundary_every``.
        split_docs: ids of documents cut into several pieces (each piece is its own unit); derived from
            ``part > 0`` when not given.
        separator_tokens: tokens counted for each separator between packed documents.
    Returns:
        The items in order, each with its group key (``"<first doc_id>\\x1f<part>"``).
    """
    ordered = sorted(items)
    if split_docs is None:
        split_docs = {d for d, p, _ in ordered if p > 0}
    plan: list[PlannedItem] = []
    group: str | None = None
    used = 0
    for doc_id, part, n_tokens in ordered:
        if doc_id in split_docs:
            group = None  # a piece stands alone, and closes any open group
            plan.append(PlannedItem(doc_id, part, n_tokens, f"{doc_id}\x1f{part}"))
            continue
        if group is not None and used + separator_tokens + n_tokens > config.unit_tokens:
            group = None
        if group is None:
            group, used = f"{doc_id}\x1f{part}", n_tokens
        else:
            used += separator_tokens + n_tokens
        plan.append(PlannedItem(doc_id, part, n_tokens, group))
        if is_boundary(doc_id, config.boundary_every):
            group = None
    return plan


def plan_table(plan: list["PlannedItem"]) -> pa.Table:
    """The packing plan as an Arrow table ``(doc_id, part, group)``: what :class:`AssignGroups` reads."""
    return pa.table({"doc_id": pa.array([p.doc_id for p in plan], pa.string()),
                     "part": pa.array([p.part for p in plan], pa.int64()),
                     "group": pa.array([p.group for p in plan], pa.string())})


class AssignGroups:
    """Ray Data batch fn: add the ``group`` column from the packing plan (:func:`plan_table`).

    ``plan`` is the plan table, or on Ray an ``ObjectRef`` to it (``ray.put(plan_table(...))``): every map task then
    reads the one copy in the object store (Arrow, zero-copy, shared by the workers of a node) instead of carrying a
    pickled per-item dict (~300 bytes an item: ~600 MB per task at 2M items). Each batch joins only the plan rows of
    its own documents (a vectorized ``is_in`` filter, then a hash join). Row order is not kept (units are built by
    group and sorted). Raises InvalidInputError for an item the plan does not know.
    """

    def __init__(self, plan):
        self.plan = plan

    def _table(self) -> pa.Table:
        if isinstance(self.plan, pa.Table):
            return self.plan
        import ray

        return ray.get(self.plan)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        from memorag_core.errors import InvalidInputError

        plan = self._table()
        mine = plan.filter(pc.is_in(plan.column("doc_id"), value_set=pc.unique(batch.column("doc_id"))))
        out = batch.join(mine, keys=["doc_id", "part"], join_type="left outer")
        if out.column("group").null_count:
            row = out.filter(pc.is_null(out.column("group"))).slice(0, 1).to_pylist()[0]
            raise InvalidInputError(f"item ({row['doc_id']!r}, part {row['part']}) is not in the packing plan")
        return out.select([*batch.column_names, "group"])


class BuildUnit:
    """``map_groups`` fn: the items of one group -> one unit row (``UNIT_ROW_SCHEMA``).

    ``members`` is JSON: a list of ``{doc_id, part, doc_start, doc_end, unit_start, unit_end}`` (character
    offsets), so chunks can point back at their document.
    """

    def __init__(self, separator: str):
        self.separator = separator
        self.__name__ = type(self).__name__  # Ray Data names the operator after its fn

    def __call__(self, group: pa.Table) -> pa.Table:
        # Exact duplicates of one (doc_id, part) (identical rows of a Parquet file) are kept once.
        rows = list({(r["doc_id"], r["part"]): r for r in sorted(
            group.to_pylist(), key=lambda r: (r["doc_id"], r["part"], r["text"]), reverse=True)}.values())[::-1]
        rows.sort(key=lambda r: (r["doc_id"], r["part"]))
        texts, members, pos = [], [], 0
        for i, r in enumerate(rows):
            if i:
                pos += len(self.separator)
            texts.append(r["text"])
            members.append({"doc_id": r["doc_id"], "part": r["part"], "doc_start": r["doc_start"],
                            "doc_end": r["doc_end"], "unit_start": pos, "unit_end": pos + len(r["text"])})
            pos += len(r["text"])
        row = {
            "pack_key": rows[0]["group"],
            "text": self.separator.join(texts),
            "n_tokens": sum(r["n_tokens"] for r in rows),
            "members": json.dumps(members, ensure_ascii=False),
            "doc_ids": sorted({r["doc_id"] for r in rows}),
        }
        return pa.Table.from_pylist([row], schema=UNIT_ROW_SCHEMA)


def units_dataset(items: pa.Table, build_unit, max_blocks: int):
    """Group planned items (a table with ``group``) into unit rows on the driver, as ``groupby("group")
    .map_groups(build_unit)`` does, and return them as a Ray Dataset of up to ``max_blocks`` blocks (so that the
    actor pools share the work)."""
    import ray.data

    index: dict[str, list[int]] = {}
    for i, g in enumerate(items.column("group").to_pylist()):
        index.setdefault(g, []).append(i)
    units = pa.concat_tables([build_unit(items.take(index[g])) for g in sorted(index)])
    n = max(1, min(units.num_rows, max_blocks))
    step = -(-units.num_rows // n)
    return ray.data.from_arrow([units.slice(k, step) for k in range(0, units.num_rows, step)])
