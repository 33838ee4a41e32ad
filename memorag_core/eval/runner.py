"""Run a dataset through the evaluation modes with one set of models, and record every prediction.

Modes (all use the same chunks, embedder, ``hits`` and generator prompt; only the evidence differs):

``full``
    The long-LLM baseline: the whole context goes to the generator when it fits the generator's window
    (``full_context_max_tokens``); otherwise the example is *skipped* with the reason recorded.
``rag``
    Standard RAG: the question alone retrieves ``hits`` chunks.
``rag_matched``
    The question alone, with as many chunks as the ``memorag`` mode handed the generator for that question (the
    equal-budget baseline; runs after ``memorag``).
``memorag``
    MemoRAG: the memory model writes clues (recalled spans, surrogate questions) and attention pointers; the
    facade's path (:meth:`memorag_core.facade.MemoRAG.evidence`: restatements dropped, spans grounded, weighted
    reciprocal-rank fusion where the question counts most) hands the generator the fused top ``hits`` chunks.
``memorag_draft``
    MemoRAG with the memory's draft answer: as ``memorag`` with the draft as one more (low-weight) retrieval query.
    The generator reads exactly the budget's passages in every mode (the query composition's rule,
    :mod:`memorag_core.query.compose`): upstream also pasted the draft into the evidence; we do not.

Every retrieval mode runs the steps of the one query composition (:mod:`memorag_core.query.compose`) through
the facade's bundle stages (a question's paragraphs are a one-unit collection): the clue step, the retrieve step
with the run's plan settings (``plan``, recorded in the report), the generate step.

Corpus settings:

``per_question``
    Each example's own passages are memorized and indexed on their own (HotpotQA: its 10 paragraphs).
``pooled``
    The passages of the first ``pooled_examples`` examples (all by default), deduplicated, form one collection:
    memorized once into one memory (saved under the output folder and reloaded when a run resumes) and indexed
    once. Every question then runs against the whole pool, where a global memory should matter.

Resuming: predictions are keyed by (setting, mode, example id) in ``predictions.json``; a rerun with the same
config skips what is there and appends the rest. A rerun with a config that changes results (models, memory,
hits, chunking, token budgets) is refused unless ``overwrite`` is set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memorag_core.errors import CorruptArtifactError, InvalidInputError
from memorag_core.eval.datasets import (
    EvalChunk,
    EvalExample,
    Passage,
    chunk_passages,
    join_passages,
    pooled_passages,
)
from memorag_core.eval.metrics import METRICS, best_over_references, evidence_recall
from memorag_core.eval.report import load_results, save_results, write_report

logger = logging.getLogger(__name__)

MODES = ("full", "rag", "rag_matched", "memorag", "memorag_draft")
SETTINGS = ("per_question", "pooled")
_MEMORY_MODES = ("memorag", "memorag_draft")
#: the wider budget whose recall is recorded beside R@k (``recall_at_5``): the final ranking cut at 5
R_AT_WIDE = 5
_RETRIEVAL_MODES = ("rag", "rag_matched", "memorag", "memorag_draft")


def _d(text: str) -> dict[str, str]:
    return {"description": text}


@dataclass
class EvalConfig:
    """What an evaluation run does. Validated in ``__post_init__``; every error names the field."""

    dataset: str = field(metadata=_d("JSONL file in HotpotQA or LongBench format"))
    output_dir: str = field(default="runs/eval", metadata=_d(
        "folder for predictions.json, results.md, results.png and the pooled memory"))
    dataset_format: str = field(default="auto", metadata=_d("auto (from the fields), hotpotqa or longbench"))
    task: str = field(default="auto", metadata=_d(
        "LongBench task: auto (summary for LongBench's summarization datasets), qa or summary"))
    limit: int | None = field(default=None, metadata=_d("evaluate only the first N examples (None: all)"))
    offset: int = field(default=0, metadata=_d(
        "skip the first N examples of the file (a held-out slice: --offset 100 --limit 100 is questions 101-200)"))
    modes: tuple[str, ...] = field(default=MODES, metadata=_d(f"modes to run, a subset of {MODES}"))
    settings: tuple[str, ...] = field(default=SETTINGS, metadata=_d(f"corpus settings to run, a subset of {SETTINGS}"))
    pooled_examples: int | None = field(default=None, metadata=_d(
        "pooled setting: pool the passages of the first N examples (None: of all evaluated examples); "
        "questions are still the evaluated examples that fall in the pool"))
    mem_model: str | None = field(default=None, metadata=_d("memory model (folder or hub id); None: embedded SmolLM2"))
    ret_model: str | None = field(default=None, metadata=_d("embedder (folder or hub id); None: embedded MiniLM"))
    gen_model: str | None = field(default=None, metadata=_d(
        "generator model (folder or hub id); None: the facade's default (the memory model)"))
    generator: str | None = field(default=None, metadata=_d(
        "generator backend spec for memorag_core.generators.load_generator (e.g. a vLLM or OpenAI spec); "
        "overrides gen_model"))
    memory_kind: str = field(default="compressed_kv", metadata=_d("memory kind (see MemoryConfig.kind)"))
    ratio: int = field(default=4, metadata=_d("memory compression ratio for the per-question setting"))
    pooled_ratio: int = field(default=16, metadata=_d(
        "memory compression ratio for the pooled setting (a larger corpus needs a higher ratio to fit)"))
    window: int = field(default=1024, metadata=_d("memory prefill window in tokens"))
    positions: str = field(default="compact", metadata=_d("memory positions: compact or original"))
    hits: int = field(default=3, metadata=_d("chunks retrieved per retrieval query (k of recall@k)"))
    units: int = field(default=4, metadata=_d("over a published collection: most unit memories that write clues"))
    chunk_size: int | None = field(default=None, metadata=_d(
        "retrieval chunk budget in the embedder's tokens; None: the embedder's limit (all-MiniLM-L6-v2: 254); a "
        "passage that fits is never split, and a size above the embedder's limit is refused"))
    clue_max_new_tokens: int = field(default=128, metadata=_d(
        "most tokens per clue generation (recall, rewrite, draft)"))
    answer_max_new_tokens: int = field(default=32, metadata=_d("most tokens of a generated answer"))
    full_context_max_tokens: int | None = field(default=None, metadata=_d(
        "longest context (tokens) the full mode sends to the generator; None: the generator model's "
        "max_position_embeddings minus answer_max_new_tokens minus 256 for the prompt template"))
    device: str = field(default="auto", metadata=_d("device for the local models: auto, cpu or cuda[:N]"))
    share_clues: bool = field(default=True, metadata=_d(
        "decode the clues once per example: memorag_draft's batch (spans, surrogates, draft) also gives memorag "
        "its spans and surrogates; otherwise memorag decodes its own batch of two (slower, same prompts)"))
    plan: dict = field(default_factory=dict, metadata=_d(
        "retrieval plan settings (memorag_core.retrieval.queries.PlanConfig fields, fusion included): the same "
        "fields as the serve config's retriever.plan and the CLI's --plan; empty: the library defaults"))
    store: str | None = field(default=None, metadata=_d(
        "pooled setting over a published collection: the store URL (with collection); questions then run through "
        "the query engine, as served, instead of a pool memorized in this process"))
    collection: str | None = field(default=None, metadata=_d(
        "pooled setting over a published collection: its name (with store); its documents' doc_id are the "
        "passage titles, so recall is read from the evidence's doc_id"))
    storage_options: dict | None = field(default=None, metadata=_d("fsspec options of store (e.g. endpoint_url)"))
    overwrite: bool = field(default=False, metadata=_d(
        "start afresh even if predictions.json exists with a different config (it is replaced)"))

    def __post_init__(self) -> None:
        self.modes = tuple(self.modes)
        self.settings = tuple(self.settings)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise InvalidInputError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise InvalidInputError(f"settings must be a non-empty subset of {SETTINGS}, got {self.settings}")
        for name in ("hits", "clue_max_new_tokens", "answer_max_new_tokens", "ratio", "pooled_ratio",
                     "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("limit", "pooled_examples", "full_context_max_tokens", "chunk_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidInputError(f"{name} must be a positive integer or None, got {value!r}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or self.offset < 0:
            raise InvalidInputError(f"offset must be an integer >= 0, got {self.offset!r}")
        if (self.store is None) != (self.collection is None):
            raise InvalidInputError("store and collection go together (the pooled setting over a published "
                                    "collection)")
        if self.collection is not None and "per_question" in self.settings:
            raise InvalidInputError("a published collection is a pool: run it with settings=('pooled',)")
        if self.collection is not None and any(m in ("full", "rag_matched") for m in self.modes):
            raise InvalidInputError("over a published collection the modes are rag, memorag and memorag_draft")
        self.plan_config()  # unknown plan fields are named here

    def plan_config(self):
        """The :class:`~memorag_core.retrieval.queries.PlanConfig` of :attr:`plan`."""
        from memorag_core.retrieval.queries import PlanConfig

        return PlanConfig.from_dict(self.plan)

    def fingerprint(self) -> dict[str, Any]:
        """The fields that change predictions: a resumed run must match them."""
        d = dataclasses.asdict(self)
        for k in ("output_dir", "limit", "offset", "modes", "settings", "overwrite", "device", "pooled_examples",
                  "storage_options"):
            d.pop(k)
        return d


def chunk_char_starts(context: str, chunks: list[EvalChunk]) -> list[int]:
    """Where each chunk's text starts in ``context`` (the joined passages), searched forward in order; a piece of
    a split passage that carries its title as a prefix is found by its body."""
    starts, pos = [], 0
    for ch in chunks:
        body = ch.text
        if ch.title and body.startswith(f"{ch.title}: ") and context.find(body, pos) < 0:
            body = body[len(ch.title) + 2:]
        at = context.find(body, pos)
        if at < 0:
            at = pos  # not found verbatim (whitespace trimmed differently): the previous end
        starts.append(at)
        pos = at
    return starts


def _same_field(name: str, a: Any, b: Any) -> bool:
    """Whether two fingerprint values are the same setting: the dataset may be named by another path to the same
    file (relative paths are read from the current folder)."""
    if name == "dataset" and isinstance(a, str) and isinstance(b, str):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    return info


class EvalRunner:
    """Runs examples through modes and settings with one MemoRAG pipeline, writing predictions as it goes.

    Args:
        config: The run's configuration.
        pipeline: A ready :class:`memorag_core.facade.MemoRAG` (tests pass one built on tiny models); ``None``
            builds one from ``config``.
    """

    def __init__(self, config: EvalConfig, pipeline: Any = None) -> None:
        self.config = config
        self.out_dir = Path(config.output_dir)
        self.predictions_path = self.out_dir / "predictions.json"
        self.pipeline = pipeline if pipeline is not None else self._build_pipeline()
        from memorag_core.retrieval.chunker import TokenChunker

        # chunks are budgeted in the pipeline's chunker tokens (the embedder's own, so that a chunk is embedded
        # whole); token counts in the report use the memory model's tokenizer
        self.chunk_size = config.chunk_size or self.pipeline.retrieval_chunk_size
        self.chunker = self.pipeline.chunker
        if self.chunk_size != self.chunker.chunk_size:
            from memorag_core.retrieval import chunk_size_for

            if getattr(self.chunker.tokenizer, "is_fast", False) and self.chunker.tokenizer is getattr(
                    self.pipeline.embedder, "tokenizer", None):
                chunk_size_for(self.pipeline.embedder, self.chunk_size)  # refuses a size the embedder would cut
            self.chunker = TokenChunker(tokenizer=self.chunker.tokenizer, chunk_size=self.chunk_size)
        self._counter = TokenChunker(tokenizer=self._tokenizer(), chunk_size=max(self.chunk_size, 16))
        self._chunkers: dict[int, Any] = {self.chunk_size: self.chunker}
        # memories by compression ratio, all sharing the pipeline's loaded memory model
        self._clue_cache: dict[str, tuple[Any, float]] = {}
        self._engine = None
        self._memories: dict[int, Any] = {self.pipeline.memory.config.ratio: self.pipeline.memory}

    # -- construction -------------------------------------------------------------------------------------------
    def _build_pipeline(self) -> Any:
        from memorag_core.facade import MemoRAG

        c = self.config
        return MemoRAG(mem_model_name_or_path=c.mem_model, ret_model_name_or_path=c.ret_model,
                       gen_model_name_or_path=c.gen_model, ret_hit=c.hits, retrieval_chunk_size=c.chunk_size,
                       memory_config=self._memory_config(c.ratio), generator=c.generator,
                       clue_max_new_tokens=c.clue_max_new_tokens, plan_config=c.plan_config())

    def _memory_config(self, ratio: int) -> Any:
        from memorag_core.memory import MemoryConfig
        from memorag_core.models import LoadOptions

        c = self.config
        trust = c.memory_kind == "beacon"  # beacon checkpoints run their own modelling code
        return MemoryConfig.for_kind(kind=c.memory_kind, model=c.mem_model, ratio=ratio, window=c.window,
                                     positions=c.positions, load=LoadOptions(device=c.device, trust_remote_code=trust))

    def _use_memory(self, ratio: int) -> None:
        """Point the pipeline at a memory with ``ratio``, sharing the loaded model (built once per ratio)."""
        if ratio not in self._memories:
            from memorag_core.memory import build_memory

            base = self.pipeline.memory
            config = self._memory_config(ratio)
            config.language = base.config.language
            self._memories[ratio] = build_memory(config, model=base.model, tokenizer=base.tokenizer)
        self.pipeline.memory = self._memories[ratio]

    def _tokenizer(self) -> Any:
        return self.pipeline.memory.tokenizer

    def _full_context_limit(self) -> int:
        if self.config.full_context_max_tokens is not None:
            return self.config.full_context_max_tokens
        model = getattr(self.pipeline.generator, "model", None)
        max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if not max_pos:
            raise InvalidInputError(
                "the full mode needs full_context_max_tokens: the generator does not expose a model config with "
                "max_position_embeddings (e.g. a vLLM or OpenAI backend); pass --full-context-max-tokens")
        return int(max_pos) - self.config.answer_max_new_tokens - 256

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` under the memory model's tokenizer (without special tokens): the report's counts."""
        return self._counter.count_tokens(text)

    def make_chunks(self, passages: Iterable[Passage]) -> list[EvalChunk]:
        """Chunk passages with the pipeline's budget (embedder tokens), keeping a fitting passage whole and titles
        attached."""
        return chunk_passages(passages, self.chunker.count_tokens, self._split, self.chunk_size)

    def _split(self, text: str, budget: int) -> list[str]:
        if budget not in self._chunkers:
            from memorag_core.retrieval.chunker import TokenChunker

            self._chunkers[budget] = TokenChunker(tokenizer=self.chunker.tokenizer, chunk_size=budget)
        return [c.text for c in self._chunkers[budget].split(text)]

    # -- results file -------------------------------------------------------------------------------------------
    def _load_or_new(self) -> dict[str, Any]:
        fp = self.config.fingerprint()
        if self.predictions_path.exists() and not self.config.overwrite:
            results = load_results(self.predictions_path)
            old = results.get("config_fingerprint", {})
            changed = sorted(k for k in set(fp) | set(old) if not _same_field(k, fp.get(k), old.get(k)))
            if changed:
                raise InvalidInputError(
                    f"{self.predictions_path} was written with a different config (fields {changed}); use another "
                    "output folder, or overwrite=True (--overwrite) to start afresh")
            logger.info("resuming from %s", self.predictions_path)
            return results
        return {"config": dataclasses.asdict(self.config), "config_fingerprint": fp, "machine": _machine(),
                "settings": {}, "notes": []}

    # -- running ------------------------------------------------------------------------------------------------
    def run(self, examples: list[EvalExample], progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Evaluate ``examples`` in every configured setting and mode; return the results dict.

        Writes ``predictions.json`` after every example (atomically), then ``results.md`` and ``results.png``.
        """
        if not examples:
            raise InvalidInputError("no examples to evaluate")
        results = self._load_or_new()
        results["machine"] = _machine()
        results["path"] = {
            "per_question": "the query composition's clue, retrieve and generate steps over each question's "
                            "paragraphs as a one-unit bundle (memorag_core.facade.BundleStages)",
            "pooled": (f"the query engine over published collection {self.config.collection!r} (store "
                       f"{self.config.store}), as served" if self.config.collection else
                       "the query composition's steps over one bundle of the pooled paragraphs"),
            "plan": self.config.plan_config().to_dict()}
        for setting in self.config.settings:
            block = results["settings"].setdefault(
                setting, {"predictions": {m: {} for m in self.config.modes}, "wall_seconds": 0.0, "info": {}})
            for m in self.config.modes:
                block["predictions"].setdefault(m, {})
            self._wall = (block, block["wall_seconds"], time.perf_counter())
            self._clue_cache = {}  # clues depend on the setting's memory
            try:
                if setting == "per_question":
                    self._run_per_question(examples, results, block, progress)
                else:
                    self._run_pooled(examples, results, block, progress)
            finally:
                self._save(results)
        results["notes"] = self._notes(results)
        save_results(results, self.predictions_path)
        write_report(results, self.out_dir)
        return results

    def _reads_memory(self, modes: list[str]) -> bool:
        """Whether these modes read the question's compressed memory: text clues, a draft, or re-ranking after the
        memory (``rerank_prefix``). The default memorag path re-ranks with the memory *model* over the candidates
        alone, so the per-question memory is not written for it (nothing would read it)."""
        plan = self.pipeline.plan_config
        return plan.decodes_clues("memorag_draft" in modes) or plan.rerank_prefix

    def _save(self, results: dict[str, Any]) -> None:
        """Write predictions.json with the setting's wall time so far (summed over resumed sessions)."""
        block, before, start = self._wall
        block["wall_seconds"] = before + time.perf_counter() - start
        save_results(results, self.predictions_path)

    @staticmethod
    def _ordered(modes: list[str]) -> list[str]:
        """``rag_matched`` after ``memorag`` (it reads the memory mode's budget)."""
        return sorted(modes, key=lambda m: m == "rag_matched")

    def _todo(self, block: dict[str, Any], ex: EvalExample) -> list[str]:
        return [m for m in self.config.modes if ex.id not in block["predictions"][m]]

    def _run_per_question(self, examples, results, block, progress) -> None:
        self._use_memory(self.config.ratio)
        for i, ex in enumerate(examples):
            todo = self._todo(block, ex)
            if not todo:
                continue
            chunks = self.make_chunks(ex.passages)
            context = ex.context()
            pre: dict[str, float] = {}
            if any(m in _RETRIEVAL_MODES for m in todo):
                pre["index"] = self._index(chunks, context)
            if any(m in _MEMORY_MODES for m in todo) and self._reads_memory(todo):
                t = time.perf_counter()
                self.pipeline.memory.reset()
                self.pipeline.memory.memorize(context)
                pre["memorize"] = time.perf_counter() - t
            self._block = block
            for mode in self._ordered(todo):
                block["predictions"][mode][ex.id] = self._run_mode(mode, ex, chunks, context, pre)
            self._save(results)
            if progress:
                progress(f"per_question {i + 1}/{len(examples)} {ex.id}")

    def _run_collection(self, examples, results, block, progress) -> None:
        """The pooled setting over a published collection: each question through the query engine, as served
        (route, clues from the routed units' memories, shard search, fusion, generation)."""
        from memorag_core.query import QueryEngine, QueryRequest

        c = self.config
        if self._engine is None:
            self._engine = QueryEngine(c.store, c.storage_options, generator=c.generator, plan=c.plan_config(),
                                       device=None if c.device == "auto" else c.device)
        block["info"].update({"collection": c.collection, "store": c.store})
        self._block = block
        todo = [ex for ex in examples if self._todo(block, ex)]
        for i, ex in enumerate(todo):
            for mode in self._todo(block, ex):
                request = QueryRequest(ex.question, task="qa" if mode == "rag" else "memorag",
                                       max_new_tokens=c.answer_max_new_tokens, units=c.units, top_k=c.hits,
                                       clue_max_new_tokens=c.clue_max_new_tokens, use_draft=mode == "memorag_draft",
                                       candidates=R_AT_WIDE)
                block["predictions"][mode][ex.id] = self.engine_record(ex, self._engine.query(c.collection, request))
            self._save(results)
            if progress:
                progress(f"pooled (collection {c.collection}) {i + 1}/{len(todo)} {ex.id}")

    def engine_record(self, ex: EvalExample, result) -> dict[str, Any]:
        """The prediction record of one query engine result (titles are the evidence's ``doc_id``)."""
        titles = [e.doc_id for e in result.evidence]
        record: dict[str, Any] = {
            "question": ex.question, "answers": list(ex.answers), "supporting_titles": list(ex.supporting_titles),
            "task": ex.task, "meta": ex.meta, "version": result.version,
            "clues": {"spans": [s for u in result.clues for s in u.spans],
                      "surrogates": [s for u in result.clues for s in u.surrogates],
                      "draft_answer": next((u.draft for u in result.clues if u.draft), None)},
            "retrieval_queries": [q for _, q in result.retrieval_queries],
            "evidence_chunk_ids": [e.chunk_id for e in result.evidence], "evidence_titles": titles,
            "recall_at_k": evidence_recall(titles[: self.config.hits], ex.supporting_titles),
            "recall_evidence": evidence_recall(titles, ex.supporting_titles),
            f"recall_at_{R_AT_WIDE}": evidence_recall([r.doc_id for r in result.ranking[:R_AT_WIDE]],
                                                      ex.supporting_titles),
            "prediction": result.answer, "scores": self._score(result.answer, ex),
            "seconds": {k: v for k, v in result.timings.items()
                        if k in ("route", "clues", "retrieve", "rerank", "generate")},
            "tokens_read": self.count_tokens(ex.question) + sum(self.count_tokens(e.text) for e in result.evidence),
            "tokens_generated": self.count_tokens(result.answer),
        }
        return record

    def _run_pooled(self, examples, results, block, progress) -> None:
        c = self.config
        if c.collection is not None:
            self._run_collection(examples, results, block, progress)
            return
        pool_n = c.pooled_examples or len(examples)
        pool_examples = examples[:pool_n]
        passages = pooled_passages(pool_examples)
        chunks = self.make_chunks(passages)
        context = join_passages(passages)
        questions = pool_examples
        todo_any = [ex for ex in questions if self._todo(block, ex)]
        if not todo_any:
            return
        info = block["info"]
        if info.get("pooled_examples") not in (None, len(pool_examples)):
            raise InvalidInputError(
                f"{self.predictions_path} holds pooled predictions over a pool of {info['pooled_examples']} examples, "
                f"not {len(pool_examples)}; pass the same --pooled-examples/--limit, or use another output folder")
        info.update({"pooled_examples": len(pool_examples), "passages": len(passages), "chunks": len(chunks)})
        if any(m in _RETRIEVAL_MODES for m in c.modes):
            info.update(self._pooled_index(chunks))
            self.pipeline.set_chunk_starts(context, chunk_char_starts(context, chunks))
        if any(m in _MEMORY_MODES for m in c.modes):
            info.update(self._pooled_memory(context, len(pool_examples)))
        self._save(results)
        self._block = block
        for i, ex in enumerate(todo_any):
            for mode in self._ordered(self._todo(block, ex)):
                block["predictions"][mode][ex.id] = self._run_mode(mode, ex, chunks, context, {})
            self._save(results)
            if progress:
                progress(f"pooled {i + 1}/{len(todo_any)} {ex.id}")

    def _pooled_memory(self, context: str, n_examples: int) -> dict[str, Any]:
        """Memorize the pooled corpus once; save it under the output folder and reload it on resume."""
        from memorag_core.memory.config import stable_hash

        self._use_memory(self.config.pooled_ratio)
        memory = self.pipeline.memory
        key = stable_hash({"memory": memory.config.fingerprint_dict(), "text": stable_hash(context)})[:16]
        path = self.out_dir / "pooled_memory" / key
        memory.reset()
        t = time.perf_counter()
        if path.exists():
            memory.load(str(path))
            action = "loaded"
        else:
            shown, memory.show_progress = memory.show_progress, True  # the pool takes minutes to hours: a bar
            try:
                memory.memorize(context)
            finally:
                memory.show_progress = shown
            path.parent.mkdir(parents=True, exist_ok=True)
            memory.save(str(path))
            action = "memorized"
        seconds = time.perf_counter() - t
        stats = memory.stats.to_dict() if hasattr(memory.stats, "to_dict") else dict(vars(memory.stats))
        logger.info("pooled memory %s in %.1f s: %s", action, seconds, stats)
        timing = {"memorize_seconds": round(seconds, 1)} if action == "memorized" else {"load_seconds": round(seconds, 2)}
        # on resume only load_seconds is added: memorize_seconds from the first session stays in the info
        return {"memory_action": action, **timing, "memory_stats": stats,
                "memory_tokens": self.count_tokens(context), "memory_path": str(path),
                "memory_ratio": self.config.pooled_ratio}

    def _pooled_index(self, chunks: list[EvalChunk]) -> dict[str, Any]:
        """Embed the pooled chunks once; save the index under the output folder and reload it on resume.

        Embedding ~3K HotpotQA paragraphs takes ~30 min on one CPU thread, so a resumed run must not redo it. The
        saved bundle (chunks.parquet + index.faiss, checksummed manifest) is keyed by the embedder, the index
        config and the chunk texts; anything else embeds afresh.
        """
        from memorag_core.memory.config import stable_hash
        from memorag_core.retrieval import DenseRetriever
        from memorag_core.store.bundle import Bundle

        pipe = self.pipeline
        texts = [ch.text for ch in chunks]
        key = stable_hash({"embedder": getattr(pipe.embedder, "name", None) or self.config.ret_model,
                           "index": pipe.index_config.__dict__, "chunks": stable_hash(texts)})[:16]
        path = self.out_dir / "pooled_index" / key
        t = time.perf_counter()
        if (path / "manifest.json").exists():
            bundle = Bundle(str(path))
            bundle.read_manifest()
            retriever = DenseRetriever.read_from(bundle, pipe.embedder, pipe.index_config, hits=pipe.ret_hit)
            if retriever.corpus != texts:
                raise CorruptArtifactError(f"{path}: the saved pooled index holds other chunks than this run's")
            pipe.retriever = retriever
            seconds = time.perf_counter() - t
            logger.info("pooled index loaded from %s in %.1f s", path, seconds)
            return {"index_load_seconds": round(seconds, 2)}
        pipe.index_corpus(texts)
        seconds = time.perf_counter() - t
        bundle = Bundle(str(path))
        pipe.retriever.write_to(bundle)
        bundle.commit({"kind": "memorag-eval-pooled-index", "chunks": len(texts)})
        logger.info("pooled index of %d chunks built in %.1f s, saved to %s", len(texts), seconds, path)
        # on resume only index_load_seconds is added: index_seconds from the first run stays in the info
        return {"index_seconds": round(seconds, 1)}

    def _index(self, chunks: list[EvalChunk], context: str | None = None) -> float:
        t = time.perf_counter()
        self.pipeline.index_corpus([ch.text for ch in chunks])
        if context is not None:
            self.pipeline.set_chunk_starts(context, chunk_char_starts(context, chunks))
        return time.perf_counter() - t

    # -- one mode on one example --------------------------------------------------------------------------------
    def _run_mode(self, mode: str, ex: EvalExample, chunks: list[EvalChunk], context: str,
                  pre: dict[str, float]) -> dict[str, Any]:
        c = self.config
        record: dict[str, Any] = {"question": ex.question, "answers": list(ex.answers),
                                  "supporting_titles": list(ex.supporting_titles), "task": ex.task, "meta": ex.meta}
        seconds: dict[str, float] = {}
        generated = 0
        if mode == "full":
            n = self.count_tokens(context)
            limit = self._full_context_limit()
            if n > limit:
                record.update(skipped=True, reason=f"context of {n} tokens exceeds the generator budget of {limit}")
                return record
            evidence = [context]
            record["evidence_chunk_ids"] = None
        else:
            if "index" in pre:
                seconds["index"] = pre["index"]
            draft = None
            clues = None
            if mode in _MEMORY_MODES and "memorize" in pre:
                seconds["memorize"] = pre["memorize"]
            # the composition's rule (PlanConfig.decodes_clues): text clues when the plan asks, with a draft always
            # (memorag_draft is the request's use_draft)
            if mode in _MEMORY_MODES and self.pipeline.plan_config.decodes_clues(mode == "memorag_draft"):
                clues, seconds["clues"] = self._clues(ex, mode)
                draft = clues.draft_answer if mode == "memorag_draft" else None
                if mode == "memorag" and clues.draft_answer is not None:
                    clues = dataclasses.replace(clues, draft_answer=None)
                record["clues"] = {"spans": list(clues.spans), "surrogates": list(clues.surrogates),
                                   "draft_answer": draft, "pointers": [k for k, _ in clues.pointers[:5]]}
                generated += sum(self.count_tokens(s) for s in [*clues.spans, *clues.surrogates, draft or ""])
            budget = c.hits
            if mode == "rag_matched":
                budget = self._matched_budget(ex)
            t = time.perf_counter()
            # the facade's own path: question (+ clues) -> fused candidates -> (memorag: attention re-ranking) ->
            # the top ``budget``, in the order the generator reads them; rag modes are plain dense retrieval (the qa
            # task). R@5 reads the same final ranking's first R_AT_WIDE (one ranking, cut twice)
            hits, ranked = self.pipeline.evidence_ranking(ex.question, clues, hits=budget, candidates=R_AT_WIDE,
                                                          task="memorag" if mode in _MEMORY_MODES else "qa")
            seconds["retrieve"] = time.perf_counter() - t  # the re-ranking included (memorag)
            if clues is not None and clues.plan is not None:
                plan = clues.plan
                record["retrieval_queries"] = [q for _, q in plan.queries]
                record["grounded_spans"] = [sp for sp, _ in plan.grounded]
            else:
                record["retrieval_queries"] = [ex.question]
            evidence_ids, topk_ids = self._rank_hits(hits, chunks)
            evidence = [chunks[i].text for i in evidence_ids]  # exactly the budget: a draft is a query, not evidence
            record["evidence_chunk_ids"] = evidence_ids
            record["evidence_titles"] = [chunks[i].title for i in evidence_ids]
            record["recall_at_k"] = evidence_recall([chunks[i].title for i in topk_ids], ex.supporting_titles)
            record["recall_evidence"] = evidence_recall(record["evidence_titles"], ex.supporting_titles)
            wide_ids, _ = self._rank_hits(ranked, chunks)
            record[f"recall_at_{R_AT_WIDE}"] = evidence_recall([chunks[i].title for i in wide_ids[:R_AT_WIDE]],
                                                               ex.supporting_titles)
        t = time.perf_counter()
        prediction = self.pipeline.answer_from_evidence(ex.question, evidence, max_new_tokens=c.answer_max_new_tokens)
        seconds["generate"] = time.perf_counter() - t
        generated += self.count_tokens(prediction)
        record["prediction"] = prediction
        record["scores"] = self._score(prediction, ex)
        record["seconds"] = seconds
        record["tokens_read"] = self.count_tokens(ex.question) + sum(self.count_tokens(e) for e in evidence)
        record["tokens_generated"] = generated
        return record

    def _clues(self, ex: EvalExample, mode: str) -> tuple[Any, float]:
        """Clues for ``ex`` in ``mode`` and the seconds their decode took; with ``share_clues`` one decode (with
        the draft) serves both memory modes, and both are charged its seconds (what each would cost alone, about:
        decoding 2 or 3 prompts as one batch costs nearly the same)."""
        both = self.config.share_clues and "memorag_draft" in self.config.modes
        want_draft = mode == "memorag_draft" or both
        cached = self._clue_cache.get(ex.id)
        if cached is not None and (cached[0].draft_answer is not None or not want_draft):
            return cached
        t = time.perf_counter()
        clues = self.pipeline.clues(ex.question, use_memory_answer=want_draft,
                                    max_new_tokens=self.config.clue_max_new_tokens)
        seconds = time.perf_counter() - t
        self._clue_cache = {ex.id: (clues, seconds)}
        return clues, seconds

    def _matched_budget(self, ex: EvalExample) -> int:
        """How many chunks the ``memorag`` mode handed the generator for ``ex`` (``rag_matched`` reads as many)."""
        rec = self._block["predictions"].get("memorag", {}).get(ex.id)
        if rec is None or rec.get("evidence_chunk_ids") is None:
            raise InvalidInputError("rag_matched needs the memorag mode's record of the same question: run both modes")
        return max(1, len(rec["evidence_chunk_ids"]))

    def _rank_hits(self, hits: list[Any], chunks: list[EvalChunk]) -> tuple[list[int], list[int]]:
        """Map hits to chunk indices: (all distinct chunks in the given order, the top ``hits`` by score).

        ``hits`` come best first with their fused score from :meth:`MemoRAG.evidence` (higher is better); a chunk
        met twice keeps its best score. A hit is matched by ``chunk_id`` when that index holds the same text, else
        by text; a hit that is not an evaluation chunk raises InvalidInputError."""
        by_text = {ch.text: i for i, ch in enumerate(chunks)}
        higher = getattr(getattr(self.pipeline.retriever, "index_config", None), "higher_is_better", True)
        best: dict[int, float] = {}
        order: list[int] = []
        for h in hits:
            idx = h.chunk_id if (isinstance(h.chunk_id, int) and 0 <= h.chunk_id < len(chunks)
                                 and chunks[h.chunk_id].text == h.text) else by_text.get(h.text)
            if idx is None:
                raise InvalidInputError(f"retrieved chunk {h.chunk_id!r} is not one of the indexed evaluation chunks")
            if idx not in best:
                order.append(idx)
                best[idx] = float(h.score)
            else:  # the retriever already merges queries; keep the best score if it did not
                best[idx] = max(best[idx], float(h.score)) if higher else min(best[idx], float(h.score))
        topk = sorted(best, key=lambda i: -best[i] if higher else best[i])[: self.config.hits]
        return order, topk

    @staticmethod
    def _score(prediction: str, ex: EvalExample) -> dict[str, float]:
        if ex.task == "summary":
            return {"rouge_l": best_over_references(METRICS["rouge_l"], prediction, ex.answers)}
        return {name: best_over_references(METRICS[name], prediction, ex.answers) for name in ("f1", "em")}

    def _notes(self, results: dict[str, Any]) -> list[str]:
        notes = []
        m = results.get("machine", {})
        notes.append(f"machine: {m.get('platform')}, {m.get('cpus')} CPUs, GPU {m.get('gpu')}, torch {m.get('torch')}")
        path = results.get("path") or {}
        for setting in results["settings"]:
            if setting in path:
                notes.append(f"{setting} path: {path[setting]}")
        if path.get("plan") is not None:
            notes.append(f"retrieval plan (fusion included): {path['plan']}")
        for setting, block in results["settings"].items():
            line = f"{setting}: wall time {block.get('wall_seconds', 0.0):.0f} s (summed over resumed sessions)"
            info = block.get("info") or {}
            if info:
                line += "; " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "memory_path")
            notes.append(line)
        return notes
