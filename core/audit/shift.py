"""Is a set of images, *as a whole*, unlike the data the run's thresholds were chosen on (its val split)?

One image far from the training data is the OOD guard's business; a whole clinic whose images all sit a little
apart is this check's. The verdict rests on the two distances the guard already measures for every image, each
compared with val's by a one-sided Mann–Whitney U test ("are this set's images farther from the training images
than val's are?"):

* ``ood_score``: the distance of the penultimate features to the 10th nearest training image;
* ``style_score``: the same for the style statistics of earlier stages (colour, texture, sharpness: the camera).

A distance to the training data does not depend on which class an image is, so a set with another malignant
share (a referral clinic, a melanoma-enriched test set) is not called shifted for that; measured on draws from
the test split (``benchmarks/shift_check.py``). The set is *shifted* when the smaller p-value, Bonferroni-adjusted,
is below ``alpha`` (default 0.01: one false alarm in a hundred sets drawn like val).

Two more tests are reported beside the verdict, not in it, because the case mix moves them as much as a camera
does (sets of 50 of our own test images, half of them malignant, are called different by each 70 % of the time;
``benchmarks/shift_check.py``):
the distribution of P(malignant) (Kolmogorov–Smirnov; Rabanser et al., "Failing loudly", NeurIPS 2019) and of the
penultimate features (maximum mean discrepancy, Gaussian kernel at the median distance, permutation p-value).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from core import runs
from core.run_files import CaseMixTest, DistanceTest, ShiftReport

DEFAULT_ALPHA = 0.01
MIN_IMAGES = 20
PERMUTATIONS = 1000
MAX_MMD_IMAGES = 1500  # per side: the kernel matrix is (n + m)²


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int = PERMUTATIONS, seed: int = 0) -> tuple[float, float]:
    """Biased MMD² between samples ``x`` and ``y`` (Gaussian kernel, bandwidth the median squared distance), and
    its permutation p-value; all permutations in one matrix product."""
    rng = np.random.default_rng(seed)
    x = x[rng.permutation(len(x))[:MAX_MMD_IMAGES]]
    y = y[rng.permutation(len(y))[:MAX_MMD_IMAGES]]
    z = torch.from_numpy(np.concatenate([x, y]).astype(np.float64))
    squared = torch.cdist(z, z).pow(2)
    bandwidth = squared[~torch.eye(len(z), dtype=torch.bool)].median().clamp_min(1e-12)
    kernel = torch.exp(-squared / bandwidth)
    n, m = len(x), len(y)
    first = torch.zeros(permutations + 1, len(z), dtype=torch.float64)
    first[0, :n] = 1  # row 0: the observed split; the others: random relabellings
    for row in range(1, permutations + 1):
        first[row, torch.from_numpy(rng.permutation(len(z))[:n])] = 1
    second = 1 - first
    to_first = first @ kernel                 # (P + 1, N): each image's kernel sum over the first sample
    to_second = kernel.sum(0) - to_first      # … and over the second
    within_x = (to_first * first).sum(1) / n ** 2
    within_y = (to_second * second).sum(1) / m ** 2
    across = (to_first * second).sum(1) / (n * m)
    mmd2 = (within_x + within_y - 2 * across).numpy()
    p_value = (1 + np.count_nonzero(mmd2[1:] >= mmd2[0])) / (1 + permutations)
    return float(mmd2[0]), float(p_value)


def _farther(scores: np.ndarray, reference: np.ndarray, threshold: float, what: str) -> DistanceTest:
    u = stats.mannwhitneyu(scores, reference, alternative="greater")
    return DistanceTest(test=f"Mann–Whitney U, one-sided: {what} farther from the training images than val's",
                        statistic=float(u.statistic / (len(scores) * len(reference))), p_value=float(u.pvalue),
                        median=float(np.median(scores)), median_reference=float(np.median(reference)),
                        share_flagged=float(np.mean(scores > threshold)),
                        share_flagged_reference=float(np.mean(reference > threshold)))


def compare(scores: pd.DataFrame, reference: pd.DataFrame, thresholds: dict[str, float],
            probabilities: np.ndarray | None = None, reference_probabilities: np.ndarray | None = None,
            features: np.ndarray | None = None, reference_features: np.ndarray | None = None,
            alpha: float = DEFAULT_ALPHA) -> ShiftReport:
    """The shift verdict for a set against its reference (val). ``scores`` and ``reference`` hold ``ood_score``
    and (where the guard has a style index) ``style_score`` per image, ``thresholds`` the guard's flag threshold
    for each; the probabilities and features, where given, are compared for the case-mix report."""
    if len(scores) < MIN_IMAGES:
        raise ValueError(f"a set-level shift check needs at least {MIN_IMAGES} images, got {len(scores)}; "
                         "single images are checked by the OOD guard (`train.py predict`)")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    what = {"ood_score": "its features", "style_score": "its style statistics"}
    tests = {name: _farther(scores[name].to_numpy(), reference[name].to_numpy(), thresholds[name], what[name])
             for name in what if name in scores and name in reference and scores[name].notna().all()}
    p_value = min(1.0, len(tests) * min(test.p_value for test in tests.values()))
    case_mix: dict[str, CaseMixTest] = {}
    if probabilities is not None and reference_probabilities is not None:
        ks = stats.ks_2samp(probabilities, reference_probabilities)
        case_mix["probability"] = CaseMixTest(test="Kolmogorov–Smirnov", statistic=float(ks.statistic),
                                              p_value=float(ks.pvalue), median=float(np.median(probabilities)),
                                              median_reference=float(np.median(reference_probabilities)))
    if features is not None and reference_features is not None:
        mmd2, p = mmd_test(features, reference_features)
        case_mix["features"] = CaseMixTest(test="MMD, Gaussian kernel, permutation", statistic=mmd2, p_value=p,
                                           permutations=PERMUTATIONS)
    return ShiftReport(shifted=bool(p_value < alpha), p_value=p_value, alpha=alpha, n=int(len(scores)),
                       n_reference=int(len(reference)), adjustment=f"Bonferroni over {len(tests)} tests",
                       tests=tests, case_mix=case_mix, date=time.strftime("%Y-%m-%d"))


def advice(report: ShiftReport, run: str) -> str:
    """What a user should do about a verdict, with the command."""
    if report.shifted:
        return ("This set is unlike the val split the run's thresholds were chosen on, so their sensitivity and "
                "specificity do not carry over to it. Choose a site threshold from labelled cases of this site: "
                f"`python train.py site --run {run} --name SITE --data LABELS.csv --images DIR`.")
    return (f"No evidence of a shift at a false-alarm rate of {report.alpha:g} (p = {report.p_value:.3g}). "
            "The run's val thresholds are the best guess here; only labelled cases of this site can confirm them.")


def require_index(guard, run_dir: str | Path) -> None:
    """The check compares distances to the training images: a run without an embedding index cannot be checked."""
    if guard is None:
        raise runs.RunError(f"the shift check compares distances to the training images, and {run_dir} has no "
                            f"embedding index: build it with `python train.py index --run {run_dir}`")


def against_val(run_dir: str | Path, probabilities: np.ndarray, features: list[np.ndarray], guard,
                alpha: float = DEFAULT_ALPHA) -> ShiftReport:
    """:func:`compare` of a predicted set (its probabilities and the two feature arrays ``predict_probabilities``
    gives) with the run's val split, through the run's OOD guard (``core.audit.ood.OODGuard``): val's stored OOD scores
    and probabilities, and the index's val features. Adds the advice."""
    require_index(guard, run_dir)
    reference = runs.read_ood_scores(run_dir, "val")
    thresholds = {"ood_score": guard.threshold, "style_score": getattr(guard, "style_threshold", np.nan)}
    report = compare(guard.assess(features), reference, thresholds, probabilities,
                     runs.read_predictions(run_dir, "val")["probability"].to_numpy(),
                     guard.index.points(features[0]) if guard.index.reference is not None else None,
                     guard.index.reference, alpha)
    return dataclasses.replace(report, advice=advice(report, str(run_dir)))
