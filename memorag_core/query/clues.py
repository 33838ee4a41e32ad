"""Clues from unit memories: the memory model, a byte-bounded cache of loaded memories, one batched decode per unit.

:class:`ClueWriter` holds one memory model per memory configuration (the units of a collection share one) and an
LRU of unit memories bounded by bytes (:class:`ByteLRU`): a unit's memory file is read once (local files are
memory-mapped, S3 objects downloaded; sha256-verified against the version's manifest) and then reused by every
query that reaches the unit. For each picked unit, the recall, rewrite (and draft) prompts are decoded together
as one batch after that unit's memory (:meth:`memorag_core.memory.Memory.clue_texts`).

The memory worker of the Serve app owns one ClueWriter; the in-process :class:`QueryEngine` owns one too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from memorag_core.query.types import UnitClues

logger = logging.getLogger(__name__)


class ByteLRU:
    """A least-recently-used map bounded by the total ``nbytes`` of its values.

    Args:
        max_bytes: capacity; an entry larger than it is not kept (but still returned to the caller).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._d: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        with self._lock:
            item = self._d.get(key)
            if item is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        with self._lock:
            if key in self._d:
                self.bytes -= self._d.pop(key)[1]
            if nbytes > self.max_bytes:
                return
            self._d[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes and self._d:
                _, (_, n) = self._d.popitem(last=False)
                self.bytes -= n

    def __len__(self) -> int:
        return len(self._d)

    def stats(self) -> dict:
        return {"entries": len(self._d), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses}


def split_lines(text: str, language: str) -> list[str]:
    """Clue output -> informative lines (see :func:`memorag_core.facade.split_clue_lines`)."""
    from memorag_core.facade import split_clue_lines

    return split_clue_lines(text, language)


class ClueWriter:
    """Writes clues from the unit memories of published collections.

    Args:
        catalog: the :class:`~memorag_core.query.catalog.CollectionCatalog` to read versions from.
        cache_bytes: capacity of the loaded-memory cache.
        device: where the memory model runs (``auto``, ``cpu``, ``cuda``); overrides the collection's setting.
        model_override: a memory model folder to use instead of the one the manifest names (it must be the same
            model: unit memories are checked against the model's fingerprint and refused otherwise).
    """

    def __init__(self, catalog, *, cache_bytes: int = 2 << 30, device: str | None = None,
                 model_override: str | None = None) -> None:
        self.catalog = catalog
        self.cache = ByteLRU(cache_bytes)
        self.device = device
        self.model_override = model_override
        self._memories: dict[str, Any] = {}
        self._lock = threading.Lock()  # one decode at a time per memory model (the model holds one memory)

    def memory_for(self, view) -> Any:
        """The memory object (model loaded once) for the collection version's memory configuration."""
        from memorag_core.memory import MemoryConfig, build_memory
        from memorag_core.models import LoadOptions

        cfg = dict(view.memory_config)
        load = dict(cfg.pop("load", None) or {})
        if self.device:
            load["device"] = self.device
        if self.model_override:
            cfg["model"] = self.model_override
        config = MemoryConfig(**cfg, load=LoadOptions(**load))
        key = repr(sorted(config.to_dict().items()))
        memory = self._memories.get(key)
        if memory is None:
            t0 = time.perf_counter()
            memory = build_memory(config)
            self._memories[key] = memory
            logger.info("memory model %s loaded for %s in %.1f s", memory.model_id, view.name,
                        time.perf_counter() - t0)
        return memory

    def _load(self, view, memory, unit_id: str):
        """The unit's memory tensors (cached), and whether they came from the cache."""
        entry = view.manifest.units.get(unit_id)
        if entry is None:
            from memorag_core.errors import InvalidInputError

            raise InvalidInputError(f"unit {unit_id!r} is not part of {view.name}/{view.version}")
        key = (unit_id, entry.get("sha256"))
        m = self.cache.get(key)
        if m is not None:
            return m, True
        m = view.reader.read_unit_memory(unit_id, dtype=memory.model.dtype, device=str(memory.model.device))
        self.cache.put(key, m, m.nbytes)
        return m, False

    def clues(self, name: str, version: str, unit_ids: list[str], query: str, *, max_new_tokens: int = 128,
              with_draft: bool = False) -> list[UnitClues]:
        """Spans and surrogate questions (and a draft answer) from each unit's memory, one batched decode per unit.

        Raises ArtifactNotFoundError / CorruptArtifactError from the store, InvalidInputError for a unit that is
        not in the version.
        """
        return self.clues_batch(name, version, [(query, list(unit_ids))], max_new_tokens=max_new_tokens,
                                with_draft=with_draft)[0]

    def clues_batch(self, name: str, version: str, requests: list[tuple[str, list[str]]], *,
                    max_new_tokens: int = 128, with_draft: bool = False) -> list[list[UnitClues]]:
        """Clues for several questions at once: ``requests`` is ``[(query, unit_ids), ...]``.

        Each unit's memory is loaded once, and the prompts of every question that reached the unit (recall,
        rewrite, and draft when asked) are decoded together as one batch after it: concurrent requests to the
        same unit cost one pass over the memory per step, not one each (the Serve memory worker batches
        requests this way). Returns one list per request, in its ``unit_ids`` order.
        """
        view = self.catalog.view(name, version)
        memory = self.memory_for(view)
        queries = [memory.check_query(q) for q, _ in requests]  # bounds before any decoding
        by_unit: dict[str, list[int]] = {}
        for i, (_, uids) in enumerate(requests):
            for uid in uids:
                by_unit.setdefault(uid, []).append(i)
        done: dict[tuple[int, str], UnitClues] = {}
        with self._lock:
            for uid, members in by_unit.items():
                t0 = time.perf_counter()
                m, cached = self._load(view, memory, uid)
                memory.import_tensors(m)
                texts = memory.clue_texts_many([queries[i] for i in members], max_new_tokens, with_answer=with_draft)
                seconds = time.perf_counter() - t0
                lang = memory.prompts.language
                for i, t in zip(members, texts):
                    done[(i, uid)] = UnitClues(uid, spans=split_lines(t["spans"], lang),
                                               surrogates=split_lines(t["surrogates"], lang),
                                               draft=(t.get("answer") or None), seconds=seconds, cached=cached)
        return [[done[(i, uid)] for uid in uids] for i, (_, uids) in enumerate(requests)]

    def rerank(self, name: str, version: str, question: str, lines: list[str], dense_scores: list[float], *,
               prefix_unit: str | None = None, max_tokens: int | None = None, bridge_slots: int = 0,
               bridge_width: int = 2):
        """The memory model's calibrated attention to each candidate line, and the bridge span when
        ``bridge_slots`` > 0 (a :class:`~memorag_core.retrieval.rerank.CandidateScores`, see
        :func:`memorag_core.retrieval.rerank.memory_scores`), read after ``prefix_unit``'s memory when given; None
        when the collection's memory model has no head set."""
        from memorag_core.retrieval.rerank import memory_scores

        view = self.catalog.view(name, version)
        memory = self.memory_for(view)
        question = memory.check_query(question)
        with self._lock:
            if prefix_unit is not None:
                m, _ = self._load(view, memory, prefix_unit)
                memory.import_tensors(m)
            return memory_scores(memory, question, lines, dense_scores, prefix=prefix_unit is not None,
                                 max_tokens=max_tokens, bridge_slots=bridge_slots, bridge_width=bridge_width)

    def key_points(self, name: str, version: str, unit_ids: list[str], *, max_new_tokens: int = 256
                   ) -> list[UnitClues]:
        """Key points of each unit (the summarize task), from its memory."""
        view = self.catalog.view(name, version)
        memory = self.memory_for(view)
        out = []
        with self._lock:
            for uid in unit_ids:
                t0 = time.perf_counter()
                m, cached = self._load(view, memory, uid)
                memory.import_tensors(m)
                text = memory.summarize(max_new_tokens)
                points = split_lines(text, memory.prompts.language) or ([text.strip()] if text.strip() else [])
                out.append(UnitClues(uid, key_points=points, seconds=time.perf_counter() - t0, cached=cached))
        return out

    def language(self, name: str, version: str, unit_id: str) -> str:
        """The prompt language of a unit's memory (``en``/``zh``), read from its header."""
        view = self.catalog.view(name, version)
        memory = self.memory_for(view)
        m, _ = self._load(view, memory, unit_id)
        return str(m.header.get("language") or "en")

    def stats(self) -> dict:
        return {"cache": self.cache.stats(), "models": len(self._memories)}
