"""Answer and retrieval metrics, written from their published definitions.

* :func:`normalize_answer` follows LongBench's (and SQuAD's) normalization: lowercase, drop ASCII punctuation,
  drop the articles *a*, *an*, *the*, collapse whitespace.
* :func:`f1_score` is the token-level F1 between the normalized prediction and one reference (LongBench
  ``qa_f1_score``); :func:`exact_match` compares the normalized strings.
* :func:`rouge_l` is the ROUGE-L F-measure (``beta = 1``) from the longest common subsequence of lowercased
  alphanumeric tokens, the whole text taken as one sequence (Lin, 2004, sentence-level form; no stemming). The
  ``rouge`` package that LongBench calls uses the summary-level union-LCS variant, so absolute values may differ
  slightly from LongBench's on multi-sentence summaries.
* :func:`best_over_references` takes the maximum over several references, as LongBench's scorer does.
* :func:`evidence_recall` is the fraction of gold supporting titles whose paragraph is among the retrieved chunks.

All scores are floats in ``[0, 1]``; an empty prediction scores 0 against a non-empty reference.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from memorag_core.errors import InvalidInputError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, remove punctuation, remove the articles a/an/the and collapse whitespace (LongBench/SQuAD)."""
    if not isinstance(text, str):
        raise InvalidInputError(f"normalize_answer needs a str, got {type(text).__name__}")
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str, reference: str) -> float:
    """Token-level F1 of the normalized prediction against one normalized reference.

    Precision is the share of prediction tokens found in the reference (counting multiplicity), recall the share of
    reference tokens found in the prediction. Two empty strings score 1.0; one empty string scores 0.0.
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred and not ref:
        return 1.0
    if not pred or not ref:
        return 0.0
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized prediction equals the normalized reference, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def _rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: ``2 * P * R / (P + R)`` with ``P = LCS / len(pred)``, ``R = LCS / len(ref)``.

    Tokens are lowercased alphanumeric runs. An empty prediction or reference scores 0.0 (1.0 if both are empty).
    """
    pred = _rouge_tokens(prediction)
    ref = _rouge_tokens(reference)
    if not pred and not ref:
        return 1.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision = lcs / len(pred)
    recall = lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_references(metric: Callable[[str, str], float], prediction: str, references: Iterable[str]) -> float:
    """The best score of ``prediction`` against any of ``references`` (LongBench's scorer takes the max).

    Raises:
        InvalidInputError: ``references`` is empty, so no score can be computed.
    """
    refs = list(references)
    if not refs:
        raise InvalidInputError("cannot score a prediction against an empty list of reference answers")
    return max(metric(prediction, r) for r in refs)


def evidence_recall(retrieved_titles: Iterable[str], gold_titles: Iterable[str]) -> float | None:
    """Fraction of distinct gold supporting titles that appear among the titles of the retrieved chunks.

    Returns ``None`` when there are no gold titles (the metric is undefined, e.g. LongBench examples).
    """
    gold = set(gold_titles)
    if not gold:
        return None
    found = gold & set(retrieved_titles)
    return len(found) / len(gold)


METRICS: dict[str, Callable[[str, str], float]] = {"f1": f1_score, "em": exact_match, "rouge_l": rouge_l}
"""Answer metrics by name, as used in the evaluation table."""
