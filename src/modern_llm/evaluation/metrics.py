"""Every metric the project reports, in one place, as plain functions returning plain Python floats.

Design choices
- One home per metric: tasks, evaluation scripts, test-time compute and the report all import from here, so
  "what the number means" is defined once. This module imports only the standard library and numpy; the one
  metric that needs a third-party package (ROUGE, via ``rouge-score``) imports it inside the function.
- Fractions are in [0, 1] (not percent). Every function returns built-in ``float``/``bool``/``str`` values, never
  numpy scalars, so results serialise to JSON unchanged.
- Classification metrics follow scikit-learn's conventions (tested against it): F1 is ``2TP / (2TP + FP + FN)``
  and is 0.0 when that denominator is 0; macro-F1 averages over the union of labels seen in preds and refs.
- ROC-AUC is the Mann-Whitney statistic computed with numpy (tied scores get average ranks), so AUC needs no
  sklearn at run time. It is undefined with a single class: that raises ValueError rather than returning nan.
- ``pass_at_k`` is the unbiased estimator of Chen et al. (2021), computed exactly with integer binomials and
  ``Fraction`` (no cancellation error even for n in the thousands).
- Votes ignore ``None`` answers (unparseable generations); ties go to the answer that appeared first, so results
  do not depend on dict/hash ordering.

Number normalisation (``normalize_number``), decided once here
- The LAST number in the text is the answer ("He has 3 apples, so the answer is 42." -> "42"); task-specific
  extraction (e.g. text after "####") belongs to the task and happens before this.
- Currency symbols, units and words around the number are ignored; thousands separators must be well-formed
  groups of three ("1,234,567" -> "1234567"; "1,2" is read as two numbers, 1 and 2).
- Canonical form: no trailing zeros or trailing ".", no leading zeros, "-0" -> "0", ".5" -> "0.5".
- A simple fraction "a/b" is a number: it becomes its decimal when that terminates ("1/2" -> "0.5", matching a
  reference of "0.5") and the reduced fraction otherwise ("2/6" -> "1/3"). "a/0" is not a number.
- A "-" is a sign only when it is not glued to a preceding letter or digit ("5-3" is 5 and 3; "x = -3" is -3).
- Percent signs are dropped ("50%" -> "50"); scientific notation is not recognised ("1e3" -> "3").

Footguns
- ``exact_match`` is driven by the reference: if the reference contains a number, only numbers are compared;
  otherwise both sides are compared as normalised text (lowercase, punctuation/articles/extra spaces removed).
- ``false_accept_reject`` returns nan for a rate whose class is absent (no negatives -> FAR is undefined).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Hashable, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Input checks shared by the paired metrics
# ---------------------------------------------------------------------------------------------------------------


def _check_pairs(preds: Sequence[Any], refs: Sequence[Any], what: str) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{what}: got {len(preds)} predictions but {len(refs)} references; pass one of each")
    if len(preds) == 0:
        raise ValueError(f"{what}: no examples given; the metric is undefined on an empty set")


# ---------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------


def accuracy(preds: Sequence[Any], refs: Sequence[Any]) -> float:
    """Fraction of positions where ``preds[i] == refs[i]``."""
    _check_pairs(preds, refs, "accuracy")
    return sum(p == r for p, r in zip(preds, refs)) / len(refs)


def _binary_f1(preds: Sequence[Any], refs: Sequence[Any], positive: Any) -> float:
    tp = sum(p == positive and r == positive for p, r in zip(preds, refs))
    fp = sum(p == positive and r != positive for p, r in zip(preds, refs))
    fn = sum(p != positive and r == positive for p, r in zip(preds, refs))
    denominator = 2 * tp + fp + fn
    # sklearn's zero_division default: a class never predicted and never present scores 0.
    return 2 * tp / denominator if denominator else 0.0


def f1_score(preds: Sequence[Any], refs: Sequence[Any], positive: Any = 1) -> float:
    """Binary F1 of the class ``positive`` (harmonic mean of its precision and recall)."""
    _check_pairs(preds, refs, "f1_score")
    return float(_binary_f1(preds, refs, positive))


def macro_f1(preds: Sequence[Hashable], refs: Sequence[Hashable]) -> float:
    """Unweighted mean of per-class F1 over every label that occurs in ``preds`` or ``refs``."""
    _check_pairs(preds, refs, "macro_f1")
    labels = set(preds) | set(refs)
    return float(sum(_binary_f1(preds, refs, label) for label in labels) / len(labels))


def roc_auc(labels: Sequence[int | bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties count 1/2.

    ``labels`` are 0/1 (or bools), 1 = positive. Computed as the Mann-Whitney U statistic from average ranks.
    """
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    _check_pairs(y, s, "roc_auc")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"roc_auc: labels must be 0/1 or bools, got values {sorted(set(y.tolist()))[:5]}")
    if not np.isfinite(s).all():
        raise ValueError("roc_auc: scores contain nan or inf; clean them before computing the AUC")
    y = y.astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc: needs at least one positive and one negative label; AUC is undefined")
    ranks = _average_ranks(s)
    # Sum of positive ranks minus its minimum possible value = number of (pos, neg) pairs ordered correctly.
    u_statistic = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u_statistic / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Boundaries of runs of equal values in sorted order.
    run_starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    run_ends = np.r_[run_starts[1:], len(values)]
    mean_rank_of_run = (run_starts + 1 + run_ends) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank_of_run, run_ends - run_starts)
    return ranks


def false_accept_reject(
    labels: Sequence[int | bool], scores: Sequence[float], threshold: float
) -> tuple[float, float]:
    """(false-accept rate, false-reject rate) when accepting every example with ``score >= threshold``.

    FAR = accepted negatives / negatives; FRR = rejected positives / positives. A rate whose class is absent
    is nan (it is undefined, and 0.0 would look like a perfect score).
    """
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    _check_pairs(y, s, "false_accept_reject")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("false_accept_reject: labels must be 0/1 or bools")
    y = y.astype(bool)
    accepted = s >= threshold
    n_neg = int((~y).sum())
    n_pos = int(y.sum())
    far = float((accepted & ~y).sum() / n_neg) if n_neg else math.nan
    frr = float((~accepted & y).sum() / n_pos) if n_pos else math.nan
    return far, frr


# ---------------------------------------------------------------------------------------------------------------
# Generation quality
# ---------------------------------------------------------------------------------------------------------------


def rouge(preds: Sequence[str], refs: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over (prediction, reference) pairs, via the ``rouge-score`` package.

    Porter stemming is on by default, the usual setting for summarisation papers (e.g. SAMSum baselines).
    """
    _check_pairs(preds, refs, "rouge")
    from rouge_score import rouge_scorer  # lazy: keeps this module importable with numpy alone

    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=use_stemmer)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(preds, refs):
        scores = scorer.score(ref, pred)  # rouge-score's order is (target, prediction)
        for key in keys:
            totals[key] += scores[key].fmeasure
    return {key: float(total / len(preds)) for key, total in totals.items()}


# ---------------------------------------------------------------------------------------------------------------
# Numbers and exact match
# ---------------------------------------------------------------------------------------------------------------

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(rf"(?P<sign>[-\u2212])?(?P<num>{_UNSIGNED})(?:\s*/\s*(?P<den>{_UNSIGNED}))?")


def _canonical_decimal(value: Decimal) -> str:
    text = format(value.normalize(), "f")  # normalize() strips trailing zeros; "f" avoids "1E+2"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _canonical_fraction(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator == 1:  # terminating decimal: 1/2 -> 0.5 so it matches a reference written as "0.5"
        return _canonical_decimal(Decimal(value.numerator) / Decimal(value.denominator))
    return f"{value.numerator}/{value.denominator}"


def normalize_number(text: str) -> str | None:
    """Canonical string of the last number in ``text`` (see module docstring), or None if there is none.

    "$1,234.50" -> "1234.5", "1234.5 dollars" -> "1234.5", "-3" -> "-3", "3.0" -> "3",
    "The answer is 42." -> "42", "1/2" -> "0.5", "2/6" -> "1/3".
    """
    if not isinstance(text, str):
        text = str(text)
    matches = list(_NUMBER_RE.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    numerator_text, denominator_text = match.group("num"), match.group("den")
    # A "-" glued to a preceding letter/digit is an operator or hyphen ("5-3", "COVID-19"), not a sign.
    start = match.start()
    negative = bool(match.group("sign")) and not (start > 0 and text[start - 1].isalnum())
    try:
        value = Decimal(numerator_text.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex only admits digit strings
        return None
    if negative:
        value = -value
    if denominator_text is not None:
        denominator = Decimal(denominator_text.replace(",", ""))
        if denominator == 0:
            return None
        return _canonical_fraction(Fraction(value) / Fraction(denominator))
    return _canonical_decimal(value)


_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation and English articles, collapse whitespace (SQuAD-style answer matching)."""
    text = str(text).lower().translate(_PUNCTUATION_TABLE)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> bool:
    """True if ``pred`` answers ``ref``: numbers compared canonically when ``ref`` has one, else normalised text."""
    ref_number = normalize_number(ref)
    if ref_number is not None:
        return normalize_number(pred) == ref_number
    return normalize_text(pred) == normalize_text(ref)


# ---------------------------------------------------------------------------------------------------------------
# Language modelling
# ---------------------------------------------------------------------------------------------------------------


def perplexity(mean_nll_nats: float) -> float:
    """exp(mean negative log-likelihood per token, in nats); inf when that overflows a float."""
    if math.isnan(mean_nll_nats):
        raise ValueError("perplexity: mean_nll_nats is nan; the loss diverged or the eval set was empty")
    try:
        return math.exp(mean_nll_nats)
    except OverflowError:
        return math.inf


def bits_per_byte(total_nll_nats: float, total_bytes: int) -> float:
    """Total NLL (nats, summed over tokens) converted to bits and divided by the UTF-8 byte count of the text.

    Unlike perplexity, this does not depend on the tokenizer, so models with different vocabularies compare.
    """
    if total_bytes <= 0:
        raise ValueError(
            f"bits_per_byte: total_bytes must be > 0 (UTF-8 length of the text), got {total_bytes}"
        )
    return float(total_nll_nats / (math.log(2) * total_bytes))


# ---------------------------------------------------------------------------------------------------------------
# Sampling-based evaluation and test-time compute
# ---------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): P(at least one of k draws without replacement from n samples,
    c of them correct, is correct) = 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k: need 1 <= k <= n (draw at most the samples you have), got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def weighted_vote(answers: Sequence[Hashable | None], weights: Sequence[float]) -> Hashable | None:
    """Answer with the largest total weight; None answers are ignored; ties go to the earliest answer.

    Weights must be finite and >= 0 (e.g. verifier probabilities); returns None if no answer is usable.
    """
    if len(answers) != len(weights):
        raise ValueError(f"weighted_vote: got {len(answers)} answers but {len(weights)} weights")
    totals: dict[Hashable, float] = {}  # insertion order = first occurrence, which breaks ties
    for answer, weight in zip(answers, weights):
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weighted_vote: weights must be finite and >= 0, got {weight} for {answer!r}")
        if answer is None:
            continue
        totals[answer] = totals.get(answer, 0.0) + weight
    if not totals:
        return None
    best = max(totals.values())
    return next(answer for answer, total in totals.items() if total == best)


def majority_vote(answers: Sequence[Hashable | None]) -> Hashable | None:
    """Most frequent non-None answer (self-consistency); ties go to the earliest answer; None if none usable."""
    return weighted_vote(answers, [1.0] * len(answers))


def verifier_gain(acc_with: float, acc_without: float) -> float:
    """Accuracy gained by reranking/filtering with a verifier, in absolute fraction points (can be negative)."""
    return float(acc_with - acc_without)


# ---------------------------------------------------------------------------------------------------------------
# Summaries over seeds / examples
# ---------------------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1); std is 0.0 for a single value."""
    if len(values) == 0:
        raise ValueError("mean_std: no values given")
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), std


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default ~95%), e.g. accuracy on n test examples.

    Better behaved than mean +/- z*se near 0 and 1, where small eval sets often sit.
    """
    if n <= 0 or not (0 <= successes <= n):
        raise ValueError(
            f"wilson_interval: need n > 0 and 0 <= successes <= n, got successes={successes}, n={n}"
        )
    p = successes / n
    z2 = z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half_width = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half_width), min(1.0, center + half_width)
