"""Attention re-ranking: the memory model reads the candidate passages, then the question, and points.

The dense retriever's top-N candidates are put in one prompt (a chat user turn that opens ``Passages:``, one
``[title] text`` line per candidate, ordered weakest-first by the dense score so the strongest sits nearest the
query), followed by ``Find the passage relevant to the query. Query: <question>``. A candidate's score is the
attention that the tail tokens (instruction, query and the turn's end; their mean) pay to its tokens (their sum),
minus the same with the content-free query ``N/A``, which cancels position and length bias (ICR, arXiv 2410.02642;
QRHead, arXiv 2506.09944). Only a few heads point well: :class:`HeadSet` names them per model, chosen on a
calibration slice by ``python -m jobs.select_heads``; the scores of those heads are summed.

Cost: one prefill of the candidates (their KV cached once), then two short tails over that cache, each with one
extra matmul of the tail's queries against the cached keys (``memorag_sdpa``'s score capture, per query head): no
eager attention matrices are materialized. Optionally the unit's compressed memory comes first (``prefix``): the
candidates are then read after the memory, as a new user turn of its conversation.

A packaged :class:`HeadSet` per embedded model lives in ``memorag_core/retrieval/heads/``; :func:`default_heads`
finds the one whose fingerprint matches a loaded model. :meth:`AttentionReranker.bridge_span` reads the same
calibrated attention per token: the span the question leans on in its top passages, a second retrieval query
for multi-hop questions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import weakref
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memorag_core.errors import HeadSetMismatchError, InvalidInputError

logger = logging.getLogger(__name__)

class _Stop(Exception):
    """Raised by a forward hook to end a forward pass after the last layer a head set reads."""


#: folder of the packaged head sets (one JSON per embedded model)
HEADS_DIR = Path(__file__).with_name("heads")
_MARK = "\x00MEMORAG_TURN\x00"
# config keys that do not change what a head computes (runtime switches, bookkeeping)
_VOLATILE = {"transformers_version", "dtype", "torch_dtype", "use_cache", "attn_implementation", "architectures",
             "pad_token_id", "output_attentions", "output_hidden_states", "return_dict"}


def model_fingerprint(model: Any) -> str:
    """Hash of a model's architecture config (sizes, rotary, vocabulary), runtime switches left out.

    A head set is tied to it: the same (layer, head) of another architecture means nothing. Two checkpoints of one
    architecture share it (the head set records the model's name too, for people).
    """
    from memorag_core.memory.config import stable_hash

    cfg = {k: v for k, v in model.config.to_dict().items()
           if not k.startswith("_") and k not in _VOLATILE and isinstance(v, (int, float, str, bool, type(None)))}
    return stable_hash(cfg)[:16]


def passage_line(title: str, text: str) -> str:
    """The candidate line the reranker shows: ``[title] body`` (a leading ``"title: "`` of ``text`` dropped)."""
    body = text[len(title) + 2:] if title and text.startswith(f"{title}: ") else text
    return f"[{title}] {body}" if title else body


@dataclass(frozen=True)
class HeadSet:
    """The attention heads whose calibrated scores are summed, for one model.

    Attributes:
        heads: (layer, query head) pairs, best first.
        fingerprint: :func:`model_fingerprint` of the model they were chosen for.
        model: the model's name (for people; not checked).
        meta: how they were chosen (dataset, questions, per-head calibration R@k, ...).
    """

    heads: tuple[tuple[int, int], ...]
    fingerprint: str
    model: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.heads:
            raise InvalidInputError("a head set needs at least one (layer, head)")
        bad = [h for h in self.heads if len(h) != 2 or min(h) < 0]
        if bad:
            raise InvalidInputError(f"heads must be (layer, head) pairs >= 0, got {bad}")

    def top(self, k: int) -> "HeadSet":
        """The first ``k`` heads (the set is stored best first)."""
        if k < 1:
            raise InvalidInputError(f"top k must be >= 1, got {k}")
        return HeadSet(self.heads[:k], self.fingerprint, self.model, {**self.meta, "top": k})

    def to_dict(self) -> dict:
        return {"model": self.model, "fingerprint": self.fingerprint, "heads": [list(h) for h in self.heads],
                "meta": self.meta}

    def save(self, path: str | Path) -> None:
        """Write the head set as a small JSON file."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HeadSet":
        """Read a head set written by :meth:`save`. Raises InvalidInputError on a malformed file."""
        try:
            d = json.loads(Path(path).read_text())
            return cls(tuple((int(a), int(b)) for a, b in d["heads"]), str(d["fingerprint"]), d.get("model", ""),
                       dict(d.get("meta", {})))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"cannot read the head set {path}: {exc}") from exc

    def check(self, model: Any) -> None:
        """Raise HeadSetMismatchError unless the heads were chosen for ``model``'s architecture and exist in it."""
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise HeadSetMismatchError(
                f"the head set was chosen for {self.model or 'another model'} (fingerprint {self.fingerprint}), "
                f"not this model (fingerprint {fp}): choose heads for it with `python -m jobs.select_heads`")
        layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
        out = [h for h in self.heads if h[0] >= layers or h[1] >= heads]
        if out:
            raise HeadSetMismatchError(f"heads {out} do not exist in a model of {layers} layers x {heads} heads")


def default_heads(model: Any) -> HeadSet:
    """The packaged head set whose fingerprint matches ``model``.

    Raises:
        HeadSetMismatchError: none ships for this model (choose heads with ``python -m jobs.select_heads``).
    """
    fp = model_fingerprint(model)
    for path in sorted(HEADS_DIR.glob("*.json")):
        hs = HeadSet.load(path)
        if hs.fingerprint == fp:
            return hs
    raise HeadSetMismatchError(f"no packaged head set for this model (fingerprint {fp}); choose heads with "
                               "`python -m jobs.select_heads --out heads.json` and pass HeadSet.load(...)")


@dataclass
class RerankConfig:
    """The re-ranking prompt.

    Attributes:
        opening: the user turn's first line, before the candidate lines.
        instruction: the line after the candidates, before ``Query: <question>``.
        null_query: the content-free query whose attention is subtracted (calibration).
        max_passage_tokens: cut each candidate line to this many tokens (0: no cut; bounds pooled cost).
    """

    opening: str = "Passages:"
    instruction: str = "Find the passage relevant to the query."
    null_query: str = "N/A"
    max_passage_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_passage_tokens < 0:
            raise InvalidInputError(f"max_passage_tokens must be >= 0, got {self.max_passage_tokens}")


@dataclass
class Reading:
    """What the model's calibrated attention says about a list of candidates (in the order read).

    Attributes:
        head_scores: (layers * heads, n) calibrated score per (layer, head) and candidate (index layer*heads+head).
        token_scores: (layers * heads, T) calibrated attention per candidate token (T: all candidate tokens).
        token_candidate: (T,) which candidate each token belongs to.
        token_chars: (T, 2) character span of each token within its candidate's line.
        heads_per_layer: query heads per layer.
        seconds: {"prefill": ..., "tails": ...}.
    """

    head_scores: np.ndarray
    token_scores: np.ndarray
    token_candidate: np.ndarray
    token_chars: np.ndarray
    heads_per_layer: int
    seconds: dict[str, float]

    def rows(self, heads: Sequence[tuple[int, int]]) -> list[int]:
        """Row indices of ``heads`` in ``head_scores`` / ``token_scores``."""
        return [layer * self.heads_per_layer + h for layer, h in heads]

    def scores(self, heads: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
        """(n,) sum of the chosen heads' calibrated scores (all heads when None)."""
        s = self.head_scores if heads is None else self.head_scores[self.rows(heads)]
        return s.sum(axis=0)


class AttentionReranker:
    """Re-orders retrieval candidates by the memory model's calibrated attention over selected heads.

    Args:
        model, tokenizer: a Hugging Face causal LM routed through transformers' attention interface (its
            attention implementation is switched to ``memorag_sdpa``, plain SDPA outside score captures).
        heads: the heads to sum; None: :func:`default_heads` (raises when none ships for the model).
        config: the prompt.

    Raises:
        HeadSetMismatchError: ``heads`` were chosen for another model.
    """

    def __init__(self, model: Any, tokenizer: Any, heads: HeadSet | None = None,
                 config: RerankConfig | None = None) -> None:
        from memorag_core.memory import scoring

        self.model, self.tokenizer = model, tokenizer
        self.config = config or RerankConfig()
        self.heads = heads if heads is not None else default_heads(model)
        self.heads.check(model)
        if getattr(model.config, "_attn_implementation", None) != scoring.ATTN_IMPLEMENTATION:
            model.set_attn_implementation(scoring.register())
            logger.info("reranker: attention implementation set to %s", scoring.ATTN_IMPLEMENTATION)
        self.layers = model.config.num_hidden_layers
        self.heads_per_layer = model.config.num_attention_heads

    # -- prompt -------------------------------------------------------------------------------------------------
    def _encode(self, text: str, offsets: bool = False):
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets, verbose=False)
        return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]

    def frame(self, prefix: Any = None) -> tuple[str, str]:
        """(text before the user turn's content, text after it): a fresh chat, or a new turn after ``prefix``."""
        if prefix is not None:
            return prefix.task_frame()
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                                          add_generation_prompt=True)
        else:  # a base model: a plain transcript
            rendered = f"User: {_MARK}\n\nAssistant:"
        before, after = rendered.split(_MARK)
        return before, after

    def tail_text(self, query: str, after: str) -> str:
        return f"{self.config.instruction} Query: {query}{after}"

    # -- reading ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _first_layers(self, n: int) -> Iterator[None]:
        """Within the block a forward pass stops after decoder layer ``n - 1`` (raising :class:`_Stop`): heads in
        later layers are not read, so their cost is not paid. The KV cache holds the first ``n`` layers."""
        if n >= self.layers:
            yield
            return

        def stop(module, args, output):
            raise _Stop

        handle = self.model.get_decoder().layers[n - 1].register_forward_hook(stop)
        try:
            yield
        finally:
            handle.remove()

    def _forward(self, layers: int, **kwargs: Any) -> None:
        with self._first_layers(layers):
            try:
                self.model(**kwargs, use_cache=True, logits_to_keep=1)
            except _Stop:
                pass

    def read(self, question: str, candidates: Sequence[str], prefix: Any = None, layers: int | None = None,
             passage_tokens: int | None = None) -> Reading:
        """Read ``candidates`` (in this order) then ``question``; the calibrated attention per head and token.

        Args:
            question: the query.
            candidates: the candidate lines, as shown (see :func:`passage_line`), in reading order.
            prefix: a memory (e.g. the unit's ``CompressedKVMemory``) read before the candidates, or None. Its KV
                cache is extended and cropped back: unchanged afterwards.
            layers: run only the first ``layers`` decoder layers (None: all); the rows of later layers are 0.
            passage_tokens: cut each candidate line to this many tokens (None: ``config.max_passage_tokens``).

        Raises:
            InvalidInputError: no candidates, an empty question. MemoryNotReadyError: an empty prefix memory.
        """
        import time

        import torch

        from memorag_core.memory import scoring

        if not question or not question.strip():
            raise InvalidInputError("the question to re-rank for is empty")
        if not candidates:
            raise InvalidInputError("no candidates to re-rank")
        layers = self.layers if layers is None else layers
        if not 1 <= layers <= self.layers:
            raise InvalidInputError(f"layers must be in 1..{self.layers}, got {layers}")
        before, after = self.frame(prefix)
        head_ids = self._encode(f"{before}{self.config.opening}\n")
        ids, owner, chars = list(head_ids), [], []
        for i, text in enumerate(candidates):
            t_ids, t_off = self._encode(f"{text}\n", offsets=True)
            cut = self.config.max_passage_tokens if passage_tokens is None else passage_tokens
            if cut:
                t_ids, t_off = t_ids[:cut], t_off[:cut]
            ids.extend(t_ids)
            owner.extend([i] * len(t_ids))
            chars.extend(t_off)
        n_tok = len(owner)
        device = self.model.device
        if prefix is not None:
            if prefix.is_empty:
                from memorag_core.errors import MemoryNotReadyError

                raise MemoryNotReadyError("the prefix memory is empty")
            cache, base, pos0 = prefix.cache, prefix.entries, prefix.next_position
        else:
            from transformers import DynamicCache

            cache, base, pos0 = DynamicCache(config=self.model.config), 0, 0
        start = base + len(head_ids)  # cache index of the first candidate token
        out: list[torch.Tensor] = []
        seconds: dict[str, float] = {}
        try:
            t = time.perf_counter()
            with torch.no_grad():
                x = torch.tensor([ids], device=device)  # (1, prompt)
                pos = torch.arange(pos0, pos0 + len(ids), device=device)[None]  # (1, prompt)
                self._forward(layers, input_ids=x, position_ids=pos, past_key_values=cache)
                seconds["prefill"] = time.perf_counter() - t
                t = time.perf_counter()
                for query in (question, self.config.null_query):
                    tail = self._encode(self.tail_text(query, after))  # (tail,)
                    x = torch.tensor([tail], device=device)
                    p0 = pos0 + len(ids)
                    pos = torch.arange(p0, p0 + len(tail), device=device)[None]
                    with scoring.capture_scores(len(tail), start=start, per_head=True) as sc:
                        self._forward(layers, input_ids=x, position_ids=pos, past_key_values=cache)
                    keep_first(cache, base + len(ids))
                    # (layers * heads, candidate tokens): mean over the tail's tokens of the mass on each token
                    mass = torch.zeros(self.layers * self.heads_per_layer, n_tok)  # later layers stay 0
                    for li in range(layers):
                        rows = slice(li * self.heads_per_layer, (li + 1) * self.heads_per_layer)
                        mass[rows] = sc[li][0, :, :n_tok].float().cpu() / len(tail)
                    out.append(mass)
                seconds["tails"] = time.perf_counter() - t
        finally:
            keep_first(cache, base)
        tok = (out[0] - out[1]).numpy()  # (L*H, T) calibrated
        owner_a = np.asarray(owner, dtype=np.int64)  # (T,)
        head_scores = np.zeros((tok.shape[0], len(candidates)), dtype=np.float32)  # (L*H, n)
        np.add.at(head_scores.T, owner_a, tok.T)
        return Reading(head_scores, tok, owner_a, np.asarray(chars, dtype=np.int64).reshape(-1, 2),
                       self.heads_per_layer, seconds)

    def needed_layers(self, prefix: Any = None) -> int:
        """Decoder layers to run for the head set: up to its deepest head."""
        return max(layer for layer, _ in self.heads.heads) + 1

    def scores(self, question: str, candidates: Sequence[str], prefix_kv: Any = None) -> np.ndarray:
        """(n,) calibrated attention of ``question`` to each candidate (read in the given order), summed over the
        head set; higher is more relevant. ``prefix_kv``: a memory read first (see :meth:`read`)."""
        return self.read(question, candidates, prefix_kv, self.needed_layers(prefix_kv)).scores(self.heads.heads)

    def rerank(self, question: str, candidate_keys: Sequence[Hashable], candidate_texts: Sequence[str],
               dense_scores: Sequence[float], prefix_kv: Any = None) -> list[tuple[Hashable, float]]:
        """The candidates ordered by calibrated attention, best first, as ``(key, attention score)``.

        The candidates are read weakest-first by ``dense_scores`` (the strongest nearest the query); fuse the
        result with the dense ranking through :func:`memorag_core.retrieval.fusion.fuse` (``method="interpolate"``)
        so that a weight of 0 gives the dense ranking back.

        Raises:
            InvalidInputError: keys, texts and scores of different lengths.
        """
        return self.rerank_reading(question, candidate_keys, candidate_texts, dense_scores, prefix_kv)[0]

    def candidate_scores(self, question: str, lines: Sequence[str], dense_scores: Sequence[float], *,
                         prefix: Any = None, max_tokens: int | None = None, bridge_slots: int = 0,
                         bridge_width: int = 2) -> "CandidateScores":
        """The calibrated attention score of each candidate line, in the caller's order (read weakest-first by
        ``dense_scores``; each line cut to an equal share of ``max_tokens``), and with ``bridge_slots`` > 0 the
        bridge span inside the candidates the attention ranks first (:func:`bridge_span`). What the query
        composition's re-ranking step asks of a memory stage."""
        ranked, reading, order = self.rerank_reading(question, list(range(len(lines))), lines, dense_scores, prefix,
                                                     max_tokens)
        out = [0.0] * len(lines)
        for i, score in ranked:
            out[i] = score
        span = ""
        if bridge_slots > 0 and ranked:
            slot_of = {int(c): s for s, c in enumerate(order)}  # candidate index -> reading position
            slots = [slot_of[int(i)] for i, _ in ranked[:bridge_slots]]
            span = bridge_span(reading, [lines[int(c)] for c in order], slots, self.heads.heads, bridge_width)
        return CandidateScores(out, span)

    def rerank_reading(self, question: str, candidate_keys: Sequence[Hashable], candidate_texts: Sequence[str],
                       dense_scores: Sequence[float], prefix_kv: Any = None, max_tokens: int | None = None
                       ) -> tuple[list[tuple[Hashable, float]], Reading, np.ndarray]:
        """:meth:`rerank` plus the :class:`Reading` and the reading order (candidate index read at each slot).

        ``max_tokens``: most candidate tokens read in all; each candidate is cut to an equal share (None: no
        budget beyond ``config.max_passage_tokens``)."""
        if not len(candidate_keys) == len(candidate_texts) == len(dense_scores):
            raise InvalidInputError(f"{len(candidate_keys)} keys, {len(candidate_texts)} texts and "
                                    f"{len(dense_scores)} dense scores: they must match")
        order = reading_order(dense_scores)
        share = None
        if max_tokens is not None and candidate_texts:
            share = max(1, max_tokens // len(candidate_texts))
            if self.config.max_passage_tokens:
                share = min(share, self.config.max_passage_tokens)
        reading = self.read(question, [candidate_texts[i] for i in order], prefix_kv, self.needed_layers(prefix_kv),
                            passage_tokens=share)
        att = np.empty(len(order), dtype=np.float64)
        att[order] = reading.scores(self.heads.heads)  # back to the caller's candidate order
        ranked = sorted(range(len(order)), key=lambda i: (-att[i], i))
        return [(candidate_keys[i], float(att[i])) for i in ranked], reading, order

    # -- bridge spans -------------------------------------------------------------------------------------------
    def bridge_span(self, reading: Reading, candidates: Sequence[str], slots: Sequence[int],
                    heads: Sequence[tuple[int, int]] | None = None, width: int = 3) -> str:
        """:func:`bridge_span` with the reranker's head set by default."""
        return bridge_span(reading, candidates, slots, heads if heads is not None else self.heads.heads, width)


_RERANKERS: "weakref.WeakKeyDictionary[Any, AttentionReranker | None]" = weakref.WeakKeyDictionary()
_RERANKERS_LOCK = threading.Lock()


def reranker_for(model: Any, tokenizer: Any) -> AttentionReranker | None:
    """The :class:`AttentionReranker` over a loaded memory model with its packaged head set, made once per model
    object; None when no head set ships for the model (then nothing is re-ranked: choose heads with
    ``python -m jobs.select_heads``)."""
    with _RERANKERS_LOCK:
        if model in _RERANKERS:
            return _RERANKERS[model]
        try:
            reranker: AttentionReranker | None = AttentionReranker(model, tokenizer)
        except HeadSetMismatchError as exc:
            logger.warning("no attention re-ranking for this memory model: %s", exc)
            reranker = None
        _RERANKERS[model] = reranker
        return reranker


@dataclass
class CandidateScores:
    """What a memory stage's ``rerank`` returns: the calibrated attention score of each candidate line (the
    caller's order) and, when asked, the bridge span (:func:`bridge_span`; ``""`` otherwise)."""

    scores: list[float]
    span: str = ""


def memory_scores(memory: Any, question: str, lines: Sequence[str], dense_scores: Sequence[float], *,
                  prefix: bool = False, max_tokens: int | None = None, bridge_slots: int = 0,
                  bridge_width: int = 2) -> CandidateScores | None:
    """The calibrated attention of ``memory``'s model to each candidate line (the caller's order), or None when
    the model has no head set. ``prefix``: read the candidates after the memory's current contents (a unit's
    compressed memory, imported by the caller). ``bridge_slots`` > 0: also the span of highest calibrated attention
    (``bridge_width`` tokens, widened to words) inside the ``bridge_slots`` candidates the attention ranks first.
    The memory stages of every door call this."""
    reranker = reranker_for(memory.model, memory.tokenizer)
    if reranker is None:
        return None
    return reranker.candidate_scores(question, lines, dense_scores, prefix=memory if prefix else None,
                                     max_tokens=max_tokens, bridge_slots=bridge_slots, bridge_width=bridge_width)


def bridge_span(reading: Reading, candidates: Sequence[str], slots: Sequence[int],
            heads: Sequence[tuple[int, int]], width: int = 3) -> str:
    """The text span of highest calibrated attention inside the candidates read at ``slots``.

    Args:
        reading: from :meth:`read` over ``candidates`` (same order).
        slots: reading positions of the passages to look in (the top 1-2 after re-ranking).
        heads: the heads whose calibrated token attention is summed.
        width: tokens in the window whose summed attention is maximized; the span is widened to whole words.

    Returns:
        The span (no ``[title]`` part), or ``""`` when the passages have no body tokens.
    """
    rows = reading.rows(heads)
    t = reading.token_scores[rows].sum(axis=0)  # (T,)
    best, best_score = None, -np.inf
    for slot in slots:
        idx = np.flatnonzero(reading.token_candidate == slot)  # tokens of that candidate
        line = candidates[slot]
        body0 = line.index("] ") + 2 if line.startswith("[") and "] " in line else 0
        idx = idx[reading.token_chars[idx, 0] >= body0]
        idx = idx[[bool(line[a:b].strip()) for a, b in reading.token_chars[idx]]] if len(idx) else idx
        if not len(idx):
            continue
        w = min(width, len(idx))
        sums = np.convolve(t[idx], np.ones(w), mode="valid")  # (len - w + 1,) window sums
        j = int(np.argmax(sums))
        if sums[j] > best_score:
            best_score, best = float(sums[j]), (slot, idx[j], idx[j + w - 1])
    if best is None:
        return ""
    slot, first, last = best
    line = candidates[slot]
    a, b = int(reading.token_chars[first, 0]), int(reading.token_chars[last, 1])
    while a > 0 and not line[a - 1].isspace():  # whole words
        a -= 1
    while b < len(line) and not line[b].isspace():
        b += 1
    return line[a:b].strip(" \n,.;:()\"'")


def keep_first(cache: Any, entries: int) -> None:
    """Keep the first ``entries`` entries of every filled layer of ``cache`` (layers a stopped pass never reached
    hold nothing and are left alone)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", True) and layer.keys is not None and layer.keys.shape[-2] > entries:
            layer.crop(entries - layer.keys.shape[-2])  # negative: that many removed from the end


def reading_order(dense_scores: Sequence[float]) -> np.ndarray:
    """(n,) candidate indices weakest-first by dense score (ties: later candidate first), strongest last."""
    s = np.asarray(dense_scores, dtype=np.float64)
    return np.lexsort((-np.arange(len(s)), s))


def attention_confidence(scores: Sequence[float]) -> float:
    """Confidence of an attention ranking in [0, 1]: the gap between its best and second-best score over the
    spread of all scores (1: one candidate stands out alone; 0: a tie at the top)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if len(s) < 2 or s[0] - s[-1] <= 0:
        return 0.0
    return float((s[0] - s[1]) / (s[0] - s[-1]))


# -- head selection ------------------------------------------------------------------------------------------------
def recall_at(scores: np.ndarray, gold: np.ndarray, k: int, n_gold: int | None = None) -> np.ndarray:
    """Fraction of the gold candidates ranked in the top ``k`` by ``scores``.

    Args:
        scores: (..., n) one or more score rows over the same n candidates (higher is better; ties: lower index).
        gold: (n,) bool, which candidates are gold.
        k: the budget.
        n_gold: the number of gold passages (default: ``gold.sum()``; larger when some gold is not a candidate).

    Returns:
        (...,) recall in [0, 1] (0 when there is no gold).
    """
    gold = np.asarray(gold, dtype=bool)
    total = int(gold.sum()) if n_gold is None else n_gold
    if total == 0:
        return np.zeros(np.shape(scores)[:-1])
    top = np.argsort(-np.asarray(scores), axis=-1, kind="stable")[..., :k]  # (..., k)
    return gold[top].sum(axis=-1) / total


def head_recall(head_scores: Sequence[np.ndarray], golds: Sequence[np.ndarray], k: int = 3,
                n_golds: Sequence[int] | None = None) -> np.ndarray:
    """(heads,) mean R@k of each head alone over the questions (``head_scores[i]``: (heads, n_i))."""
    if not head_scores or len(head_scores) != len(golds):
        raise InvalidInputError("head recall needs one gold mask per question, and at least one question")
    rows = [recall_at(s, g, k, None if n_golds is None else n_golds[i])
            for i, (s, g) in enumerate(zip(head_scores, golds))]
    return np.mean(rows, axis=0)


def rank_heads(head_scores: Sequence[np.ndarray], golds: Sequence[np.ndarray], k: int = 3,
               n_golds: Sequence[int] | None = None) -> np.ndarray:
    """(heads,) head row indices, best first: by R@k alone, ties broken by R@(k+2), then by lower index."""
    main = head_recall(head_scores, golds, k, n_golds)
    tie = head_recall(head_scores, golds, k + 2, n_golds)
    return np.lexsort((np.arange(len(main)), -tie, -main))


def summed_recall(head_scores: Sequence[np.ndarray], golds: Sequence[np.ndarray], rows: Sequence[int], k: int = 3,
                  n_golds: Sequence[int] | None = None) -> float:
    """Mean R@k of the sum of the heads ``rows`` over the questions."""
    return float(np.mean([recall_at(s[list(rows)].sum(axis=0), g, k, None if n_golds is None else n_golds[i])
                          for i, (s, g) in enumerate(zip(head_scores, golds))]))


def choose_head_count(head_scores: Sequence[np.ndarray], golds: Sequence[np.ndarray],
                      counts: Sequence[int] = (1, 2, 4, 8, 16, 32), k: int = 3,
                      n_golds: Sequence[int] | None = None) -> tuple[int, dict[int, float]]:
    """How many heads to sum, by 2-fold cross-validation over the questions (heads ranked on one half, scored on
    the other, both ways round). Returns (best count, {count: mean held-out-half R@k}); ties: fewer heads."""
    n = len(head_scores)
    if n < 2:
        raise InvalidInputError("choosing the head count needs at least 2 questions")
    halves = [list(range(0, n, 2)), list(range(1, n, 2))]
    ng = list(n_golds) if n_golds is not None else [int(np.asarray(g).sum()) for g in golds]
    result: dict[int, float] = {}
    for c in counts:
        vals = []
        for fit, test in (halves, halves[::-1]):
            order = rank_heads([head_scores[i] for i in fit], [golds[i] for i in fit], k, [ng[i] for i in fit])
            vals.append(summed_recall([head_scores[i] for i in test], [golds[i] for i in test], order[:c], k,
                                      [ng[i] for i in test]))
        result[c] = float(np.mean(vals))
    best = max(counts, key=lambda c: (result[c], -c))
    return best, result


def select_heads(head_scores: Sequence[np.ndarray], golds: Sequence[np.ndarray], *, heads_per_layer: int,
                 fingerprint: str, model: str = "", count: int | None = None, k: int = 3,
                 n_golds: Sequence[int] | None = None, meta: dict | None = None) -> HeadSet:
    """The :class:`HeadSet` of the ``count`` heads with the best R@k alone over the calibration questions.

    Args:
        head_scores: per question (layers * heads, n) calibrated scores, as :meth:`AttentionReranker.read` gives.
        golds: per question (n,) bool gold masks.
        heads_per_layer: query heads per layer (row r is head (r // heads_per_layer, r % heads_per_layer)).
        count: heads to keep; None: :func:`choose_head_count`.
    """
    meta = dict(meta or {})
    if count is None:
        count, cv = choose_head_count(head_scores, golds, k=k, n_golds=n_golds)
        meta["count_cv"] = {str(c): round(v, 4) for c, v in cv.items()}
    order = rank_heads(head_scores, golds, k, n_golds)
    alone = head_recall(head_scores, golds, k, n_golds)
    chosen = [int(r) for r in order[:count]]
    meta.update({"k": k, "questions": len(head_scores), "count": count,
                 "recall_alone": [round(float(alone[r]), 4) for r in chosen],
                 "recall_summed": round(summed_recall(head_scores, golds, chosen, k, n_golds), 4)})
    return HeadSet(tuple((r // heads_per_layer, r % heads_per_layer) for r in chosen), fingerprint, model, meta)


# -- fusion with the dense ranking -----------------------------------------------------------------------------
#: interpolation weights tuned on HotpotQA dev 1-100 with the embedded models (docs/evaluation.md, Sessions 8 and
# 10): attention weight 16 of the grid 0-16 with the heads chosen on all 100 dev questions (out-of-fold R@3 82.5;
# weight 4: 80.5); no gate helped; the bridge span ranking tied with none offline and lost through the engine
# (Session 11: dev 79.5 vs 81.0 per question, held-out pooled 73.5 vs 76.0 at weight 4): left out
TUNED_ATTENTION_WEIGHT = 16.0
TUNED_GATE = 0.0
TUNED_BRIDGE_WEIGHT = 0.0


def attention_ranking(question: str, ranked: Sequence[tuple[Hashable, float]], source: str = "attention"):
    """A :class:`~memorag_core.retrieval.fusion.Ranking` of :meth:`AttentionReranker.rerank`'s output, with its
    :func:`attention_confidence` (for the fusion's gate)."""
    from memorag_core.retrieval.fusion import Ranking

    keys = [k for k, _ in ranked]
    scores = [float(s) for _, s in ranked]
    return Ranking(source, question, keys, scores, confidence=attention_confidence(scores))


def attention_fusion(weight: float = TUNED_ATTENTION_WEIGHT, gate: float = TUNED_GATE,
                     bridge_weight: float = TUNED_BRIDGE_WEIGHT):
    """The :class:`~memorag_core.retrieval.fusion.FusionConfig` that joins the question's dense ranking
    (weight 1), the attention ranking (``weight``; 0 = plain RAG) and a bridge-span query's ranking
    (``bridge_weight``): per-query min-max normalized score interpolation, attention gated by its confidence."""
    from memorag_core.retrieval.fusion import FusionConfig

    return FusionConfig(method="interpolate", gate=gate, question_floor=0,
                        weights={"question": 1.0, "attention": weight, "bridge": bridge_weight})
