"""The single-process MemoRAG facade, with upstream's API (``MemoRAG``, ``MemoRAGLite``, ``Memory``).

``MemoRAG`` joins a memory (clues), a dense retriever over the chunked context (evidence) and a generator
(answer). Building (``memorize``) and answering (``__call__`` and the stage methods ``clues``, ``retrieve``,
``answer_from_evidence``) are separate steps joined by a saved bundle (``save_dir``, local or ``s3://``), so a
memory built once can be loaded by many processes.

Decisions, where upstream keyed behaviour on model names:

* The memory kind is never guessed from a model's *name*. It is ``memory_config.kind`` when given; otherwise
  ``beacon`` when the checkpoint's ``config.json`` declares a ``beacon_ratio`` (MemoRAG's released memory models
  do), else ``compressed_kv`` with ``ratio=beacon_ratio``. The choice is logged.
* No silent 4-bit quantization, no prompt or chunk-size switch by name; the prompt language is detected from the
  memorized text (or configured).
* ``__call__`` takes ``query`` first, then ``context`` (as upstream's Lite class does and as the project issue
  specifies); upstream's README passes both by keyword, which works unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from memorag_core.errors import InvalidInputError, MemoryNotReadyError
from memorag_core.memory import Memory as MemoryBase
from memorag_core.memory import MemoryConfig, build_memory, check_text
from memorag_core.models import LoadOptions
from memorag_core.query.types import QueryLimits

logger = logging.getLogger(__name__)

TASK_TYPES = ("qa", "memorag", "summarize")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|[(（]?\d+[)）])\s*")


@dataclass
class Clues:
    """What the memory wrote for one query.

    Attributes:
        spans: recalled text spans (one per line of the recall output, bullets stripped).
        surrogates: surrogate questions.
        draft_answer: the memory's own answer (only with ``use_memory_answer``).
        retrieval_queries: the queries searched densely: the question first, then the clue lines that survived
            (restatements of the question dropped, spans found in the corpus pointing at their chunk instead).
        seconds: wall time spent writing the clues.
        pointers: (chunk id, score) the question's attention over the memory points at, best first (empty when
            the memory keeps no source offsets).
        plan: the :class:`~memorag_core.retrieval.queries.Plan` (grounded spans, dropped clues).
    """

    spans: list[str]
    surrogates: list[str]
    draft_answer: str | None
    retrieval_queries: list[str]
    seconds: float
    pointers: list[tuple[int, float]] = field(default_factory=list)
    plan: Any = field(default=None, repr=False)

    def clue_set(self):
        """The clues as a :class:`~memorag_core.retrieval.queries.ClueSet` (the shared retrieval path's input)."""
        from memorag_core.retrieval.queries import ClueSet

        return ClueSet(spans=list(self.spans), surrogates=list(self.surrogates), draft=self.draft_answer,
                       pointers=list(self.pointers))


@dataclass
class MemorizeReport:
    """Sizes and timings of one ``memorize`` (memory stats plus the retrieval corpus)."""

    memory: dict
    chunks: int
    seconds: float
    saved_to: str | None = None
    manifest: dict | None = field(default=None, repr=False)


def split_clue_lines(text: str, language: str) -> list[str]:
    """Clue output -> informative lines: bullets/numbers stripped; > 3 words (en) or > 3 characters (zh)."""
    lines = [_BULLET.sub("", line).strip() for line in text.splitlines()]
    if language == "zh":
        return [line for line in lines if len(line) > 3]
    return [line for line in lines if len(line.split()) > 3]


def dedupe_queries(queries: list[str]) -> list[str]:
    """Keep the first of queries that differ only in case, spacing or punctuation (small models repeat)."""
    seen: set[str] = set()
    kept = []
    for q in queries:
        key = re.sub(r"[\W_]+", " ", q).strip().lower()
        if key and key not in seen:
            seen.add(key)
            kept.append(q)
    return kept


def _detect_memory_kind(model: str | None, options: LoadOptions) -> str:
    """``beacon`` when the checkpoint's config declares ``beacon_ratio``, else ``compressed_kv`` (logged)."""
    if model is None:
        return "compressed_kv"
    config_file = Path(model).expanduser() / "config.json"
    try:
        if config_file.exists():
            cfg = json.loads(config_file.read_text())
        else:  # a hub id: the config is small, and comes from the local HF cache when offline
            from huggingface_hub import hf_hub_download

            cfg = json.loads(Path(hf_hub_download(model, "config.json", cache_dir=options.cache_dir,
                                                  token=options.access_token)).read_text())
    except Exception as exc:  # noqa: BLE001 - loading the model will raise the real, named error
        logger.info("could not read %s's config to pick the memory kind (%s); using compressed_kv", model, exc)
        return "compressed_kv"
    kind = "beacon" if "beacon_ratio" in cfg else "compressed_kv"
    logger.info("memory kind for %s: %s (%s)", model, kind,
                "its config declares beacon_ratio" if kind == "beacon" else "no beacon_ratio in its config")
    return kind


def upstream_memory_config(model: str | None, ratio: int, options: LoadOptions, kind: str | None = None,
                           **extra: Any) -> MemoryConfig:
    """The memory config that upstream's arguments describe: the kind from the checkpoint (unless given), remote
    code allowed only for beacon checkpoints. ``extra`` goes to :class:`MemoryConfig`."""
    kind = kind or _detect_memory_kind(model, options)
    return MemoryConfig.for_kind(kind=kind, model=model, ratio=ratio,
                                 load=dataclasses.replace(options, trust_remote_code=kind == "beacon"), **extra)


def Memory(model_name_or_path: str | None = None, cache_dir: str | None = None, access_token: str | None = None,
           beacon_ratio: int | None = 4, load_in_4bit: bool = False, enable_flash_attn: bool = False,
           **config: Any) -> MemoryBase:
    """Upstream-compatible constructor of a memory: ``Memory(model).memorize(text)``, then ``recall``,
    ``rewrite``, ``answer``, ``summarize``, ``save``, ``load``. Extra keyword arguments go to
    :class:`MemoryConfig` (e.g. ``kind=``, ``window=``, ``positions=``)."""
    options = LoadOptions(cache_dir=cache_dir, access_token=access_token, load_in_4bit=load_in_4bit,
                          enable_flash_attn=enable_flash_attn)
    kind = config.pop("kind", None) or _detect_memory_kind(model_name_or_path, options)
    ratio = config.pop("ratio", None) or (1 if kind == "full_kv" else (beacon_ratio or 4))
    return build_memory(upstream_memory_config(model_name_or_path, ratio, options, kind=kind, **config))


class MemoRAG:
    """Memory-augmented RAG on one machine (upstream-compatible constructor and calls).

    Args:
        mem_model_name_or_path: memory model (folder or hub id); None = embedded SmolLM2-135M-Instruct.
        ret_model_name_or_path: embedder (folder or hub id); None = embedded all-MiniLM-L6-v2.
        gen_model_name_or_path: generator spec (``hf:``/``vllm:``/``openai:`` prefixes or a path); None = the
            memory model itself, unless ``customized_gen_model`` or ``generator`` is given.
        customized_gen_model: any object with ``generate(prompt, max_new_tokens) -> list[str]`` (e.g. ``Agent``).
        ret_hit: chunks handed to the generator (the fused top ``ret_hit`` over the question and its clues;
            upstream default 3).
        retrieval_chunk_size: tokens per retrieval chunk, in the embedder's own tokens; None (default) takes the
            embedder's limit (all-MiniLM-L6-v2: 254); a larger size is refused (its tail would never be embedded).
        cache_dir, access_token, load_in_4bit, enable_flash_attn: model loading, as upstream.
        beacon_ratio: compression ratio of the memory (upstream's name).
        memory_config: full memory configuration (overrides the memory arguments above).
        generator: a ready :class:`~memorag_core.generators.Generator` (overrides the generator arguments).
        embedder_config, index_config: retrieval configuration (see memorag_core.retrieval).
        clue_max_new_tokens: most tokens per clue (spans, surrogates, draft answer).
        plan_config: how clues become fused rankings (:class:`~memorag_core.retrieval.queries.PlanConfig`).
    """

    def __init__(self, mem_model_name_or_path: str | None = None, ret_model_name_or_path: str | None = None,
                 gen_model_name_or_path: str | None = None, customized_gen_model: Any = None, ret_hit: int = 3,
                 retrieval_chunk_size: int | None = None, cache_dir: str | None = None,
                 access_token: str | None = None, beacon_ratio: int = 4, load_in_4bit: bool = False,
                 enable_flash_attn: bool = False, *, memory_config: MemoryConfig | None = None, generator: Any = None,
                 embedder_config: Any = None, index_config: Any = None, clue_max_new_tokens: int = 128,
                 plan_config: Any = None) -> None:
        from memorag_core.generators import HFGenerator, load_generator
        from memorag_core.retrieval import DenseRetriever, EmbedderConfig, IndexConfig, chunk_size_for, load_embedder
        from memorag_core.retrieval.chunker import TokenChunker
        from memorag_core.retrieval.queries import PlanConfig

        if ret_hit < 1 or (retrieval_chunk_size is not None and retrieval_chunk_size < 16):
            raise InvalidInputError(f"ret_hit must be >= 1 and retrieval_chunk_size >= 16, got {ret_hit}, "
                                    f"{retrieval_chunk_size}")
        options = LoadOptions(cache_dir=cache_dir, access_token=access_token, load_in_4bit=load_in_4bit,
                              enable_flash_attn=enable_flash_attn)
        if memory_config is None:
            memory_config = upstream_memory_config(mem_model_name_or_path, beacon_ratio, options)
        self.memory: MemoryBase = build_memory(memory_config)
        if generator is not None:
            self.generator = load_generator(generator)
        elif gen_model_name_or_path:
            self.generator = load_generator(gen_model_name_or_path, options)
        elif customized_gen_model is not None:
            self.generator = load_generator(customized_gen_model)
        else:
            self.generator = HFGenerator.from_model(self.memory.model, self.memory.tokenizer)
        if embedder_config is None:
            embedder_config = EmbedderConfig(model=ret_model_name_or_path)
        self.embedder = load_embedder(embedder_config)
        self.index_config = index_config or IndexConfig()
        self.retriever = DenseRetriever(self.embedder, self.index_config, hits=ret_hit)
        # Chunks are counted in the embedder's own tokens, so that a chunk that fits is embedded whole.
        emb_tok = getattr(self.embedder, "tokenizer", None)
        if emb_tok is not None and getattr(emb_tok, "is_fast", False):
            retrieval_chunk_size = chunk_size_for(self.embedder, retrieval_chunk_size)
            self.chunker = TokenChunker(emb_tok, chunk_size=retrieval_chunk_size)
        else:
            retrieval_chunk_size = retrieval_chunk_size or 512
            logger.info("the embedder exposes no fast tokenizer: chunks of %d memory-model tokens",
                        retrieval_chunk_size)
            self.chunker = TokenChunker(self.memory.tokenizer, chunk_size=retrieval_chunk_size)
        self.ret_hit = ret_hit
        self.retrieval_chunk_size = retrieval_chunk_size
        self.clue_max_new_tokens = clue_max_new_tokens
        self.summary_hits = 8  # passages a summary reads (its key points retrieve them)
        self.plan_config = PlanConfig.from_dict(plan_config) if plan_config is not None else PlanConfig()
        self._manifest: dict | None = None
        self._chunk_starts: list[int] | None = None  # first memory-tokenizer token of each chunk (pointers)
        self._grounder: Any = None

    # -- building -----------------------------------------------------------------------------------------------
    @property
    def prompts(self):
        """The prompt set of the memorized text (English before anything is memorized)."""
        from memorag_core.prompts import EN

        return self.memory.prompts or EN

    @property
    def is_ready(self) -> bool:
        return not self.memory.is_empty and len(self.retriever.corpus) > 0

    def index_corpus(self, context_or_chunks: str | list[str]) -> int:
        """Chunk (when given one text) and embed into a fresh retrieval index. Returns the number of chunks."""
        if isinstance(context_or_chunks, str):
            pieces = self.chunker.split(check_text(context_or_chunks, "context"))
            chunks = [c.text for c in pieces]
            self._chunk_starts = [c.start for c in pieces]
        else:
            chunks = [check_text(c, "chunk") for c in context_or_chunks]
            self._chunk_starts = None
        self.retriever.remove_all()
        self.retriever.add(chunks)
        self._grounder = None
        return len(chunks)

    def _to_memory_tokens(self, text: str, char_starts: list[int] | None) -> list[int] | None:
        """Chunk starts in characters of ``text`` -> in the memory tokenizer's tokens of ``text`` (pointers map
        memory entries, which know their source token, to chunks through these)."""
        if char_starts is None:
            return None
        from memorag_core.memory.pointers import token_char_starts

        tok_chars = token_char_starts(self.memory.tokenizer, text)  # (tokens,)
        return [int(np.searchsorted(tok_chars, c, side="left")) for c in char_starts]

    def set_chunk_starts(self, text: str, char_starts: list[int] | None) -> None:
        """Where each indexed chunk starts in the memorized ``text`` (characters): enables attention pointers
        when the chunks were indexed as a list."""
        if char_starts is not None and len(char_starts) != len(self.retriever.corpus):
            raise InvalidInputError(f"{len(char_starts)} chunk starts for {len(self.retriever.corpus)} chunks")
        self._chunk_starts = self._to_memory_tokens(text, char_starts)

    def memorize(self, context: str | bytes, save_dir: str | None = None, print_stats: bool = False,
                 storage_dtype: str | None = None, storage_options: dict | None = None) -> MemorizeReport:
        """Read ``context`` into the memory and index its chunks; optionally save both to ``save_dir``.

        ``save_dir`` is a local folder or an ``s3://`` URL; the bundle's manifest is written last, so a crash
        leaves the previous bundle there loadable. ``print_stats`` prints sizes read back from the manifest.
        """
        start = time.perf_counter()
        context = check_text(context, "context")
        stats = self.memory.memorize(context)
        n_chunks = self.index_corpus(context)
        self._chunk_starts = self._to_memory_tokens(context, self._chunk_starts)
        report = MemorizeReport(memory=stats.to_dict(), chunks=n_chunks, seconds=time.perf_counter() - start)
        if save_dir:
            report.manifest = self.save(save_dir, storage_dtype=storage_dtype, storage_options=storage_options)
            report.saved_to = save_dir
        if print_stats:
            self._print_stats(report.manifest)
        return report

    def save(self, save_dir: str, storage_dtype: str | None = None, storage_options: dict | None = None) -> dict:
        """Write memory (safetensors), chunks (Parquet) and index (FAISS bytes) as one bundle; returns its manifest."""
        from memorag_core.store.bundle import Bundle

        if not self.is_ready:
            raise MemoryNotReadyError("nothing is memorized: there is nothing to save")
        bundle = Bundle(save_dir, storage_options)
        bundle.write_memory("memory.safetensors", self.memory.export(), storage_dtype=storage_dtype)
        self.retriever.write_to(bundle)
        self._manifest = bundle.commit({
            "kind": "memorag-bundle",
            "memory": {"kind": self.memory.kind, "model": self.memory.model_id,
                       "revision": self.memory.model_revision, "stats": self.memory.stats.to_dict(),
                       "config": self.memory.config.to_dict()},
            "retrieval": {"embedder": getattr(self.embedder, "name", None), "chunk_size": self.retrieval_chunk_size,
                          "chunks": len(self.retriever.corpus), "index": self.index_config.__dict__,
                          "chunk_starts": self._chunk_starts},
        })
        return self._manifest

    def load(self, save_dir: str, print_stats: bool = False, storage_options: dict | None = None) -> dict:
        """Load a bundle written by :meth:`save` (checksums verified); returns its manifest."""
        from memorag_core.retrieval import DenseRetriever
        from memorag_core.store.bundle import Bundle

        bundle = Bundle(save_dir, storage_options)
        manifest = bundle.read_manifest()
        stored = (manifest.get("retrieval") or {}).get("embedder")
        mine = getattr(self.embedder, "name", None)
        if stored and mine and stored != mine:
            raise InvalidInputError(
                f"bundle {save_dir} was embedded with {stored!r}, but this pipeline's embedder is {mine!r}: its "
                f"queries would not match the index; load it with ret_model_name_or_path={stored!r}")
        m = bundle.read_memory("memory.safetensors", dtype=self.memory.model.dtype,
                               device=str(self.memory.model.device))
        retriever = DenseRetriever.read_from(bundle, self.embedder, self.index_config, hits=self.ret_hit)
        self.memory.import_tensors(m)
        self.retriever = retriever
        self._manifest = manifest
        self._chunk_starts = (manifest.get("retrieval") or {}).get("chunk_starts")
        self._grounder = None
        if print_stats:
            self._print_stats(manifest)
        return manifest

    def _print_stats(self, manifest: dict | None) -> None:
        s = self.memory.stats
        print(f"memory: {s.raw_tokens} tokens -> {s.entries} entries per layer and head "
              f"(compression {s.compression:.2f}x), {s.seconds:.1f}s ({s.tokens_per_second:.0f} tokens/s)")
        print(f"retrieval corpus: {len(self.retriever.corpus)} chunks of <= {self.retrieval_chunk_size} tokens")
        if manifest:
            for name, entry in sorted(manifest.get("files", {}).items()):
                print(f"  {name}: {entry['nbytes'] / 2**20:.2f} MiB  sha256 {entry['sha256'][:12]}")
        else:
            print(f"memory tensors: {s.nbytes / 2**20:.2f} MiB (not saved)")

    # -- answering ----------------------------------------------------------------------------------------------
    def _require_ready(self) -> None:
        if not self.is_ready:
            raise MemoryNotReadyError("nothing is memorized: call memorize(context) or load(save_dir) first")

    # The answering calls below run the one query composition (memorag_core.query.compose) over this facade's
    # bundle: a bundle is a one-unit collection, so grounding, drafts, prompt language and fusion are the ones
    # every other door uses.
    def _composition(self, *, template: str | None = None, pointers: bool | None = None):
        from memorag_core.query.compose import QueryComposition

        return QueryComposition(BundleStages(self, template=template, pointers=pointers))

    def _state(self, query: str | None, task: str = "memorag", **request: Any):
        from memorag_core.query.compose import QueryState
        from memorag_core.query.types import QueryRequest

        r = QueryRequest(query, task=task, units=1, **request).validate(FACADE_LIMITS)
        return QueryState(BUNDLE_COLLECTION, self.bundle_version, r)

    @property
    def bundle_version(self) -> str:
        """The version a query over this bundle reports: its manifest's checksum when saved or loaded."""
        files = (self._manifest or {}).get("files") or {}
        sha = (files.get("memory.safetensors") or {}).get("sha256")
        return f"bundle-{sha[:12]}" if sha else "bundle-unsaved"

    def clues(self, query: str, *, use_memory_answer: bool = False, max_new_tokens: int | None = None,
              pointers: bool | None = None) -> Clues:
        """Spans, surrogate questions (and a draft answer) from the memory, decoded as one batch, plus the attention
        pointers (one prefill of the question over the memory; ``pointers=None``: when the plan uses them and
        the memory keeps source offsets): the composition's route and clue steps over this bundle."""
        from memorag_core.query.compose import complete

        self._require_ready()
        query = check_text(query, "query")
        start = time.perf_counter()
        comp = self._composition(pointers=pointers)
        state = self._state(query, clue_max_new_tokens=max_new_tokens or self.clue_max_new_tokens,
                            use_draft=use_memory_answer)
        complete(comp.route(state))
        complete(comp.write_clues(state, text_clues=True))  # asked for by name: written whatever the plan says
        c = state.clues[0]
        clues = Clues(list(c.spans), list(c.surrogates), c.draft, [], time.perf_counter() - start, list(c.pointers))
        plan, _ = self._plan(query, clues.clue_set())
        clues.plan = plan
        clues.retrieval_queries = [q for _, q in plan.queries]
        return clues

    def pointers(self, query: str) -> list[tuple[int, float]]:
        """Chunks the question's attention over the memory points at, (chunk id, score) best first; empty when
        the memory keeps no source offsets or the chunks' places in the memorized text are unknown."""
        from memorag_core.memory import pointers as ptr

        offsets = getattr(self.memory, "offsets", None)
        # a gist memory's entries point into the gists, not into the source text
        if (not offsets or self._chunk_starts is None or self.memory.kind not in ("compressed_kv", "full_kv")
                or not hasattr(self.memory, "cache")):
            return []
        mass = ptr.question_attention(self.memory, query)  # (L, H, entries)
        # token t of the memorized text belongs to the last chunk that starts at or before it
        tok_span = ptr.char_spans_to_tokens(np.arange(self.memory.stats.raw_tokens), self._chunk_starts)
        total, count = ptr.span_scores(mass, offsets, tok_span, len(self._chunk_starts))
        cfg = self.plan_config
        scores = ptr.point(total, count, layers=cfg.pointer_layers, normalize=cfg.pointer_normalize)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [(i, float(scores[i])) for i in order]

    def _plan(self, query: str | None, clue_set):
        from memorag_core.retrieval.queries import plan_queries

        return plan_queries(query, clue_set, self.plan_config, embed=self._embed, grounder=self.grounder())

    def _embed(self, texts: list[str]):
        return self.embedder.encode(list(texts), is_query=True)  # (n, dim)

    def _passage_vectors(self, keys):
        return self.embedder.encode([self.retriever.corpus[int(k)] for k in keys], is_query=False)  # (n, dim)

    def _search(self, vecs, depth: int):
        return self.retriever.index.search(vecs, min(depth, len(self.retriever.corpus)))  # (n, k), (n, k)

    def grounder(self):
        """The corpus grounder of recalled spans (built once per indexed corpus)."""
        from memorag_core.retrieval.queries import CorpusGrounder

        if self._grounder is None and self.plan_config.ground_spans and self.retriever.corpus:
            self._grounder = CorpusGrounder(self.retriever.corpus)
        return self._grounder

    def fused(self, query: str | None, clue_set, top_k: int):
        """The ``top_k`` fused passages (:class:`~memorag_core.retrieval.fusion.Fused`, keys = chunk ids) for
        ``query`` and a :class:`~memorag_core.retrieval.queries.ClueSet`, and the plan: the retrieval every door
        runs (:func:`~memorag_core.retrieval.queries.fused_evidence`) over this bundle's chunks."""
        from memorag_core.retrieval.queries import fused_evidence

        if not self.retriever.corpus:
            raise MemoryNotReadyError("nothing is indexed: call memorize(context), index_corpus or load first")
        return fused_evidence(query, clue_set, embed=self._embed, search=self._search,
                              top_k=min(top_k, len(self.retriever.corpus)), config=self.plan_config,
                              grounder=self.grounder(), passage_vectors=self._passage_vectors)

    def evidence(self, query: str | None, clues: Clues | None = None, hits: int | None = None, *,
                 task: str = "memorag") -> list:
        """The ``hits`` (default ``ret_hit``) chunks for ``query`` and its ``clues``, fused by weighted reciprocal
        rank (the question's own ranking counts most), then re-ranked by the memory model's attention when the plan
        re-ranks (``plan_config.rerank_candidates``); list of retrieval ``Hit`` in the order the generator reads
        them (``plan_config.evidence_order``: by default the kept passages in the retrieval's order). The
        composition's retrieve and rerank steps over this bundle. ``task="qa"``: plain RAG (no re-ranking)."""
        return self.evidence_ranking(query, clues, hits, task=task)[0]

    def evidence_ranking(self, query: str | None, clues: Clues | None = None, hits: int | None = None, *,
                         task: str = "memorag", candidates: int = 0) -> tuple[list, list]:
        """:meth:`evidence` and the final ranking's first ``candidates`` chunks, best first (both lists of
        retrieval ``Hit``): what the generator reads, and the ranking it was cut from (the evaluation's R@5)."""
        from memorag_core.query.compose import complete
        from memorag_core.query.types import UnitClues
        from memorag_core.retrieval import Hit

        if not self.retriever.corpus:
            raise MemoryNotReadyError("nothing is indexed: call memorize(context), index_corpus or load first")
        if task not in ("memorag", "qa"):
            raise InvalidInputError(f"evidence is retrieved for the memorag or qa task, not {task!r}")
        state = self._state(query, task=task if query else "summarize", top_k=hits or self.ret_hit,
                            candidates=candidates)
        if clues is not None:
            state.clues = [UnitClues(BUNDLE_UNIT, spans=list(clues.spans), surrogates=list(clues.surrogates),
                                     draft=clues.draft_answer, pointers=list(clues.pointers))]
        comp = self._composition()
        if state.request.task == "memorag":
            complete(comp.route(state))  # as run() does: the re-ranker may read after the routed unit's memory
        complete(comp.retrieve(state))
        complete(comp.rerank(state))

        def hits(evidence) -> list:
            return [Hit(chunk_id=int(e.chunk_id), score=e.score, text=e.text, query=e.query) for e in evidence]

        return hits(state.evidence), hits(state.ranking[:candidates])

    def retrieve(self, queries: list[str] | str, hits: int | None = None):
        """Top ``hits`` chunks per query, de-duplicated, in corpus order (list of retrieval ``Hit``); upstream's
        call. MemoRAG's own answers use :meth:`evidence` (fused, best first)."""
        self._require_ready()
        return self.retriever.search(queries, hits=hits or self.ret_hit)

    def answer_from_evidence(self, query: str | None, evidence: list[str], *, prompt_template: str | None = None,
                             max_new_tokens: int = 256, task: str = "qa_gen") -> str:
        """The generator's answer from ``evidence`` (``task`` = ``qa_gen`` or ``sum_gen``): the composition's
        generate step."""
        return "".join(self._generate(query, evidence, prompt_template, max_new_tokens, task, stream=False))

    def stream_answer(self, query: str | None, evidence: list[str], *, prompt_template: str | None = None,
                      max_new_tokens: int = 256, task: str = "qa_gen") -> Iterator[str]:
        """Like :meth:`answer_from_evidence`, yielding text pieces as the generator produces them."""
        yield from self._generate(query, evidence, prompt_template, max_new_tokens, task, stream=True)

    def _generate(self, query, evidence, prompt_template, max_new_tokens, task, *, stream: bool):
        from memorag_core.query.compose import run_sync
        from memorag_core.query.types import Evidence

        if task not in ("qa_gen", "sum_gen"):
            raise InvalidInputError(f"task must be qa_gen or sum_gen, got {task!r}")
        state = self._state(query, task="summarize" if task == "sum_gen" else "memorag",
                            max_new_tokens=max_new_tokens)
        state.evidence = [Evidence(BUNDLE_COLLECTION, BUNDLE_UNIT, str(i), 0.0, text)
                          for i, text in enumerate(evidence)]
        yield from run_sync(self._composition(template=prompt_template).generate(state, stream=stream))

    def stream(self, query: str | None = None, task_type: str = "memorag", *, prompt_template: str | None = None,
               max_new_tokens: int = 256, use_memory_answer: bool = False, hits: int | None = None):
        """The whole query over this bundle as events: ``token`` pieces of the answer, then a ``final`` event whose
        :class:`~memorag_core.query.types.QueryResult` holds the clues, the evidence and the timings (the same
        events the query engine and the Serve app yield)."""
        from memorag_core.query.compose import run_sync

        if task_type not in TASK_TYPES:
            raise InvalidInputError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
        self._require_ready()
        top_k = hits or (self.ret_hit if task_type != "summarize" else max(self.ret_hit, self.summary_hits))
        state = self._state(query, task=task_type, max_new_tokens=max_new_tokens, top_k=top_k,
                            clue_max_new_tokens=self.clue_max_new_tokens, use_draft=use_memory_answer)
        yield from run_sync(self._composition(template=prompt_template).run(
            state.name, state.version, state.request))

    def __call__(self, query: str | None = None, context: str | None = None, task_type: str = "memorag",
                 prompt_template: str | None = None, max_new_tokens: int = 256, reset_each_call: bool = False,
                 use_memory_answer: bool = False) -> str:
        """Answer ``query`` (``task_type`` qa | memorag | summarize), memorizing ``context`` first if needed.

        ``qa`` is plain RAG (the question alone retrieves), ``memorag`` adds the memory's clues (and, with
        ``use_memory_answer``, its draft answer as one more retrieval query), ``summarize`` retrieves with the
        memory's key points; each runs the query composition that the engine and the Serve app run."""
        from memorag_core.query.compose import final_result

        if task_type not in TASK_TYPES:
            raise InvalidInputError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
        if reset_each_call:
            self.memory.reset()
            self.retriever.remove_all()
        if not self.is_ready:
            if context is None:
                raise MemoryNotReadyError("nothing is memorized: pass context= or call memorize/load first")
            self.memorize(context)
        if task_type != "summarize" and not query:
            raise InvalidInputError(f"task_type={task_type!r} needs a query")
        return final_result(self.stream(query if task_type != "summarize" else None, task_type,
                                        prompt_template=prompt_template, max_new_tokens=max_new_tokens,
                                        use_memory_answer=use_memory_answer)).answer


#: the collection name and unit id a bundle answers under (a bundle is a one-unit collection)
BUNDLE_COLLECTION = "bundle"
BUNDLE_UNIT = "bundle"

#: a facade's requests are checked for types and sense, with bounds as wide as upstream's API allows
FACADE_LIMITS = QueryLimits(max_query_chars=10**7, max_new_tokens=10**6, max_clue_tokens=10**5, max_units=1,
                            max_top_k=10**6)


class BundleStages:
    """The query composition's stages over one facade's bundle (see :mod:`memorag_core.query.compose`): one
    unit (the bundle's memory) is routed, its memory writes the clues, the bundle's chunks are searched, and the
    facade's generator answers.

    Args:
        pipe: the :class:`MemoRAG`. template: a prompt template for the answer (``{context}``, ``{input}``).
        pointers: compute attention pointers with the clues (None: when the plan uses them).
    """

    def __init__(self, pipe: MemoRAG, *, template: str | None = None, pointers: bool | None = None) -> None:
        from memorag_core.query.answer import Answerer
        from memorag_core.query.compose import GeneratorStage

        self.pipe = pipe
        self.pointers = "pointer" in pipe.plan_config.sources if pointers is None else pointers
        self.retriever = self
        self.memory = self
        self.sessions = None
        self.plan = pipe.plan_config
        self.generator = GeneratorStage(answerer=_TemplatedAnswerer(Answerer(pipe.generator), template))

    # -- retriever ---------------------------------------------------------------------------------------------
    async def stored_summary(self, name, version, request):
        return None

    async def units(self, name, version, request):
        from memorag_core.query.types import RoutedUnit

        if request.task == "qa":
            return []
        return [RoutedUnit(BUNDLE_UNIT, 1.0, "bundle")]

    async def retrieve(self, name, version, query, clues, top_k, doc_id=None, extra=None):
        from memorag_core.query.retrieve import clue_set_of
        from memorag_core.query.types import Evidence

        fused, plan = self.pipe.fused(query, clue_set_of(clues, extra), top_k)
        corpus = self.pipe.retriever.corpus
        return ([Evidence(BUNDLE_COLLECTION, BUNDLE_UNIT, str(int(f.key)), f.score, corpus[int(f.key)],
                          sources=list(f.sources), query=f.query) for f in fused], list(plan.queries))

    # -- memory ------------------------------------------------------------------------------------------------
    async def clues(self, name, version, unit_ids, query, max_new_tokens, with_draft=False):
        from memorag_core.query.types import UnitClues

        t0 = time.perf_counter()
        out = self.pipe.memory.clue_texts(query, max_new_tokens, with_answer=with_draft)
        lang = self.pipe.prompts.language
        pointed = self.pipe.pointers(query) if self.pointers else []
        return [UnitClues(BUNDLE_UNIT, spans=split_clue_lines(out["spans"], lang),
                          surrogates=split_clue_lines(out["surrogates"], lang), draft=out.get("answer") or None,
                          pointers=pointed, seconds=time.perf_counter() - t0, cached=True)]

    async def rerank(self, name, version, question, lines, dense_scores, prefix_unit=None, max_tokens=None,
                     bridge_slots=0, bridge_width=2):
        from memorag_core.retrieval.rerank import memory_scores

        return memory_scores(self.pipe.memory, question, lines, dense_scores, prefix=prefix_unit is not None,
                             max_tokens=max_tokens, bridge_slots=bridge_slots, bridge_width=bridge_width)

    async def key_points(self, name, version, unit_ids, max_new_tokens):
        from memorag_core.query.types import UnitClues

        t0 = time.perf_counter()
        text = self.pipe.memory.summarize(max(max_new_tokens, self.pipe.clue_max_new_tokens, 256))
        points = split_clue_lines(text, self.pipe.prompts.language) or ([text.strip()] if text.strip() else [])
        return [UnitClues(BUNDLE_UNIT, key_points=points, seconds=time.perf_counter() - t0, cached=True)]


class _TemplatedAnswerer:
    """An answerer whose prompt comes from a caller's template (the facade's ``prompt_template``)."""

    def __init__(self, answerer, template: str | None) -> None:
        self.answerer, self.template = answerer, template

    def generate(self, task, query, evidence, *, max_new_tokens):
        return self.answerer.generate(task, query, evidence, max_new_tokens=max_new_tokens, template=self.template)

    def stream(self, task, query, evidence, *, max_new_tokens):
        return self.answerer.stream(task, query, evidence, max_new_tokens=max_new_tokens, template=self.template)


class MemoRAGLite(MemoRAG):
    """Lite mode (upstream ``MemoRAGLite``): one model writes gists, holds the gist memory and answers.

    Args mirror upstream: ``gen_model_name_or_path`` (None = embedded SmolLM2), ``ret_model_name_or_path``,
    ``customized_gen_model`` (answers only; gists and clues still come from the local model), ``ret_hit``,
    ``retrieval_chunk_size``, ``cache_dir``, ``access_token``, ``load_in_4bit``, ``enable_flash_attn``.
    """

    def __init__(self, gen_model_name_or_path: str | None = None, ret_model_name_or_path: str | None = None,
                 customized_gen_model: Any = None, ret_hit: int = 3, retrieval_chunk_size: int | None = None,
                 cache_dir: str | None = None, access_token: str | None = None, load_in_4bit: bool = False,
                 enable_flash_attn: bool = False, *, gist_chunk_tokens: int = 2048, **kwargs: Any) -> None:
        options = LoadOptions(cache_dir=cache_dir, access_token=access_token, load_in_4bit=load_in_4bit,
                              enable_flash_attn=enable_flash_attn)
        memory_config = kwargs.pop("memory_config", None) or MemoryConfig(
            kind="gist", model=gen_model_name_or_path, ratio=1, gist_chunk_tokens=gist_chunk_tokens, load=options)
        super().__init__(ret_model_name_or_path=ret_model_name_or_path, customized_gen_model=customized_gen_model,
                         ret_hit=ret_hit, retrieval_chunk_size=retrieval_chunk_size, memory_config=memory_config,
                         **kwargs)
