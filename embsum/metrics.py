"""Ranking metrics with the MIND evaluation formulas (msnews.github.io, evaluate.py).

Per impression: AUC (ties count one half, as in scikit-learn's roc_auc_score), MRR
(sum of 1/rank over clicked items / number clicked), nDCG@k with gains 2^y - 1 and log2(rank + 1)
discounts. Ties in the ranking metrics break by candidate order (a stable sort), so results are
reproducible. Impressions with no positive or no negative are skipped and counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

METRIC_NAMES = ("auc", "mrr", "ndcg5", "ndcg10")


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):  # average rank over each run of ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    pos = labels > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ranked(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return labels[np.argsort(-scores, kind="stable")]


def mrr(labels: np.ndarray, scores: np.ndarray) -> float:
    y = _ranked(labels, scores)
    return float((y / (np.arange(len(y)) + 1)).sum() / y.sum())


def dcg(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    y = _ranked(labels, scores)[:k]
    return float(((2.0**y - 1.0) / np.log2(np.arange(len(y)) + 2.0)).sum())


def ndcg(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    return dcg(labels, scores, k) / dcg(labels, labels.astype(np.float64), k)


def impression_metrics(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray
                       ) -> dict[str, float] | None:
    """AUC, MRR, nDCG@5, nDCG@10 of one impression; None when it has no positive or no negative."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D of equal length")
    if not (y > 0).any() or (y > 0).all():
        return None
    return {"auc": auc(y, s), "mrr": mrr(y, s), "ndcg5": ndcg(y, s, 5), "ndcg10": ndcg(y, s, 10)}


@dataclass
class MetricMeans:
    """Mean metrics over the impressions that have a positive and a negative."""

    auc: float
    mrr: float
    ndcg5: float
    ndcg10: float
    impressions: int  # scored
    skipped: int  # no positive or no negative

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def mean_metrics(impressions: Iterable[tuple[Sequence[float], Sequence[float]]]) -> MetricMeans:
    """Means over impressions of (labels, scores) pairs."""
    sums = dict.fromkeys(METRIC_NAMES, 0.0)
    n = skipped = 0
    for labels, scores in impressions:
        m = impression_metrics(labels, scores)
        if m is None:
            skipped += 1
            continue
        n += 1
        for k in METRIC_NAMES:
            sums[k] += m[k]
    means = {k: (v / n if n else float("nan")) for k, v in sums.items()}
    return MetricMeans(**means, impressions=n, skipped=skipped)


# Former names (before the generated user summary made "summarize" ambiguous), kept for callers.
summarize = mean_metrics
MetricSummary = MetricMeans
