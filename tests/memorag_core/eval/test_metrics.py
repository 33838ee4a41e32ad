"""Metric functions against hand-checked cases."""

import pytest

from memorag_core.errors import InvalidInputError
from memorag_core.eval.metrics import (
    best_over_references,
    evidence_recall,
    exact_match,
    f1_score,
    lcs_length,
    normalize_answer,
    rouge_l,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  An   apple, a day  ", "apple day"),
        ("Theatre and anthem", "theatre and anthem"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_answer_rejects_non_strings():
    with pytest.raises(InvalidInputError, match="needs a str"):
        normalize_answer(None)


def test_f1_hand_checked():
    # pred tokens: [tulsa, oklahoma]; ref: [tulsa] -> P = 1/2, R = 1 -> F1 = 2/3
    assert f1_score("Tulsa, Oklahoma", "Tulsa") == pytest.approx(2 / 3)
    # pred [new, york, city] vs ref [city, of, new, york]: common 3 -> P = 1, R = 3/4 -> 6/7
    assert f1_score("New York City", "the city of New York") == pytest.approx(6 / 7)
    assert f1_score("Paris", "London") == 0.0
    assert f1_score("The answer", "answer") == 1.0
    # multiplicity: pred [yes, yes] vs ref [yes]: common 1 -> P = 1/2, R = 1 -> 2/3
    assert f1_score("yes yes", "yes") == pytest.approx(2 / 3)
    assert f1_score("", "x") == 0.0
    assert f1_score("the", "a") == 1.0  # both normalize to empty


def test_exact_match():
    assert exact_match("The  Beatles.", "beatles") == 1.0
    assert exact_match("Beatles band", "beatles") == 0.0


def test_lcs_length():
    assert lcs_length("abcbdab", "bdcaba") == 4  # classic CLRS example
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_hand_checked():
    # pred: police killed the gunman (4) ; ref: police kill the gunman (4); LCS = police the gunman = 3
    # P = R = 3/4 -> F = 0.75
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # pred 2 tokens, ref 4 tokens, LCS 2: P = 1, R = 1/2 -> F = 2/3
    assert rouge_l("the gunman", "police kill the gunman") == pytest.approx(2 / 3)
    assert rouge_l("Same Text.", "same text") == 1.0
    assert rouge_l("", "something") == 0.0


def test_best_over_references():
    assert best_over_references(f1_score, "Tulsa", ["Oklahoma", "Tulsa"]) == 1.0
    with pytest.raises(InvalidInputError, match="empty list of reference"):
        best_over_references(f1_score, "x", [])


def test_evidence_recall():
    assert evidence_recall(["A", "B", "C"], ["A", "D"]) == 0.5
    assert evidence_recall(["A", "A"], ["A"]) == 1.0
    assert evidence_recall([], ["A"]) == 0.0
    assert evidence_recall(["A"], []) is None
