"""Scores of one generation against its reference: SQuAD exact match and F1, math answer
equivalence, and the unbiased pass@k estimator. Pure functions, no model.

SQuAD follows the official evaluation script (v1.1): both strings are normalised (lower case,
punctuation removed, the articles a/an/the removed, whitespace collapsed); exact match is
equality of the normalised strings, F1 the harmonic mean of token precision and recall over the
normalised tokens (as multisets); with several gold answers each score is the maximum over them.
"""

from __future__ import annotations

import collections
import math
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the official SQuAD rule, in its order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = collections.Counter(predicted_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:  # also an empty prediction, as in the official script
        return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: list[str]) -> dict[str, float]:
    """{"exact_match", "f1"}: each the maximum over the gold answers, in [0, 1]."""
    if not golds:
        raise ValueError("squad_scores needs at least one gold answer")
    return {
        "exact_match": max(exact_match(prediction, gold) for gold in golds),
        "f1": max(f1(prediction, gold) for gold in golds),
    }


def gold_answers_of(row, reference: str) -> list[str]:
    """What a row accepts as an answer: `reference` (its assistant turn), then the other answers
    in its `gold_answers` (the squad dataset keeps every gold span there)."""
    others = row.get("gold_answers") if hasattr(row, "get") else None
    return [reference, *(str(answer) for answer in others or [] if str(answer) != reference)]


# ---------------------------------------------------------------- math


_FINAL_ANSWER = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*(.+?)(?:\.\s*$|\n|$)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: cut off by max_new_tokens


def extract_final_answer(text: str) -> str | None:
    """The answer a solution commits to: the last \\boxed{...}; else what follows the last
    "answer is" / "answer:"; else None (no answer given)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    matches = _FINAL_ANSWER.findall(text)
    if matches:
        return matches[-1].strip().strip("$").strip()
    return None


def math_equal(prediction: str, reference: str) -> bool:
    """Whether the final answer of `prediction` equals `reference` (a bare or boxed answer), as
    numbers, sets or symbolic expressions (`math_verify`), else as normalised strings."""
    from math_verify import parse, verify

    answer = extract_final_answer(prediction)
    if answer is None:
        return False
    gold = last_boxed(reference) or reference.strip()
    parsed_gold = parse(f"${gold}$")
    parsed_answer = parse(f"${answer}$")
    if parsed_gold and parsed_answer and verify(parsed_gold, parsed_answer):
        return True
    return normalize_answer(answer) == normalize_answer(gold) and bool(normalize_answer(gold))


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, Codex):
    1 - C(n - c, k) / C(n, k), computed as a product to stay exact for large n."""
    if not 0 <= num_correct <= num_samples or not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={num_samples}, c={num_correct}, k={k}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(num_samples - num_correct + 1, num_samples + 1))
