"""Metric functions on mean expression profiles and program matchings."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.metrics import average_precision_score, roc_auc_score


def r2_score_means(true: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination of a predicted mean profile (unclipped).

    ``1 - sum((true - pred)^2) / sum((true - mean(true))^2)`` over genes.
    """
    true = np.asarray(true, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    ss_tot = np.sum((true - true.mean()) ** 2)
    if ss_tot == 0:
        return float("nan")
    return float(1.0 - np.sum((true - pred) ** 2) / ss_tot)


def pearson_delta(true: np.ndarray, pred: np.ndarray, control: np.ndarray) -> float:
    """Pearson correlation of ``pred - control`` with ``true - control``."""
    a = np.asarray(true, dtype=np.float64) - control
    b = np.asarray(pred, dtype=np.float64) - control
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt(np.sum(a**2) * np.sum(b**2))
    if denom == 0:
        return float("nan")
    return float(np.sum(a * b) / denom)


def match_programs(true_loadings: np.ndarray, learned_loadings: np.ndarray) -> np.ndarray:
    """Hungarian matching of true to learned programs on ``|correlation|`` of loadings.

    Parameters
    ----------
    true_loadings
        Genes x K_true.
    learned_loadings
        Genes x K_learned (``K_learned >= K_true`` for a full matching).

    Returns
    -------
    numpy.ndarray
        For each true program, the index of its learned program (``-1`` if unmatched).
    """
    t = _standardise_columns(true_loadings)
    l_ = _standardise_columns(learned_loadings)
    corr = np.abs(t.T @ l_) / t.shape[0]
    rows, cols = linear_sum_assignment(-corr)
    match = np.full(true_loadings.shape[1], -1)
    match[rows] = cols
    return match


def _standardise_columns(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)


def target_recovery(
    true_targets: np.ndarray, learned_probs: np.ndarray, match: np.ndarray
) -> dict[str, float]:
    """AUROC / AUPRC of learned target probabilities against true targets after matching.

    Parameters
    ----------
    true_targets
        Perturbations x K_true booleans.
    learned_probs
        Perturbations x K_learned probabilities (same perturbation order).
    match
        Output of :func:`match_programs`.
    """
    keep = match >= 0
    y = np.asarray(true_targets, dtype=bool)[:, keep].ravel()
    s = np.asarray(learned_probs)[:, match[keep]].ravel()
    if y.all() or not y.any():
        return {"target_auroc": float("nan"), "target_auprc": float("nan")}
    return {
        "target_auroc": float(roc_auc_score(y, s)),
        "target_auprc": float(average_precision_score(y, s)),
    }


def graph_recovery(
    true_graph: np.ndarray, learned_graph: np.ndarray, match: np.ndarray
) -> dict[str, float]:
    """Edge AUROC (on ``|w|``) and SHD of the learned graph restricted to matched programs."""
    keep = np.flatnonzero(match >= 0)
    sub = np.asarray(learned_graph)[np.ix_(match[keep], match[keep])]
    true = np.asarray(true_graph)[np.ix_(keep, keep)] != 0
    off = ~np.eye(len(keep), dtype=bool)
    y, s = true[off], np.abs(sub[off])
    auroc = float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else float("nan")
    learned = sub != 0
    diff = true != learned
    reversed_ = diff & diff.T & (true | true.T) & (learned | learned.T)
    shd = int(diff[off].sum() - reversed_[off].sum() / 2)
    return {"graph_auroc": auroc, "graph_shd": shd}


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Euclidean energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between two samples.

    Unlike a squared-Euclidean version, it compares whole distributions, not only means.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean())
