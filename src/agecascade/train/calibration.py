"""How ``predict`` reads the age distribution: two corrections fitted on the validation split.

**Temperature scaling** (Guo et al., 2017) of the age distribution.

A network trained with cross-entropy, and more so with the mean-variance loss, predicts age
distributions narrower than its errors: the central 90 % interval holds the true age far less
often than 90 %. One temperature T, chosen to minimise the validation split's negative log
likelihood of softmax(logits / T), widens them. ``predict`` applies it to the interval, the
spread and p_under_18; the age itself stays the expected value of the network's own
distribution, since a softer distribution pulls every age toward the middle of the label range.

**Age-bias correction.** The DEX expected value regresses toward the training ages' mean: on
its validation split a network over-ages the young and under-ages the old, so its predicted age
runs along a line ``predicted = slope * true + intercept`` with a slope under 1. The linear
correction of brain-age studies (reviewed by de Lange and Cole, 2020) fits that line on the
validation split and reads each age back through it, ``(predicted - intercept) / slope``.
``predict`` applies it to the ages of the classes, so the age, the interval, the spread and
p_under_18 all come from the one corrected distribution. On the validation split the mean error
then no longer runs with the true age; the in-domain MAE rises a little, the error on photos
unlike the training ones falls (docs/zero-shot.md, item 19).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

INTERVAL = 0.90  # age_low..age_high holds this much of the predicted distribution

# 1/T is searched in this range: T from 0.1 (sharpen) to 20 (almost flat)
INVERSE_RANGE = (0.05, 10.0)
STEPS = 60  # golden-section steps: the bracket shrinks by 0.618**60, far below any useful digit

IDENTITY = (1.0, 0.0)  # (slope, intercept): the ages as the network gives them
# Under this slope the network's ages say little about the true age (an untrained or failed
# run), and dividing by the slope would throw them across the label range: left uncorrected.
MIN_SLOPE = 0.5


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log likelihood of ``labels`` under softmax(logits / temperature)."""
    return F.cross_entropy(logits.double() / temperature, labels).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T that minimises the NLL of (N, K) logits against (N,) class indices.

    The NLL is convex in 1/T (a log-sum-exp of terms linear in 1/T, minus one linear term), so a
    golden-section search over 1/T finds its minimum without a gradient or a starting guess."""
    if len(labels) == 0:
        raise ValueError("fit_temperature needs at least one labelled row")
    logits = logits.double()
    low, high = INVERSE_RANGE
    ratio = (math.sqrt(5) - 1) / 2

    def loss(inverse: float) -> float:
        return nll(logits, labels, 1.0 / inverse)

    a, b = low + (1 - ratio) * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(STEPS):
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = low + (1 - ratio) * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return 1.0 / ((low + high) / 2)


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Float64 (B, K) probabilities -> softmax(log(probs) / T), which is softmax(logits / T)."""
    tempered = np.power(probs, 1.0 / temperature)
    return tempered / tempered.sum(axis=1, keepdims=True)


def central_interval(probs: np.ndarray, ages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, K) probabilities over ``ages`` (K,) -> the ages at the (1 - INTERVAL) / 2 and
    (1 + INTERVAL) / 2 quantiles: each the smallest class age whose cumulative mass reaches it."""
    cdf = np.cumsum(probs, axis=1)
    tail = (1.0 - INTERVAL) / 2.0
    low = ages[np.minimum((cdf < tail).sum(axis=1), len(ages) - 1)]
    high = ages[np.minimum((cdf < 1.0 - tail).sum(axis=1), len(ages) - 1)]
    return low, high


def coverage(logits: torch.Tensor, truth: np.ndarray, ages: np.ndarray,
             temperature: float) -> float:
    """The fraction of rows whose true age lies in the central interval at ``temperature`` of
    the distribution over ``ages`` (the classes' ages as ``predict`` reads them)."""
    probs = torch.softmax(logits.double() / temperature, dim=1).numpy()
    low, high = central_interval(probs, ages)
    return float(((low <= truth) & (truth <= high)).mean())


def fit_bias_line(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line ``predicted = slope * truth + intercept``;
    :data:`IDENTITY` when the rows cannot fit one or its slope is under :data:`MIN_SLOPE`."""
    truth = np.asarray(truth, dtype=np.float64)
    if len(truth) < 2 or np.ptp(truth) == 0:
        return IDENTITY
    slope, intercept = np.polyfit(truth, np.asarray(predicted, dtype=np.float64), 1)
    return (float(slope), float(intercept)) if slope >= MIN_SLOPE else IDENTITY


def corrected_ages(ages: np.ndarray, line: tuple[float, float]) -> np.ndarray:
    """The classes' ``ages`` read back through the bias ``line``; no age below 0."""
    slope, intercept = line
    return np.maximum((np.asarray(ages, dtype=np.float64) - intercept) / slope, 0.0)
