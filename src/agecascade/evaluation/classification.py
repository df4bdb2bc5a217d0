"""Scores of an ordered group classifier (Adience): exact and 1-off accuracy, confusion matrix,
per-class precision and recall, mean ± std over cross-validation folds.

Pure numpy on class *indices*; index order is age order, which is what makes "1-off" (the true
group or an adjacent one) meaningful. Undefined ratios (a class never predicted, a class absent
from a fold) are NaN rather than 0, so an empty class cannot pass for a perfectly bad one.
"""
from __future__ import annotations

import numpy as np


def _pair(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape or true.ndim != 1:
        raise ValueError(f"true and predicted labels must be 1-D of one length, got "
                         f"{true.shape} and {pred.shape}")
    if true.size == 0:
        raise ValueError("no labels to score")
    return true.astype(np.int64), pred.astype(np.int64)


def exact_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """Share of predictions that are the true group."""
    true, pred = _pair(true, pred)
    return float(np.mean(true == pred))


def one_off_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """Share of predictions that are the true group or one of its neighbours in age order."""
    true, pred = _pair(true, pred)
    return float(np.mean(np.abs(true - pred) <= 1))


def confusion_matrix(true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) int64 counts; row = true class, column = predicted class (the thesis's table 6)."""
    true, pred = _pair(true, pred)
    for name, labels in (("true", true), ("predicted", pred)):
        bad = labels[(labels < 0) | (labels >= n_classes)]
        if bad.size:
            raise ValueError(f"{name} label {int(bad[0])} is outside 0..{n_classes - 1}")
    return np.bincount(true * n_classes + pred, minlength=n_classes**2).reshape(n_classes, n_classes)


def precision_recall(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (precision (K,), recall (K,)) of a confusion matrix; NaN where 0/0."""
    confusion = np.asarray(confusion, dtype=float)
    hits = np.diag(confusion)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / predicted, hits / actual


def fold_mean_std(values: np.ndarray) -> tuple[float, float, int]:
    """(mean, sample std, folds counted) over per-fold scores, leaving out NaN folds (a class
    absent from a fold has no recall there). std is NaN with fewer than two folds."""
    values = np.asarray(values, dtype=float)
    kept = values[~np.isnan(values)]
    if kept.size == 0:
        return float("nan"), float("nan"), 0
    std = float(np.std(kept, ddof=1)) if kept.size > 1 else float("nan")
    return float(np.mean(kept)), std, int(kept.size)
