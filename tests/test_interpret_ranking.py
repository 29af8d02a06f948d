"""The interpretability ranking shared by the report and the dashboard, the blank-detection notes and the
example tokens column, against hand-worked cases."""

from __future__ import annotations

import numpy as np

from pipeline.feature_ranking import MIN_SUPPORT, detection_notes, evidence_score, rank_features
from pipeline.interpret.examples import QUANTILE, TOP
from pipeline.interpret.outputs import top_example_tokens

NAN = float("nan")


def test_evidence_score_is_the_mean_of_defined_scores() -> None:
    s = evidence_score(np.array([0.8, NAN, NAN, 1.0]), np.array([0.6, 0.9, NAN, 1.0]))
    assert s[0] == 0.7 and s[1] == 0.9 and np.isnan(s[2]) and s[3] == 1.0


def test_rank_puts_supported_scored_features_first() -> None:
    n_tokens = 10_000  # dense: more than 1,000 firings
    #            0: perfect on 2 tokens  1: good, supported  2: dense  3: dead  4: best supported  5: no detection
    fire = np.array([2, 500, 5_000, 0, 40, 300])
    det = np.array([1.0, 0.8, 0.99, NAN, 0.9, NAN])
    fuzz = np.array([1.0, 0.8, 0.99, NAN, 0.9, 0.7])
    auroc = np.array([0.5, 0.7, 0.6, NAN, 0.55, 0.9])
    order, tier = rank_features(fire, n_tokens, det, fuzz, auroc)
    assert order.tolist() == [4, 1, 2, 5, 0, 3]  # tier 0 by score; tier 1 (dense, undetectable) by score; rare; dead
    assert tier.tolist() == [2, 0, 1, 3, 0, 1]
    # Ties on the score fall to topic AUROC, then firing count, then feature order.
    order, _ = rank_features(np.array([50, 60, 60, 50]), n_tokens, np.full(4, 0.9), np.full(4, 0.9),
                             np.array([0.6, 0.6, 0.6, 0.7]))
    assert order.tolist() == [3, 1, 2, 0]
    # The minimum support is a count of tokens: MIN_SUPPORT - 1 is rare, MIN_SUPPORT is not.
    _, tier = rank_features(np.array([MIN_SUPPORT - 1, MIN_SUPPORT]), n_tokens, np.ones(2), np.ones(2), np.ones(2))
    assert tier.tolist() == [2, 0]


def test_detection_notes_say_why_a_score_is_missing() -> None:
    notes = detection_notes(np.array([0, 10, 900, 1, 50]), np.array([False, False, True, True, True]),
                            np.array([NAN, NAN, NAN, NAN, 0.7]), np.array([NAN, NAN, 0.5, NAN, 0.6]))
    assert notes == ["dead: never fired", "not explained", "no silent contexts to test against",
                     "too few activating examples", None]


def test_top_example_tokens_are_the_tokens_under_each_top_maximum() -> None:
    text = {1: " the", 2: "cat", 3: " sat", 4: "!"}
    kind = np.array([QUANTILE, TOP, TOP])
    rank = np.array([0, 1, 0])
    tokens = np.array([[1, 2, -1], [3, 4, 1], [2, 3, 4]])
    acts = np.array([[0.0, 9.0, 0.0], [0.0, 0.5, 2.0], [0.1, 3.0, 0.0]])
    # Rank 0 (row 2) peaks on " sat", rank 1 (row 1) on " the"; the quantile example is not a top one.
    assert top_example_tokens(kind, rank, tokens, acts, text) == [" sat", " the"]
    assert top_example_tokens(kind, rank, tokens, acts, text, n=1) == [" sat"]


def test_auroc_interval_by_hand() -> None:
    from pipeline.interpret.bins import auroc_interval

    # A = 0.75, 10 + 10 units: Q1 = 0.6, Q2 = 0.642857, SE^2 = (0.1875 + 9 * 0.0375 + 9 * 0.080357) / 100 = 0.0124821.
    lo, hi = auroc_interval(np.array([0.75, 0.75, NAN, 0.99]), np.array([10, 1000, 10, 10]),
                            np.array([10, 1000, 10, 0]))
    assert abs(lo[0] - (0.75 - 1.96 * 0.0124821 ** 0.5)) < 1e-6 and abs(hi[0] - (0.75 + 1.96 * 0.0124821 ** 0.5)) < 1e-6
    assert lo[0] < lo[1] < 0.75 < hi[1] < hi[0]  # more units, a narrower interval
    assert np.isnan(lo[2]) and np.isnan(hi[3])  # no AUROC, or an empty class: no interval
