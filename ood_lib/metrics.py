"""OOD metrics. The one convention of the study (docs/methods.md §0), in one place:

    scores are HIGHER for inputs that look MORE in-distribution, and ID is the positive class.

Every function takes ``id_scores`` and ``ood_scores`` (1-d arrays) and returns a float in [0, 1].

* ``auroc``     P(score_ID > score_OOD) + 0.5 P(tie): the Mann-Whitney statistic, equal to the area under
                the ROC curve with ID positive (what scikit-learn's ``roc_auc_score`` gives).
* ``aupr_in``   average precision with ID positive (scikit-learn's ``average_precision_score``).
* ``aupr_out``  average precision with OOD positive and the scores negated.
* ``fpr95``     the classic FPR at 95% TPR: take the highest threshold t that keeps at least 95% of ID
                (score >= t); report the fraction of OOD with score >= t.
* ``fpr95_id``  OpenOOD v1.5's reading (since Aug 2023): take the lowest threshold t that catches at least
                95% of OOD (score <= t); report the fraction of ID with score <= t (ID wrongly rejected).

Averages over OOD sets are unweighted means of the per-set metrics (``mean_over_ood``, on tidy result rows).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_id")
TPR_LEVEL = 0.95


def _check(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(id_scores, dtype=np.float64).ravel()
    b = np.asarray(ood_scores, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"need ID and OOD scores, got {a.size} ID and {b.size} OOD")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores contain NaN or inf: fix the detector before computing metrics")
    return a, b


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve, ID positive; ties count one half (Mann-Whitney U / (n_id * n_ood))."""
    a, b = _check(id_scores, ood_scores)
    both = np.concatenate([a, b])
    # average ranks (1-based) handle ties exactly
    order = np.argsort(both, kind="mergesort")
    sorted_vals = both[order]
    ranks = np.empty(both.size, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], both.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0
    return float(u / (a.size * b.size))


def _average_precision(pos, neg) -> float:
    """Average precision, positives scored high: sum over distinct thresholds of (R_k - R_{k-1}) P_k."""
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_run = np.r_[scores[1:] != scores[:-1], True]  # one point per distinct threshold
    tp = np.cumsum(labels)[last_of_run]
    predicted = (np.arange(1, scores.size + 1))[last_of_run]
    precision = tp / predicted
    recall = tp / pos.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(id_scores, ood_scores) -> float:
    """Average precision with ID as the positive class (higher score = more ID)."""
    a, b = _check(id_scores, ood_scores)
    return _average_precision(a, b)


def aupr_out(id_scores, ood_scores) -> float:
    """Average precision with OOD as the positive class, on negated scores."""
    a, b = _check(id_scores, ood_scores)
    return _average_precision(-b, -a)


def _fpr_at_tpr(pos, neg, level: float = TPR_LEVEL) -> float:
    """Fraction of ``neg`` with score >= t, where t is the highest threshold keeping >= level of ``pos``."""
    pos = np.sort(pos)
    k = int(np.floor((1.0 - level) * pos.size + 1e-9))  # how many positives may fall below t
    t = pos[k]
    return float(np.mean(neg >= t))


def fpr95(id_scores, ood_scores) -> float:
    """Classic FPR@95: fraction of OOD at or above the threshold that keeps 95% of ID."""
    a, b = _check(id_scores, ood_scores)
    return _fpr_at_tpr(a, b)


def fpr95_id(id_scores, ood_scores) -> float:
    """OpenOOD v1.5 FPR@95: fraction of ID rejected (score <= t) when 95% of OOD is caught (score <= t)."""
    a, b = _check(id_scores, ood_scores)
    return _fpr_at_tpr(-b, -a)


def roc_curve(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1); ID positive, accepted when score >= t."""
    a, b = _check(id_scores, ood_scores)
    t = np.unique(np.concatenate([a, b]))[::-1]
    tpr = np.searchsorted(np.sort(-a), -t, side="right") / a.size  # fraction of ID with score >= t
    fpr = np.searchsorted(np.sort(-b), -t, side="right") / b.size
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


METRIC_FUNCTIONS = {"auroc": auroc, "aupr_in": aupr_in, "aupr_out": aupr_out, "fpr95": fpr95, "fpr95_id": fpr95_id}


def all_metrics(id_scores, ood_scores) -> dict[str, float]:
    """Every metric of ``METRICS`` for one (ID, OOD) pair."""
    return {name: fn(id_scores, ood_scores) for name, fn in METRIC_FUNCTIONS.items()}


def accuracy(logits, labels) -> float:
    """Top-1 accuracy."""
    logits = np.asarray(logits)
    return float(np.mean(logits.argmax(axis=1) == np.asarray(labels)))


def mean_over_ood(rows: pd.DataFrame) -> pd.DataFrame:
    """Unweighted mean over OOD sets of each (split, seed, epoch, detector, metric) of tidy result rows."""
    ood = rows[rows["ood_set"] != ""]
    keys = ["split", "seed", "epoch", "detector", "metric"]
    return ood.groupby(keys, as_index=False)["value"].mean()
