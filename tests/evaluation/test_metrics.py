"""Metrics checked against scikit-learn, rouge-score, brute-force enumeration and hand computation."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import sklearn.metrics as skm
from rouge_score import rouge_scorer

from modern_llm.evaluation import metrics as M

# --------------------------------------------------------------------------------------------------------------
# Classification vs scikit-learn
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_and_f1_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, 2, size=57).tolist()
    preds = rng.integers(0, 2, size=57).tolist()
    assert M.accuracy(preds, refs) == pytest.approx(skm.accuracy_score(refs, preds))
    assert M.f1_score(preds, refs) == pytest.approx(skm.f1_score(refs, preds))
    assert M.f1_score(preds, refs, positive=0) == pytest.approx(skm.f1_score(refs, preds, pos_label=0))


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn_with_string_labels(seed):
    rng = np.random.default_rng(seed)
    labels = np.array(["neg", "neu", "pos", "other"])
    refs = labels[rng.integers(0, 3, size=40)].tolist()
    preds = labels[rng.integers(0, 4, size=40)].tolist()  # "other" only ever predicted
    assert M.macro_f1(preds, refs) == pytest.approx(skm.f1_score(refs, preds, average="macro"))


def test_f1_degenerate_cases_follow_sklearn_zero_division():
    assert M.f1_score([0, 0, 0], [0, 0, 0]) == 0.0
    assert skm.f1_score([0, 0, 0], [0, 0, 0], zero_division=0) == 0.0
    assert M.f1_score([1, 1], [1, 1]) == 1.0
    assert isinstance(M.accuracy([1], [1]), float)


def test_paired_metrics_reject_bad_lengths_and_empty():
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        M.accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="empty"):
        M.macro_f1([], [])


# --------------------------------------------------------------------------------------------------------------
# ROC-AUC and FAR/FRR
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_roc_auc_matches_sklearn_including_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=80)
    labels[:2] = [0, 1]
    # Rounded scores produce many ties, which is where rank-based AUC implementations usually go wrong.
    scores = np.round(rng.normal(size=80) + labels * 0.7, 1)
    assert M.roc_auc(labels.tolist(), scores.tolist()) == pytest.approx(skm.roc_auc_score(labels, scores))


def test_roc_auc_extremes_and_errors():
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert M.roc_auc([True, False], [0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="one positive and one negative"):
        M.roc_auc([1, 1], [0.3, 0.4])
    with pytest.raises(ValueError, match="0/1"):
        M.roc_auc([0, 2], [0.3, 0.4])


def test_false_accept_reject_by_hand():
    labels = [1, 1, 1, 0, 0]
    scores = [0.9, 0.6, 0.2, 0.7, 0.1]
    far, frr = M.false_accept_reject(labels, scores, threshold=0.5)
    assert far == pytest.approx(1 / 2)  # the 0.7 negative is accepted
    assert frr == pytest.approx(1 / 3)  # the 0.2 positive is rejected
    # Threshold is inclusive: score == threshold is accepted.
    assert M.false_accept_reject([1, 0], [0.5, 0.5], 0.5) == (1.0, 0.0)
    far, frr = M.false_accept_reject([1, 1], [0.1, 0.9], 0.5)
    assert math.isnan(far) and frr == 0.5


# --------------------------------------------------------------------------------------------------------------
# ROUGE vs rouge-score
# --------------------------------------------------------------------------------------------------------------


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def test_rouge_matches_rouge_score_mean_fmeasure():
    preds = ["the cat sat on the mat", "John is going to the shops later", "nothing in common"]
    refs = ["a cat was sitting on the mat", "Later, John goes shopping.", "entirely different words"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {k: np.mean([scorer.score(r, p)[k].fmeasure for p, r in zip(preds, refs)]) for k in ROUGE_KEYS}
    got = M.rouge(preds, refs)
    assert set(got) == set(ROUGE_KEYS)
    for key in ROUGE_KEYS:
        assert got[key] == pytest.approx(expected[key])
        assert isinstance(got[key], float)


def test_rouge1_by_hand():
    # pred tokens {the, cat}, ref tokens {the, dog}: overlap 1, P = R = 1/2 -> F = 1/2; no bigram overlap.
    got = M.rouge(["the cat"], ["the dog"])
    assert got["rouge1"] == pytest.approx(0.5)
    assert got["rouge2"] == 0.0
    assert M.rouge(["same text here"], ["same text here"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


# --------------------------------------------------------------------------------------------------------------
# Number normalisation and exact match
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,234.50", "1234.5"),
        ("1234.5 dollars", "1234.5"),
        ("-3", "-3"),
        ("3.0", "3"),
        ("3.", "3"),
        ("The answer is 42.", "42"),
        ("He has 3 apples, so the answer is 42.", "42"),
        ("1,234,567", "1234567"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("007", "7"),
        ("-0", "0"),
        ("-0.0", "0"),
        ("100", "100"),
        ("1200.00", "1200"),
        ("50%", "50"),
        ("1/2", "0.5"),
        ("-1/2", "-0.5"),
        ("2/6", "1/3"),
        ("3 / 4", "0.75"),
        ("10/2", "5"),
        ("x = -3", "-3"),
        ("x = \u22127", "-7"),
        ("5-3", "3"),
        ("COVID-19", "19"),
        ("1,2", "2"),
        ("12,3456", "3456"),
        ("#### 70,000", "70000"),
        ("no digits here", None),
        ("", None),
        ("5/0", None),
    ],
)
def test_normalize_number(text, expected):
    assert M.normalize_number(text) == expected


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("The answer is 18.", "18", True),
        ("$18.00", "18", True),
        ("18 dollars", "$18", True),
        ("17", "18", False),
        ("no idea", "18", False),
        ("1/2", "0.5", True),
        ("70,000", "70000", True),
        ("The Positive.", "positive", True),
        ("an apple", "Apple", True),
        ("negative", "positive", False),
    ],
)
def test_exact_match(pred, ref, expected):
    assert M.exact_match(pred, ref) is expected


# --------------------------------------------------------------------------------------------------------------
# Language-model metrics
# --------------------------------------------------------------------------------------------------------------


def test_perplexity_and_bits_per_byte_by_hand():
    assert M.perplexity(0.0) == 1.0
    assert M.perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert M.perplexity(1e6) == math.inf
    with pytest.raises(ValueError, match="nan"):
        M.perplexity(float("nan"))
    # 10 tokens at uniform-over-256 NLL ln(256) each, covering 10 bytes -> exactly 8 bits per byte.
    assert M.bits_per_byte(10 * math.log(256), 10) == pytest.approx(8.0)
    # 4 tokens of NLL ln 2 each over "héllo" (6 UTF-8 bytes): 4 bits / 6 bytes.
    assert M.bits_per_byte(4 * math.log(2), len("héllo".encode())) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="total_bytes"):
        M.bits_per_byte(1.0, 0)


# --------------------------------------------------------------------------------------------------------------
# pass@k vs brute force; votes
# --------------------------------------------------------------------------------------------------------------


def _pass_at_k_brute_force(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration_of_all_k_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert M.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_special_values_and_errors():
    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert M.pass_at_k(200, 0, 100) == 0.0
    assert 0.0 < M.pass_at_k(2000, 1, 1) < 1e-3  # large n stays exact (no float cancellation)
    with pytest.raises(ValueError, match="c <= n"):
        M.pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="k <= n"):
        M.pass_at_k(5, 2, 6)


def test_majority_vote_counts_ignores_none_and_breaks_ties_by_first_occurrence():
    assert M.majority_vote(["3", "4", "4", None, None, None]) == "4"
    assert M.majority_vote(["7", "5", "5", "7"]) == "7"  # tie: "7" appeared first
    assert M.majority_vote(["5", "7", "7", "5"]) == "5"
    assert M.majority_vote([None, "9", None]) == "9"
    assert M.majority_vote([None, None]) is None
    assert M.majority_vote([]) is None


def test_weighted_vote():
    assert M.weighted_vote(["a", "b", "b"], [0.9, 0.4, 0.4]) == "a"
    assert M.weighted_vote(["a", "b", "b"], [0.7, 0.4, 0.4]) == "b"
    assert M.weighted_vote(["a", "b"], [0.5, 0.5]) == "a"  # tie -> first
    assert M.weighted_vote([None, "b"], [10.0, 0.1]) == "b"
    with pytest.raises(ValueError, match=">= 0"):
        M.weighted_vote(["a"], [-1.0])
    with pytest.raises(ValueError, match="2 answers but 1 weights"):
        M.weighted_vote(["a", "b"], [1.0])


def test_majority_vote_agrees_with_counting_on_random_inputs():
    rng = random.Random(0)
    for _ in range(200):
        answers = [rng.choice(["1", "2", "3", None]) for _ in range(rng.randint(1, 9))]
        counts = {a: answers.count(a) for a in answers if a is not None}
        got = M.majority_vote(answers)
        if not counts:
            assert got is None
            continue
        winners = [a for a in counts if counts[a] == max(counts.values())]
        assert got == min(winners, key=answers.index)


# --------------------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------------------


def test_mean_std_and_gain():
    assert M.mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(np.std([1, 2, 3, 4], ddof=1)))
    assert M.mean_std([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        M.mean_std([])
    assert M.verifier_gain(0.62, 0.55) == pytest.approx(0.07)


def test_wilson_interval_by_hand():
    # p = 0.5 is symmetric, so the Wilson center stays at 0.5; half-width from the closed form.
    lo, hi = M.wilson_interval(50, 100)
    half = 1.96 * math.sqrt(0.25 / 100 + 1.96**2 / (4 * 100**2)) / (1 + 1.96**2 / 100)
    assert (lo, hi) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    lo, hi = M.wilson_interval(0, 20)
    assert lo == 0.0 and 0.0 < hi < 0.2
    with pytest.raises(ValueError):
        M.wilson_interval(5, 3)


def test_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys, modern_llm.evaluation.metrics as m; "
        "bad = [x for x in ('torch', 'sklearn', 'rouge_score', 'transformers') if x in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
