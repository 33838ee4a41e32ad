"""Small adapters that turn benchmark files into :class:`EvalExample` records, and title-keeping chunking.

Two formats are read (JSONL, one example per line):

* **HotpotQA** (distractor setting, as in ``hotpotqa_dev_300.jsonl``): ``id``, ``question``, ``answer``,
  ``supporting_facts.title``, ``context.title`` + ``context.sentences``. Each context paragraph becomes a
  :class:`Passage` whose text is ``"<title>: <sentences joined>"``.
* **LongBench**: ``input`` (the question or instruction), ``context`` (one long text), ``answers`` (a list), and
  optionally ``_id`` and ``dataset``. The context is one untitled passage.

Chunking (:func:`chunk_passages`) keeps a passage whole when it fits ``chunk_size`` tokens, so that evidence
recall can be measured by title; longer passages are split by the retrieval token chunker and every piece keeps
its passage's title (and is prefixed with it, so the title text is also embedded).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memorag_core.errors import InvalidInputError

logger = logging.getLogger(__name__)

# LongBench scores these datasets with ROUGE-L (summaries), all QA datasets with token F1.
LONGBENCH_SUMMARY_DATASETS = frozenset({"gov_report", "qmsum", "multi_news", "vcsum", "samsum"})


@dataclass(frozen=True)
class Passage:
    """One titled piece of an example's context.

    Attributes:
        title: The passage title (HotpotQA paragraph title); empty for untitled contexts (LongBench).
        text: The passage text as given to memory and retrieval (for HotpotQA ``"title: sentences"``).
    """

    title: str
    text: str


@dataclass(frozen=True)
class EvalExample:
    """One evaluation question with its context and references.

    Attributes:
        id: A stable id, used to resume runs (predictions are keyed by it).
        question: The question or instruction given to every mode.
        answers: Reference answers; scores take the best over them.
        passages: The example's own context, in order.
        supporting_titles: Gold supporting titles for evidence recall (empty when unknown).
        task: ``"qa"`` (F1/EM) or ``"summary"`` (ROUGE-L).
        meta: Extra fields kept for the predictions JSON (e.g. HotpotQA ``type`` and ``level``).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    passages: tuple[Passage, ...]
    supporting_titles: tuple[str, ...] = ()
    task: str = "qa"
    meta: dict[str, Any] = field(default_factory=dict)

    def context(self) -> str:
        """The example's context as one text: passages separated by blank lines."""
        return join_passages(self.passages)


@dataclass(frozen=True)
class EvalChunk:
    """A retrieval chunk that remembers which passage it came from.

    Attributes:
        text: The chunk text that is embedded and shown to the generator.
        title: Title of the source passage (empty for untitled contexts).
        passage_index: Index of the source passage in the list given to :func:`chunk_passages`.
    """

    text: str
    title: str
    passage_index: int


def join_passages(passages: Iterable[Passage]) -> str:
    """Join passage texts with blank lines: the text that memory reads and the full-context baseline sees."""
    return "\n\n".join(p.text for p in passages)


def _read_jsonl(path: str | Path) -> Iterable[tuple[int, dict[str, Any]]]:
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"dataset file {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise InvalidInputError(f"{path}:{lineno} is not a JSON object")
            yield lineno, record


def _require(record: dict[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise InvalidInputError(f"{where} lacks the field {key!r} (fields: {sorted(record)})")
    return record[key]


def hotpotqa_example(record: dict[str, Any], where: str = "record") -> EvalExample:
    """Convert one HotpotQA (distractor) record into an :class:`EvalExample`.

    Raises:
        InvalidInputError: a field is missing or titles and sentence lists differ in length.
    """
    context = _require(record, "context", where)
    titles = _require(context, "title", f"{where}.context")
    sentences = _require(context, "sentences", f"{where}.context")
    if len(titles) != len(sentences):
        raise InvalidInputError(f"{where}: {len(titles)} context titles but {len(sentences)} sentence lists")
    passages = tuple(Passage(t, f"{t}: {''.join(s).strip()}") for t, s in zip(titles, sentences))
    support = _require(record, "supporting_facts", where)
    gold = tuple(dict.fromkeys(_require(support, "title", f"{where}.supporting_facts")))
    answer = _require(record, "answer", where)
    return EvalExample(
        id=str(_require(record, "id", where)),
        question=str(_require(record, "question", where)),
        answers=(str(answer),),
        passages=passages,
        supporting_titles=gold,
        task="qa",
        meta={k: record[k] for k in ("type", "level") if k in record},
    )


def longbench_example(record: dict[str, Any], where: str = "record", task: str = "auto") -> EvalExample:
    """Convert one LongBench record (``input``, ``context``, ``answers``) into an :class:`EvalExample`.

    ``task="auto"`` picks ``"summary"`` for LongBench's summarization datasets (by the record's ``dataset``
    field) and ``"qa"`` otherwise.
    """
    answers = _require(record, "answers", where)
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise InvalidInputError(f"{where} has an empty 'answers' list")
    context = str(_require(record, "context", where))
    if task == "auto":
        task = "summary" if record.get("dataset") in LONGBENCH_SUMMARY_DATASETS else "qa"
    return EvalExample(
        id=str(record.get("_id", record.get("id", where))),
        question=str(_require(record, "input", where)),
        answers=tuple(str(a) for a in answers),
        passages=(Passage("", context),),
        task=task,
        meta={k: record[k] for k in ("dataset", "language", "length") if k in record},
    )


def detect_format(record: dict[str, Any]) -> str:
    """``"hotpotqa"`` or ``"longbench"`` from a record's fields; InvalidInputError when it is neither."""
    if {"question", "answer", "context", "supporting_facts"} <= set(record):
        return "hotpotqa"
    if {"input", "context", "answers"} <= set(record):
        return "longbench"
    raise InvalidInputError(
        f"cannot tell the dataset format from the fields {sorted(record)}: expected HotpotQA "
        "(question, answer, context, supporting_facts) or LongBench (input, context, answers)"
    )


def load_examples(path: str | Path, fmt: str = "auto", limit: int | None = None, task: str = "auto") -> list[EvalExample]:
    """Read up to ``limit`` examples from a HotpotQA or LongBench JSONL file.

    Args:
        path: The JSONL file.
        fmt: ``"auto"`` (from the first record's fields), ``"hotpotqa"`` or ``"longbench"``.
        limit: Read at most this many examples (``None``: all).
        task: For LongBench: ``"auto"``, ``"qa"`` or ``"summary"``; ignored for HotpotQA (always QA).

    Raises:
        InvalidInputError: the file is missing, a line is not JSON, a field is missing, ids repeat, the format is
        unknown, or the file holds no examples.
    """
    if fmt not in ("auto", "hotpotqa", "longbench"):
        raise InvalidInputError(f"dataset format must be auto, hotpotqa or longbench, got {fmt!r}")
    if task not in ("auto", "qa", "summary"):
        raise InvalidInputError(f"task must be auto, qa or summary, got {task!r}")
    if limit is not None and limit < 1:
        raise InvalidInputError(f"limit must be a positive number of examples, got {limit}")
    examples: list[EvalExample] = []
    seen: set[str] = set()
    for lineno, record in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if fmt == "auto":
            fmt = detect_format(record)
            logger.info("dataset %s: %s format", path, fmt)
        ex = hotpotqa_example(record, where) if fmt == "hotpotqa" else longbench_example(record, where, task)
        if ex.id in seen:
            raise InvalidInputError(f"{where}: the example id {ex.id!r} repeats; ids must be unique to resume runs")
        seen.add(ex.id)
        examples.append(ex)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise InvalidInputError(f"dataset file {str(path)!r} holds no examples")
    return examples


def pooled_passages(examples: Iterable[EvalExample]) -> list[Passage]:
    """All passages of all examples in one list, in first-seen order, without exact duplicates (same title and
    text), so that a paragraph shared by two questions is memorized and indexed once."""
    seen: dict[tuple[str, str], None] = {}
    for ex in examples:
        for p in ex.passages:
            seen.setdefault((p.title, p.text), None)
    return [Passage(t, x) for t, x in seen]


def chunk_passages(
    passages: Iterable[Passage],
    count_tokens: Callable[[str], int],
    split: Callable[[str, int], list[str]],
    chunk_size: int,
) -> list[EvalChunk]:
    """Chunk passages for retrieval, never splitting a passage that fits ``chunk_size`` tokens.

    Args:
        passages: The passages, in order.
        count_tokens: Token count of a text (the retrieval chunker's tokenizer).
        split: ``split(text, budget)`` cuts an over-long text into pieces of at most ``budget`` tokens.
        chunk_size: The token budget of one chunk.

    Returns:
        One chunk per fitting passage; the pieces of an over-long passage each keep its title, and pieces after
        the first are prefixed with ``"<title>: "`` so the embedder sees which article they belong to (the
        pieces are cut to ``chunk_size`` minus the prefix's tokens, so a prefixed piece still fits).
    """
    if chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    chunks: list[EvalChunk] = []
    for i, p in enumerate(passages):
        if not p.text.strip():
            continue
        if count_tokens(p.text) <= chunk_size:
            chunks.append(EvalChunk(p.text, p.title, i))
            continue
        prefix = f"{p.title}: " if p.title else ""
        budget = chunk_size - count_tokens(prefix) if prefix else chunk_size
        if budget < 1:
            raise InvalidInputError(f"the title {p.title!r} alone takes more than chunk_size={chunk_size} tokens")
        body = p.text[len(prefix):] if prefix and p.text.startswith(prefix) else p.text
        for piece in split(body, budget):
            chunks.append(EvalChunk(prefix + piece, p.title, i))
    return chunks
