"""The trivial predictors every result is printed beside: a result that does not beat them says
nothing about whether the network learnt."""
from __future__ import annotations

import numpy as np


def median_baseline(ages: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Per row: the median age of the rows outside its fold (its fold's training rows)."""
    ages, folds = np.asarray(ages, float), np.asarray(folds)
    out = np.empty(len(ages))
    for fold in np.unique(folds):
        held_out = folds == fold
        out[held_out] = np.median(ages[~held_out]) if (~held_out).any() else np.nan
    return out
