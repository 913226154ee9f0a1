"""Platt scaling of P(malignant), fitted on validation (``train.py calibrate``).

Training draws 40 % malignant images (the balanced sampler) from a set that has ~19 %, uses a focal loss and, for
an ensemble, averages members: all three bend the probabilities away from observed frequencies, although the
ranking (AUROC) is fine. A logistic regression of the val labels on the model's log-odds, p = σ(a·z + b), undoes
the prior shift (b) and the over- or under-confidence (a) with two numbers, and changes no decision: thresholds
are re-chosen on the recalibrated val probabilities, so the same cases fall on each side.
"""
from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression

IDENTITY = (1.0, 0.0)
EPS = 1e-6


def log_odds(probs: ArrayLike) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def fit_platt(labels: ArrayLike, probs: ArrayLike) -> tuple[float, float]:
    """``(a, b)`` maximising the likelihood of ``labels`` under σ(a·logit(probs) + b), unregularised."""
    y = np.asarray(labels).astype(int)
    if len(np.unique(y)) != 2:
        raise ValueError("calibration needs both classes among the labels")
    model = LogisticRegression(C=np.inf).fit(log_odds(probs)[:, None], y)
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    if a <= 0:  # calibrating would reverse (or flatten) the model's ranking: refuse rather than hide that
        raise ValueError(f"calibration slope {a:.3f} ≤ 0: on these labels the model ranks no better than chance")
    return a, b


def apply_platt(probs: torch.Tensor, calibration: tuple[float, float]) -> torch.Tensor:
    """σ(a·logit(p) + b); the identity (1, 0) returns ``probs`` untouched."""
    a, b = calibration
    if (a, b) == IDENTITY:
        return probs
    return torch.sigmoid(a * torch.logit(probs.double(), eps=EPS) + b).to(probs.dtype)
