"""Bulk summarization on the query engine: unit summaries (key points -> passages -> summary) and a bounded reduce.

This module holds no Ray: :class:`UnitSummarizer` runs on a :class:`~memorag_core.query.engine.QueryEngine`'s own
stages (one code path with the ``summarize`` task of the CLI and the Serve app):

1. key points from the unit's memory: :meth:`ClueWriter.key_points` (memories cached, model loaded once);
2. supporting passages: :meth:`EvidenceRetriever.retrieve` with the key points as queries, restricted to the
   unit's own passages (so that a unit summary depends on its unit only, and can be cached by unit id);
3. the summary: the ``sum_gen`` prompt of :func:`~memorag_core.query.answer.generation_prompt` in the unit's
   language (the memory's), written by the engine's generator for a whole batch of units in one call (batched
   transformers generation, or vLLM's continuous batching).

Reduce (:func:`plan_reduce`): summaries are combined by a tree whose nodes read at most ``fan_in`` summaries and at
most ``reduce_max_chars`` characters, so no prompt grows with the collection (10,000 units at fan-in 8 is a tree
about seven levels deep, each prompt the size of eight summaries). Groups are cut where an item's content key says
so (as the memorize job packs documents), with ``fan_in`` as a hard cap: adding or removing one summary changes
the nodes on its path to the root and rarely a neighbour, so an incremental run recomputes only those.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field

from memorag_core.errors import ArtifactError, InvalidInputError
from memorag_core.query.answer import generation_prompt

logger = logging.getLogger(__name__)


def _prompt_version() -> str:
    """A hash of every template the summaries use (key points and ``sum_gen``, both languages): changing a prompt
    changes every summary key, so the next run recomputes."""
    from memorag_core.prompts import PROMPTS

    text = "\x1e".join(f"{lang}\x1f{p.context}\x1f{p.ack}\x1f{p.key_points}\x1f{p.sum_gen}"
                       for lang, p in sorted(PROMPTS.items()))
    return "p1-" + hashlib.sha256(text.encode()).hexdigest()[:12]


PROMPT_VERSION = _prompt_version()
"""Version of the summary prompts (``p1-`` + a hash of the templates)."""


@dataclass(frozen=True)
class SummarySettings:
    """What shapes a summary (part of every content key).

    Attributes:
        key_point_tokens: most tokens of a unit's key points (memory decode).
        top_k: supporting passages per unit summary.
        max_new_tokens: most tokens of a unit summary.
        reduce_max_new_tokens: most tokens of a document / collection (reduce) summary.
        fan_in: most summaries one reduce prompt reads (>= 2).
        reduce_max_chars: most characters of summaries in one reduce prompt (each input is cut to its share).
    """

    key_point_tokens: int = 128
    top_k: int = 4
    max_new_tokens: int = 160
    reduce_max_new_tokens: int = 200
    fan_in: int = 8
    reduce_max_chars: int = 6000

    def __post_init__(self) -> None:
        for name in ("key_point_tokens", "top_k", "max_new_tokens", "reduce_max_new_tokens", "reduce_max_chars"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.fan_in, bool) or not isinstance(self.fan_in, int) or self.fan_in < 2:
            raise InvalidInputError(f"fan_in must be an integer >= 2, got {self.fan_in!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class UnitSummary:
    """One unit's outcome: a summary, or the reason it was skipped.

    Attributes:
        unit_id: the unit. summary: the text ('' when skipped). key_points: the memory's key points.
        language: ``en`` / ``zh`` (the unit memory's prompt language). evidence: chunk ids the generator read.
        error: None, or a short reason code (``missing_memory``, ``corrupt_memory``, ``no_passages``,
            ``empty_summary``, ``failed``); detail: the message.
        generated_tokens: tokens of the summary. seconds: key points + retrieval + this unit's share of the
            batched generation.
    """

    unit_id: str
    summary: str = ""
    key_points: list[str] = field(default_factory=list)
    language: str = "en"
    evidence: list[str] = field(default_factory=list)
    error: str | None = None
    detail: str = ""
    generated_tokens: int = 0
    seconds: float = 0.0


def _error_code(exc: BaseException) -> str:
    from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError

    if isinstance(exc, ArtifactNotFoundError):
        return "missing_memory"
    if isinstance(exc, CorruptArtifactError):
        return "corrupt_memory"
    if isinstance(exc, InvalidInputError):
        return "invalid"
    return "failed"


class UnitSummarizer:
    """Unit summaries and reduce steps on a :class:`~memorag_core.query.engine.QueryEngine`.

    Args:
        engine: the engine whose clue writer, retriever and generator do the work (the generator is the
            engine's: the configured one, else the memory model itself).
        settings: token budgets, passages per unit, reduce bounds.

    One instance serves one call at a time (the memory model holds one memory; a torch model one generate).
    """

    def __init__(self, engine, settings: SummarySettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or SummarySettings()

    def _count_tokens(self, generator, text: str) -> int:
        tok = getattr(generator, "tokenizer", None)
        if tok is None:
            return len(text.split())
        return len(tok.encode(text, add_special_tokens=False))

    def _prepare(self, view, uid: str) -> tuple[UnitSummary, str | None]:
        """Key points and passages of one unit -> (record, generator prompt or None when skipped)."""
        name, version = view.name, view.version
        s = self.settings
        t0 = time.perf_counter()
        rec = UnitSummary(uid)
        try:
            clues = self.engine.clue_writer.key_points(name, version, [uid], max_new_tokens=s.key_point_tokens)
            rec.key_points = list(clues[0].key_points)
            rec.language = self.engine.clue_writer.language(name, version, uid)
            try:
                evidence, _ = self.engine.retriever.retrieve(name, version, None, clues, s.top_k, unit_ids=[uid])
                passages = [(e.chunk_id, e.text) for e in evidence]
            except InvalidInputError:
                # No key points to search with: the unit's first passages stand in.
                rows = view.rows_of_units([uid])[: s.top_k]
                passages = [(view.row(int(r))["chunk_id"], view.row(int(r))["text"]) for r in rows]
        except (ArtifactError, InvalidInputError) as exc:
            rec.error, rec.detail = _error_code(exc), str(exc)
            rec.seconds = time.perf_counter() - t0
            return rec, None
        passages = [(c, t) for c, t in passages if t and t.strip()]
        if not passages:
            rec.error, rec.detail = "no_passages", f"unit {uid} has no passages to summarize"
            rec.seconds = time.perf_counter() - t0
            return rec, None
        rec.evidence = [c for c, _ in passages]
        rec.seconds = time.perf_counter() - t0
        return rec, generation_prompt("summarize", None, [t for _, t in passages], rec.language)

    def summarize_units(self, name: str, version: str, unit_ids: list[str]) -> list[UnitSummary]:
        """Summaries of ``unit_ids`` of ``name``/``version``, in order; bad units come back with ``error`` set
        (never raised). The prompts of all good units go to the generator in one batched call."""
        view = self.engine.catalog.view(name, version)
        answerer = self.engine.answerer_for(view)
        prepared = [self._prepare(view, uid) for uid in unit_ids]
        todo = [(rec, p) for rec, p in prepared if p is not None]
        if todo:
            t0 = time.perf_counter()
            texts = self._generate([p for _, p in todo], self.settings.max_new_tokens, answerer, [r for r, _ in todo])
            share = (time.perf_counter() - t0) / len(todo)
            for (rec, _), text in zip(todo, texts):
                rec.seconds += share
                if rec.error:
                    continue
                rec.summary = (text or "").strip()
                if not rec.summary:
                    rec.error, rec.detail = "empty_summary", "the generator wrote nothing"
                else:
                    rec.generated_tokens = self._count_tokens(answerer.generator, rec.summary)
        return [rec for rec, _ in prepared]

    def _generate(self, prompts: list[str], max_new_tokens: int, answerer, recs=None) -> list[str]:
        """One batched call; when it fails, prompt by prompt, so that one bad prompt skips only its unit."""
        try:
            return answerer.generator.generate(prompts, max_new_tokens=max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - find the culprit below
            logger.warning("batched generation of %d prompts failed (%s); retrying one by one", len(prompts), exc)
        out = []
        for i, p in enumerate(prompts):
            try:
                out.append(answerer.generator.generate([p], max_new_tokens=max_new_tokens)[0])
            except Exception as exc:  # noqa: BLE001 - reported on the unit, not fatal
                out.append("")
                if recs is not None:
                    recs[i].error, recs[i].detail = "failed", f"generation failed: {exc}"
        return out

    def reduce_prompt(self, texts: list[str], language: str) -> str:
        """The ``sum_gen`` prompt over ``texts`` (each cut to its share of ``reduce_max_chars``)."""
        share = max(1, self.settings.reduce_max_chars // max(1, len(texts)))
        return generation_prompt("summarize", None, [t[:share] for t in texts], language)

    def reduce(self, name: str, version: str, groups: list[tuple[list[str], str]]) -> list[tuple[str, int]]:
        """One summary per group of summaries ``(texts, language)``, in one batched call: ``(text, tokens)``."""
        view = self.engine.catalog.view(name, version)
        answerer = self.engine.answerer_for(view)
        prompts = [self.reduce_prompt(texts, lang) for texts, lang in groups]
        out = self._generate(prompts, self.settings.reduce_max_new_tokens, answerer)
        return [((t or "").strip(), self._count_tokens(answerer.generator, (t or "").strip())) for t in out]


# -- the reduce plan ----------------------------------------------------------------------------------------------
@dataclass
class ReduceNode:
    """One reduce step: summarize the summaries ``inputs`` (content keys of unit summaries or of other nodes).

    ``key`` hashes the inputs' keys and the settings, so a node is recomputed exactly when an input changed.
    ``level`` is 1 for nodes over leaves. ``root_of`` names the tree (``document:<id>`` or ``collection``) when
    the node is that tree's root.
    """

    key: str
    inputs: list[str]
    level: int
    tree: str
    root_of: str | None = None


def _boundary(key: str, level: int, every: int) -> bool:
    # Salted by the level: a key that passes up alone must not stay a cut at every level above.
    return int(hashlib.sha256(f"{level}:{key}".encode()).hexdigest()[:8], 16) % every == 0


def content_groups(keys: list[str], fan_in: int, level: int = 1) -> list[list[str]]:
    """Cut ``keys`` into consecutive groups: after a key whose hash (salted by ``level``) is 0 modulo
    ``max(2, fan_in // 2)``, or when a group holds ``fan_in`` keys. Content-defined, so inserting or removing a key
    moves only nearby cuts."""
    every = max(2, fan_in // 2)
    groups, cur = [], []
    for k in keys:
        cur.append(k)
        if len(cur) >= fan_in or _boundary(k, level, every):
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return groups


def plan_reduce(items: list[str], tree: str, settings_key: str, fan_in: int) -> tuple[str | None, list[ReduceNode]]:
    """The reduce tree over ``items`` (content keys, in reading order): ``(root key, nodes bottom-up)``.

    One item is its own root (no node); no item gives ``(None, [])``. Each level cuts the current keys with
    :func:`content_groups`; a group of one passes up unchanged; a level that would not shrink (every key a cut)
    falls back to fixed groups of ``fan_in``, so the tree always ends.
    """
    from memorag_core.store.summaries import content_key

    if not items:
        return None, []
    nodes: list[ReduceNode] = []
    current, level = list(items), 0
    while len(current) > 1:
        level += 1
        groups = content_groups(current, fan_in, level)
        if len(groups) >= len(current):
            groups = [current[i:i + fan_in] for i in range(0, len(current), fan_in)]
        nxt = []
        for g in groups:
            if len(g) == 1:
                nxt.append(g[0])
                continue
            key = content_key("reduce", settings_key, g)
            nodes.append(ReduceNode(key, list(g), level, tree))
            nxt.append(key)
        current = nxt
    if nodes and nodes[-1].key == current[0]:
        nodes[-1].root_of = tree
    return current[0], nodes


@dataclass
class UnitMeta:
    """A unit of a collection version as the bulk summarizer plans it: id, documents, start offset in its first
    document (None: not a piece of a split document), tokens. ``order`` is reading order."""

    unit_id: str
    doc_ids: list[str]
    start: int | None
    n_tokens: int

    @property
    def order(self) -> tuple:
        return (self.doc_ids[0] if self.doc_ids else "", self.start if self.start is not None else 1 << 62,
                self.unit_id)


def read_units(reader) -> list[UnitMeta]:
    """The units of a collection version (its ``units/*.parquet`` tables: id, documents, start offset, tokens,
    never their text), in reading order; a unit the manifest lists without a table row is still returned."""
    import io

    import pyarrow.parquet as pq

    out = []
    for rel in reader.files("units/"):
        if not rel.endswith(".parquet"):
            continue
        t = pq.read_table(io.BytesIO(reader.read_bytes(rel)), columns=["unit_id", "doc_ids", "start", "n_tokens"])
        out += [UnitMeta(r["unit_id"], list(r["doc_ids"] or []), r["start"], int(r["n_tokens"] or 0))
                for r in t.to_pylist()]
    known = set(reader.manifest.units)
    missing = known - {u.unit_id for u in out}
    out += [UnitMeta(u, [], None, 0) for u in sorted(missing)]  # no units table: still summarized, unordered
    return sorted([u for u in out if u.unit_id in known], key=lambda u: u.order)


def majority_language(langs: list[str]) -> str:
    """The most common language code of ``langs`` (``en`` for none)."""
    from collections import Counter

    return Counter(langs).most_common(1)[0][0] if langs else "en"


def plan_summaries(units: list[UnitMeta], keys: dict[str, str], done: set[str], settings_key: str, fan_in: int):
    """The reduce plan of one summarize run: ``(multi, doc_roots, coll_root, nodes)``.

    Args:
        units: the version's units in reading order. keys: unit id -> its unit summary's content key.
        done: the content keys whose summary exists (unit summaries staged; a unit without one is left out of
            every reduce). settings_key: the content key of the reduce settings. fan_in: most inputs per node.

    Returns:
        ``multi``: doc id -> its units (by start offset) for documents spanning several units; ``doc_roots``:
        doc id -> the root key of its reduce tree (a document with one summarized unit: that unit's key);
        ``coll_root``: the collection tree's root key (None: nothing summarized); ``nodes``: key -> ReduceNode,
        every node of every tree, deduplicated.
    """
    by_doc: dict[str, list[UnitMeta]] = {}
    for u in units:
        for d in u.doc_ids:
            by_doc.setdefault(d, []).append(u)
    multi = {d: sorted(us, key=lambda u: (u.start if u.start is not None else 1 << 62, u.unit_id))
             for d, us in by_doc.items() if len(us) > 1}
    nodes, doc_roots = [], {}
    for d in sorted(multi):
        root, ns = plan_reduce([keys[u.unit_id] for u in multi[d] if keys[u.unit_id] in done], f"document:{d}",
                               settings_key, fan_in)
        if root is not None:
            doc_roots[d] = root
            nodes += ns
    covered = {u.unit_id for us in multi.values() for u in us}
    good = [u for u in units if keys[u.unit_id] in done]
    entries = sorted([((d,), doc_roots[d]) for d in doc_roots]
                     + [(u.order, keys[u.unit_id]) for u in good if u.unit_id not in covered])
    coll_root, ns = plan_reduce([k for _, k in entries], "collection", settings_key, fan_in)
    nodes += ns
    node_map: dict[str, ReduceNode] = {}
    for n in nodes:
        node_map.setdefault(n.key, n)
    return multi, doc_roots, coll_root, node_map
