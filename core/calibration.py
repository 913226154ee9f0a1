"""Platt scaling of P(malignant), fitted on validation (``train.py calibrate``).

Training draws 40 % malignant images (the balanced sampler) from a set that has ~19 %, uses a focal loss and, for
an ensemble, averages members: all three bend the probabilities away from observed frequencies, although the
ranking (AUROC) is fine. A logistic regression of the val labels on the model's log-odds, p = σ(a·z + b), undoes
the prior shift (b) and the over- or under-confidence (a) with two numbers, and changes no decision: thresholds
are re-chosen on the recalibrated val probabilities, so the same cases fall on each side.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression

IDENTITY = (1.0, 0.0)
EPS = 1e-6
MIN_PER_CLASS = 10  # below this, two fitted numbers are mostly noise


class CalibrationError(ValueError):
    """Platt scaling cannot be fitted on these labels and probabilities (the message says why)."""


def log_odds(probs: ArrayLike) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def fit_platt(labels: ArrayLike, probs: ArrayLike) -> tuple[float, float]:
    """``(a, b)`` maximising the likelihood of ``labels`` under σ(a·logit(probs) + b), unregularised.

    Refuses the sets where that maximum is meaningless rather than return a wild fit: fewer than
    ``MIN_PER_CLASS`` of either class, or probabilities that separate the classes perfectly (the likelihood then
    grows without bound as the slope does, so any finite answer is an artefact of the solver's stopping rule)."""
    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    if len(np.unique(y)) != 2:
        raise CalibrationError("calibration needs both classes among the labels")
    counts = np.bincount(y, minlength=2)
    if counts.min() < MIN_PER_CLASS:
        raise CalibrationError(f"calibration needs at least {MIN_PER_CLASS} images of each class, got {counts[1]} "
                               f"malignant and {counts[0]} benign: too few to fit a slope and an intercept")
    if p[y == 1].min() > p[y == 0].max():
        raise CalibrationError("the probabilities separate the classes perfectly (AUROC 1 on these labels): no finite "
                         "calibration exists; calibrate on a larger validation set")
    model = LogisticRegression(C=np.inf).fit(log_odds(p)[:, None], y)
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    if a <= 0:  # calibrating would reverse (or flatten) the model's ranking: refuse rather than hide that
        raise CalibrationError(f"calibration slope {a:.3f} ≤ 0: on these labels the model ranks no better than chance")
    return a, b


def apply_platt(probs: torch.Tensor, calibration: Sequence[float]) -> torch.Tensor:
    """σ(a·logit(p) + b); the identity (1, 0) returns ``probs`` untouched."""
    a, b = calibration
    if (a, b) == IDENTITY:
        return probs
    return torch.sigmoid(a * torch.logit(probs.double(), eps=EPS) + b).to(probs.dtype)
