"""Binary-classifier metrics for safety classifiers: precision, recall, F1 at a threshold, and ROC AUC.

Where it sits: `benchmarks/safety_classifier.py` and the tests score a classifier's P(violation) on
labelled rows with these; nothing here knows about models. AUC is the Mann-Whitney statistic (the
probability a random positive scores above a random negative, ties counting half), exact in O(n log n);
tests/test_safety_scoring.py checks it against scikit-learn's `roc_auc_score`.

Key trade-off: one threshold for precision/recall (the guard's default, 0.5) plus the
threshold-free AUC, rather than a full precision-recall curve: two numbers per harm type that a
table can show side by side with a baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    pairs = sorted(zip(scores, labels, strict=True))
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over runs of tied scores
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        mid_rank = (i + 1 + j) / 2  # ranks are 1-based: the run covers i+1 .. j
        rank_sum += mid_rank * sum(1 for _, y in pairs[i:j] if y)
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binary_report(scores: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> dict[str, float]:
    """{n, positives, precision, recall, f1, auc}; a score above `threshold` predicts a violation.
    Precision is NaN when nothing is predicted positive, recall when there are no positives."""
    tp = sum(1 for s, y in zip(scores, labels, strict=True) if s > threshold and y)
    fp = sum(1 for s, y in zip(scores, labels, strict=True) if s > threshold and not y)
    pos = sum(1 for y in labels if y)
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / pos if pos else math.nan
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else math.nan
    return {"n": len(labels), "positives": pos, "precision": precision, "recall": recall, "f1": f1,
            "auc": roc_auc(scores, labels)}  # fmt: skip
