"""Routing and evidence retrieval over a published collection version: embed, search the shards, fuse.

:class:`EvidenceRetriever` holds the embedder the collection was built with (read from the manifest; a different
one is refused by name) and answers two calls that a Serve deployment can make on their own:

* :meth:`EvidenceRetriever.route`: which units should write clues. Half come from the question's best dense hits
  (the units that hold them), the rest from the router over unit gists; one source fills in when the other runs
  short.
* :meth:`EvidenceRetriever.retrieve`: the question and the clues become rankings over all shards, fused by
  :func:`memorag_core.retrieval.fusion.fuse` (the question's ranking weighs most), mapped to passages with their
  ``doc_id``, ``unit_id``, ``chunk_id`` and score.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from memorag_core.errors import InvalidInputError
from memorag_core.query.types import Evidence, QueryRequest, RoutedUnit, UnitClues
from memorag_core.retrieval.fusion import FusionConfig, fuse
from memorag_core.retrieval.queries import ClueSet, CorpusGrounder, PlanConfig, plan_queries, rankings_for

logger = logging.getLogger(__name__)


def spread(items: list[str], k: int) -> list[str]:
    """``k`` items evenly spaced over ``items`` (all when there are at most ``k``), in order."""
    if len(items) <= k:
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


class UnitGrounder:
    """Grounds recalled spans in the chunks of the units whose memories wrote them (word-trigram overlap,
    :class:`~memorag_core.retrieval.queries.CorpusGrounder` per unit, cached). The facade's bundle is one unit,
    so a span is grounded the same way there and in a sharded collection."""

    def __init__(self, view, unit_ids: list[str], cache: "OrderedDict") -> None:
        self.parts = []
        for uid in dict.fromkeys(unit_ids):
            key = (view.name, view.version, uid)
            g = cache.get(key)
            if g is None:
                rows = view.rows_of_units([uid]).tolist()
                g = CorpusGrounder([view.row(r)["text"] for r in rows], rows)
                cache[key] = g
                while len(cache) > 256:
                    cache.popitem(last=False)
            else:
                cache.move_to_end(key)
            self.parts.append(g)

    def ground(self, span: str, min_overlap: float = 0.5):
        """(row, overlap) best first over every unit's chunks (see :meth:`CorpusGrounder.ground`)."""
        found = [hit for g in self.parts for hit in g.ground(span, min_overlap)]
        return sorted(found, key=lambda kv: -kv[1])


class EvidenceRetriever:
    """Embeds queries with the collection's embedder and searches its sharded index.

    Args:
        catalog: the :class:`~memorag_core.query.catalog.CollectionCatalog`.
        plan: how the question and the clues become rankings and fused evidence (the same
            :class:`~memorag_core.retrieval.queries.PlanConfig` as the facade's and the evaluation's).
        fusion: shorthand that replaces ``plan.fusion``.
        embedder_override: an embedder folder to use instead of the manifest's (must give the same dimension;
            it is logged, since vectors from another model do not match the index).
        device: embedder device (``auto``, ``cpu``, ``cuda``).
    """

    def __init__(self, catalog, *, plan: PlanConfig | None = None, fusion: FusionConfig | None = None,
                 embedder_override: str | None = None, device: str = "auto") -> None:
        self.catalog = catalog
        plan = plan or PlanConfig()
        self.plan = dataclasses.replace(plan, fusion=fusion) if fusion is not None else plan
        self.embedder_override = embedder_override
        self.device = device
        self._embedders: dict[str, Any] = {}
        self._grounders: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @property
    def fusion(self) -> FusionConfig:
        return self.plan.fusion

    def embedder_for(self, view):
        """The embedder of ``view``'s collection (loaded once per embedder id)."""
        from memorag_core.models import EMBEDDED_EMBEDDER
        from memorag_core.retrieval import EmbedderConfig, load_embedder

        name = self.embedder_override or view.embedder_id or EMBEDDED_EMBEDDER
        with self._lock:
            emb = self._embedders.get(name)
            if emb is None:
                batch = int((view.manifest.config.get("chunk_embed") or {}).get("encode_batch_size", 32))
                emb = load_embedder(EmbedderConfig(model=None if name == EMBEDDED_EMBEDDER else name,
                                                   device=self.device, batch_size=batch))
                self._embedders[name] = emb
        if emb.dim != view.dim:
            raise InvalidInputError(f"embedder {name!r} gives {emb.dim}-d vectors but collection {view.name!r} "
                                    f"was indexed with {view.embedder_id!r} ({view.dim}-d)")
        if self.embedder_override and view.embedder_id and self.embedder_override != view.embedder_id:
            logger.warning("collection %s was embedded with %s; querying with %s", view.name, view.embedder_id,
                           self.embedder_override)
        return emb

    def embed(self, view, texts: list[str]) -> np.ndarray:
        """Query embeddings ``(n, dim)``, normalized."""
        return self.embedder_for(view).encode(list(texts), is_query=True)

    def units(self, name: str, version: str, request: QueryRequest) -> list[RoutedUnit]:
        """The units that write clues for ``request``: memorag routes the question (:meth:`route`); summarize
        takes the document's units or ``units`` spread over the collection; qa reads no memory (the version is
        still opened, so an unknown one fails here, before any work)."""
        if request.task == "memorag":
            return self.route(name, version, request.query, request.units)
        view = self.catalog.view(name, version)
        if request.task == "summarize":
            ids = view.units_of_doc(request.doc_id) if request.doc_id else view.units
            reason = "document" if request.doc_id else "spread"
            return [RoutedUnit(u, 0.0, reason) for u in spread(ids, request.units)]
        return []

    def route(self, name: str, version: str, query: str, units: int) -> list[RoutedUnit]:
        """Up to ``units`` units for ``query``: the holders of its best dense hits, then the router's picks."""
        view = self.catalog.view(name, version)
        qv = self.embed(view, [query])  # (1, dim)
        want_dense = math.ceil(units / 2)
        scores, rows = view.search(qv, max(units * 4, 8))  # (1, k), (1, k)
        dense: list[RoutedUnit] = []
        for s, r in zip(scores[0].tolist(), rows[0].tolist()):
            if r < 0:
                continue
            uid = view.unit_of_row(r)
            if all(u.unit_id != uid for u in dense):
                dense.append(RoutedUnit(uid, float(s), "dense"))  # score: the unit's best passage
        routed = view.router.route(qv[0], units) if view.router is not None else []
        picked = dense[:want_dense]
        for uid, s in routed:
            if len(picked) >= units:
                break
            if all(p.unit_id != uid for p in picked):
                picked.append(RoutedUnit(uid, float(s), "router"))
        for u in dense[want_dense:]:  # the router ran short: more dense holders
            if len(picked) >= units:
                break
            if all(p.unit_id != u.unit_id for p in picked):
                picked.append(u)
        return picked

    def retrieve(self, name: str, version: str, query: str | None, clues: list[UnitClues], top_k: int, *,
                 doc_id: str | None = None, unit_ids: list[str] | None = None,
                 extra: list[tuple[str, str]] | None = None) -> tuple[list[Evidence], list[tuple[str, str]]]:
        """The ``top_k`` fused passages for the question and the clues, and the (source, query) list used.

        ``doc_id`` restricts the evidence to one document (the summarize task); ``unit_ids`` to the passages of
        those units (the bulk summarization's unit summaries, which must depend on their own unit only).
        ``extra``: more (source, text) queries, e.g. a conversation's ``session`` and ``user`` queries
        (:mod:`memorag_core.query.sessions`).
        """
        view = self.catalog.view(name, version)
        clue_set = clue_set_of(clues, extra)
        # one code path with the facade and the evaluation: clues -> sources -> restatements dropped -> spans
        # grounded in the chunks of the units that recalled them -> rankings -> fusion
        plan_config = dataclasses.replace(self.plan, depth=max(self.plan.depth, top_k))
        grounder = None
        if plan_config.ground_spans and any(c.spans for c in clues):
            with self._lock:
                grounder = UnitGrounder(view, [c.unit_id for c in clues if c.spans], self._grounders)
        plan, vecs = plan_queries(query, clue_set, plan_config, embed=lambda texts: self.embed(view, texts),
                                  grounder=grounder)
        queries = plan.queries
        allowed = set(view.rows_of_doc(doc_id).tolist()) if doc_id else None
        if doc_id and not allowed:
            raise InvalidInputError(f"collection {name!r} version {version} has no document {doc_id!r}")
        if unit_ids is not None:
            in_units = set(view.rows_of_units(list(unit_ids)).tolist())
            allowed = in_units if allowed is None else allowed & in_units
            if not allowed:
                raise InvalidInputError(f"collection {name!r} version {version} has no passages in units "
                                        f"{list(unit_ids)}" + (f" of document {doc_id!r}" if doc_id else ""))

        def search(v, k):
            scores, rows = view.search(v, k * (4 if allowed else 1))  # (nq, k'), (nq, k')
            if allowed is None:
                return scores, rows
            keep = [[(s, r) for s, r in zip(srow, rrow) if r >= 0 and r in allowed][:k]
                    for srow, rrow in zip(scores.tolist(), rows.tolist())]
            pad = [row + [(0.0, -1)] * (k - len(row)) for row in keep]
            return (np.asarray([[s for s, _ in row] for row in pad], dtype=np.float32),
                    np.asarray([[r for _, r in row] for row in pad], dtype=np.int64))

        rankings = rankings_for(plan, vecs, search, clue_set, plan_config,
                                lambda rows: self.embedder_for(view).encode(
                                    [view.row(int(r))["text"] for r in rows], is_query=False))
        fused = fuse(rankings, self.fusion, limit=top_k)
        if not fused and allowed:  # the document's chunks are not among any query's hits: read its beginning
            fused_rows = sorted(allowed)[:top_k]
            return [self._evidence(view, r, 0.0, ["document"], "") for r in fused_rows], queries
        return [self._evidence(view, int(f.key), f.score, f.sources, f.query) for f in fused], queries

    @staticmethod
    def _evidence(view, row: int, score: float, sources: list[str], query: str) -> Evidence:
        r = view.row(row)
        return Evidence(doc_id=r["doc_id"], unit_id=r["unit_id"], chunk_id=r["chunk_id"], score=float(score),
                        text=r["text"], sources=list(sources), query=query, start=r.get("doc_start"),
                        end=r.get("doc_end"))


def clue_set_of(clues: list[UnitClues], extra: list[tuple[str, str]] | None = None) -> ClueSet:
    """The clues of every unit as one :class:`~memorag_core.retrieval.queries.ClueSet` (every unit's draft is a
    query of its own), plus ``extra`` (source, text) queries."""
    drafts = [c.draft for c in clues if c.draft]
    return ClueSet(spans=[s for c in clues for s in c.spans], surrogates=[s for c in clues for s in c.surrogates],
                   draft=drafts[0] if drafts else None, drafts=drafts[1:],
                   key_points=[s for c in clues for s in c.key_points],
                   pointers=[p for c in clues for p in c.pointers],
                   extra=[(s, q) for s, q in (extra or []) if q and q.strip()])
