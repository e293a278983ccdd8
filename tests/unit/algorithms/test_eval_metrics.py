"""SQuAD EM/F1, math answer checking and pass@k against hand-worked cases and their formulas."""

from __future__ import annotations

import itertools
import math

import pytest

from nemo_rl.algorithms.eval_metrics import (
    exact_match,
    extract_final_answer,
    f1,
    last_boxed,
    math_equal,
    normalize_answer,
    pass_at_k,
    squad_scores,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),  # case, leading article
        ("  a   cat,  an owl!  ", "cat owl"),  # punctuation, articles, whitespace
        ("Theatre", "theatre"),  # "the" inside a word stays
        ("U.S.A.", "usa"),  # punctuation removed, not turned into spaces
        ("the-the", "thethe"),  # punctuation goes before articles: one word, kept
        ("", ""),
    ],
)
def test_normalize_answer_follows_the_official_order(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_after_normalisation():
    assert exact_match("the Free Cedar Press.", "Free Cedar Press") == 1.0
    assert exact_match("Free Cedar", "Free Cedar Press") == 0.0


def test_f1_by_hand():
    # prediction tokens [free, cedar, co], gold [free, cedar, press]: overlap 2, P = R = 2/3
    assert f1("Free Cedar Co.", "the Free Cedar Press") == pytest.approx(2 / 3)
    # repeated tokens count as a multiset: pred [1822, 1822], gold [in, 1822]: overlap 1, P = R = 1/2
    assert f1("1822 1822", "in 1822") == pytest.approx(0.5)
    # P = 1/1, R = 1/3 -> F1 = 2 * (1/3) / (4/3) = 1/2
    assert f1("Larkwick", "north of Larkwick") == pytest.approx(0.5)
    assert f1("", "1822") == 0.0
    assert f1("the", "a") == 0.0  # both normalise to nothing: 0, as in the official v1.1 script


def test_squad_scores_take_the_best_gold():
    scores = squad_scores("Kessski", ["Dmitri Kessski", "Kessski"])
    assert scores == {"exact_match": 1.0, "f1": 1.0}
    scores = squad_scores("Dmitri", ["Dmitri Kessski", "Larkwick"])
    assert scores == {"exact_match": 0.0, "f1": pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        squad_scores("x", [])


def test_last_boxed_balances_braces_and_takes_the_last():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"cut off \boxed{\frac{1}{") is None
    assert last_boxed("no box") is None


def test_extract_final_answer():
    assert extract_final_answer(r"so x = 3, and \boxed{3}.") == "3"
    assert extract_final_answer("Adding them, the final answer is 42.") == "42"
    assert extract_final_answer("Answer: $x^2$") == "x^2"
    assert extract_final_answer("I do not know") is None


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5", True),
        (r"\boxed{2/4}", r"\frac{1}{2}", True),
        (r"the answer is 6", r"\boxed{6}", True),
        (r"\boxed{x^2 + 2x + 1}", "(x+1)^2", True),
        (r"\boxed{7}", "6", False),
        ("no answer here", "6", False),
        (r"\boxed{\{1, 2\}}", r"\{2, 1\}", True),
    ],
)
def test_math_equal(prediction, reference, expected):
    assert math_equal(prediction, reference) is expected


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """The fraction of k-subsets of n samples (c correct) holding at least one correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 1, 6), (8, 3, 2), (4, 4, 2)])
def test_pass_at_k_equals_its_definition(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k))
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_1_is_the_fraction_correct_and_bad_arguments_are_refused():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for n, c, k in [(3, 4, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(n, c, k)
