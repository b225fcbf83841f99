"""Ranking metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import ndcg_score, roc_auc_score

from embsum.metrics import METRIC_NAMES, auc, impression_metrics, mean_metrics, summarize


def test_hand_computed_impression() -> None:
    # 5 candidates. Sorted by score: c0 (0.9, neg), c1 (0.8, POS), c3 (0.5, neg), c4 (0.3, POS), c2 (0.1, neg).
    labels = [0, 1, 0, 0, 1]
    scores = [0.9, 0.8, 0.1, 0.5, 0.3]
    m = impression_metrics(labels, scores)
    assert m is not None
    # AUC: (pos, neg) pairs ordered right: 0.8 > 0.5, 0.8 > 0.1, 0.3 > 0.1 -> 3 of 2 * 3 = 6.
    assert m["auc"] == pytest.approx(3 / 6)
    # MRR: positives at ranks 2 and 4 -> (1/2 + 1/4) / 2.
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    # nDCG: DCG = 1/log2(2+1) + 1/log2(4+1); ideal = 1/log2(2) + 1/log2(3). All 5 fit in @5 and @10.
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg5"] == pytest.approx(dcg / idcg)
    assert m["ndcg10"] == pytest.approx(dcg / idcg)


def test_hand_computed_ndcg_cut_off() -> None:
    # 7 candidates, scores descending, positives at ranks 1 and 6: @5 sees one, @10 sees both.
    labels = [1, 0, 0, 0, 0, 1, 0]
    scores = [7, 6, 5, 4, 3, 2, 1]
    m = impression_metrics(labels, scores)
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg5"] == pytest.approx(1 / idcg)
    assert m["ndcg10"] == pytest.approx((1 + 1 / math.log2(7)) / idcg)
    assert m["mrr"] == pytest.approx((1 + 1 / 6) / 2)
    assert m["auc"] == pytest.approx((5 + 1) / 10)  # first positive beats 5 negatives, second beats 1


def test_auc_ties_count_one_half() -> None:
    # pos 0.5 vs neg 0.5 is a tie (1/2); pos 0.5 > 0.2; pos 0.7 > 0.5 and > 0.2 -> 3.5 / 4.
    assert auc(np.array([1.0, 0, 1, 0]), np.array([0.5, 0.5, 0.7, 0.2])) == pytest.approx(3.5 / 4)
    assert auc(np.array([1.0, 0]), np.array([0.3, 0.3])) == pytest.approx(0.5)


def test_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 30))
        y = rng.integers(0, 2, size=n)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        s = np.round(rng.normal(size=n), 1)  # one decimal: many ties
        m = impression_metrics(y, s)
        assert m["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_ndcg_matches_sklearn_without_ties() -> None:
    # With 0/1 labels, 2^y - 1 == y, so sklearn's linear-gain nDCG is the MIND nDCG.
    rng = np.random.default_rng(1)
    for _ in range(100):
        n = int(rng.integers(2, 25))
        y = rng.integers(0, 2, size=n)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        s = rng.permutation(n).astype(float)
        m = impression_metrics(y, s)
        assert m["ndcg5"] == pytest.approx(ndcg_score(y[None], s[None], k=5), abs=1e-12)
        assert m["ndcg10"] == pytest.approx(ndcg_score(y[None], s[None], k=10), abs=1e-12)


def test_ranking_ties_break_by_candidate_order() -> None:
    # All scores equal: the ranking is the candidate order, so the positive first gives MRR 1.
    assert impression_metrics([1, 0, 0], [0.0, 0.0, 0.0])["mrr"] == 1.0
    assert impression_metrics([0, 0, 1], [0.0, 0.0, 0.0])["mrr"] == pytest.approx(1 / 3)


def test_skipped_impressions_are_counted() -> None:
    imps = [([0, 1, 0], [0.1, 0.9, 0.2]),  # perfect
            ([0, 0, 0], [0.1, 0.2, 0.3]),  # no positive
            ([1, 1], [0.5, 0.4]),  # no negative
            ([1, 0], [0.1, 0.9])]  # worst
    assert impression_metrics(*imps[1]) is None and impression_metrics(*imps[2]) is None
    summ = mean_metrics(imps)
    assert summarize is mean_metrics  # the former name, kept for callers
    assert summ.impressions == 2 and summ.skipped == 2
    assert summ.auc == pytest.approx((1.0 + 0.0) / 2)
    assert summ.mrr == pytest.approx((1.0 + 0.5) / 2)
    d = summ.as_dict()
    assert set(METRIC_NAMES) <= set(d) and d["skipped"] == 2


def test_empty_summary_is_nan_and_shape_errors() -> None:
    summ = mean_metrics([])
    assert summ.impressions == 0 and summ.skipped == 0 and math.isnan(summ.auc)
    with pytest.raises(ValueError, match="equal length"):
        impression_metrics([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        impression_metrics([[0, 1]], [[0.1, 0.2]])
