"""A site's own operating point: the threshold chosen on a labelled sample of one clinic's images.

A model that ranks another clinic's lesions well can still put all of their probabilities below the threshold chosen
on our val split (another camera, another compression). The remedy clinics use is to validate on their own cases:
here, a threshold chosen from the *malignant* cases of a labelled sample so that sensitivity reaches a target.

Every rule takes the k-th lowest malignant score as the threshold (positive iff p ≥ threshold), with k set by the
number of malignant cases n₁ alone. For exchangeable cases the miss rate of that threshold on the site's future
malignant cases is then Beta(k, n₁ + 1 − k) distributed (an order statistic of a uniform sample), whatever the
model: that gives the expected sensitivity and its 95 % interval for every rule, and each rule's guarantee.

* ``sample``: the largest threshold with sensitivity ≥ target *on the sample* (k = ⌊n₁ (1 − target)⌋ + 1). The
  baseline; its expected sensitivity on new cases is below the target (1 − k / (n₁ + 1)), by more on small samples.
* ``conformal``: split-conformal control of the miss rate (k = ⌊(n₁ + 1)(1 − target)⌋; Vovk et al. 2005, Angelopoulos
  & Bates 2021): the expected sensitivity on new cases is ≥ target. Needs ⌈1 / (1 − target)⌉ − 1 malignant cases.
* ``pac``: the largest k for which the sensitivity is ≥ target with probability ≥ ``confidence`` over the draw of
  the sample (P(Binomial(n₁, 1 − target) ≤ k − 1) ≤ 1 − confidence; a one-sided tolerance bound). Safer, and it
  pays in specificity; it needs more malignant cases (19 for 0.85 at 95 %).

The benign cases do not take part in the choice, so the specificity at the chosen threshold is estimated on them
without bias (exact Clopper–Pearson interval). ``benchmarks/site_rule.py`` measures all three by simulation.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from core import metrics, runs
from core.embedding import sha256
from core.run_files import ModelFingerprint, OperatingPoint, SampleSource, SiteProfile

RULES = ("sample", "conformal", "pac")
DEFAULT_RULE = "conformal"
DEFAULT_TARGET = 0.85
DEFAULT_CONFIDENCE = 0.95


class SiteError(ValueError):
    """A site sample that cannot give an operating point; the message says what is missing."""


def order_statistic(n_malignant: int, target: float, rule: str = DEFAULT_RULE,
                    confidence: float = DEFAULT_CONFIDENCE) -> int:
    """k: the threshold is the k-th lowest malignant score (0: the sample is too small for the rule)."""
    if not 0 < target < 1:
        raise SiteError(f"the target sensitivity must lie strictly between 0 and 1, got {target}")
    miss = 1 - target
    if rule == "sample":
        return math.floor(n_malignant * miss + 1e-9) + 1 if n_malignant else 0
    if rule == "conformal":
        return math.floor((n_malignant + 1) * miss + 1e-9)
    if rule == "pac":
        if not 0 < confidence < 1:
            raise SiteError(f"the confidence must lie strictly between 0 and 1, got {confidence}")
        # P(Bin(n₁, miss) ≤ k − 1) rises with k: k is how many of k − 1 = 0, 1, … stay ≤ 1 − confidence.
        cdf = stats.binom.cdf(np.arange(n_malignant), n_malignant, miss)
        return int(np.searchsorted(cdf, 1 - confidence, side="right"))
    raise SiteError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")


def malignant_needed(target: float, rule: str = DEFAULT_RULE, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """The fewest labelled malignant cases with which ``rule`` can choose a threshold for ``target``: k ≥ 1 needs
    n₁ ≥ 1 (sample), (n₁ + 1)(1 − target) ≥ 1 (conformal), target^n₁ ≤ 1 − confidence (pac)."""
    order_statistic(1, target, rule, confidence)  # refuses a bad rule, target or confidence
    if rule == "sample":
        return 1
    if rule == "conformal":
        return max(1, math.ceil(1 / (1 - target) - 1e-9) - 1)
    return max(1, math.ceil(math.log(1 - confidence) / math.log(target) - 1e-9))


def sensitivity_distribution(n_malignant: int, k: int) -> stats.rv_continuous:
    """The sensitivity of the k-th lowest of n₁ malignant scores on new malignant cases: 1 − Beta(k, n₁ + 1 − k)."""
    return stats.beta(n_malignant + 1 - k, k)


def guarantee(rule: str, target: float, confidence: float) -> str:
    return {"sample": f"sensitivity ≥ {target:g} on the sample itself; none on new cases",
            "conformal": f"expected sensitivity on new cases ≥ {target:g} (split-conformal, exchangeable cases)",
            "pac": f"sensitivity on new cases ≥ {target:g} with probability ≥ {confidence:g} over the sample"}[rule]


def choose_operating_point(labels: np.ndarray, probabilities: np.ndarray, target: float = DEFAULT_TARGET,
                           rule: str = DEFAULT_RULE, confidence: float = DEFAULT_CONFIDENCE) -> OperatingPoint:
    """The threshold for one site's labelled sample and what it is expected to give there (sensitivity from the
    order statistic's law, specificity from the benign cases with an exact interval)."""
    labels, probabilities = np.asarray(labels).astype(int), np.asarray(probabilities, dtype=float)
    malignant, benign = np.sort(probabilities[labels == 1]), probabilities[labels == 0]
    needed = malignant_needed(target, rule, confidence)
    if len(malignant) == 0:
        raise SiteError(f"the sample has no malignant case: a sensitivity of {target:g} with rule '{rule}' needs at "
                        f"least {needed} labelled malignant cases from the site")
    if len(benign) == 0:
        raise SiteError("the sample has no benign case, so the specificity at the site's threshold cannot be "
                        "estimated: add benign cases from the same site")
    k = order_statistic(len(malignant), target, rule, confidence)
    if k == 0:
        raise SiteError(f"the sample has {len(malignant)} malignant case(s); a sensitivity of {target:g} with rule "
                        f"'{rule}' needs at least {needed}")
    threshold = float(malignant[k - 1])
    sensitivity = sensitivity_distribution(len(malignant), k)
    true_negatives = int((benign < threshold).sum())
    return OperatingPoint(
        threshold=threshold, rule=rule, target_sensitivity=target,
        confidence=confidence if rule == "pac" else None, guarantee=guarantee(rule, target, confidence),
        k=k, n=int(len(labels)), n_malignant=int(len(malignant)), n_benign=int(len(benign)),
        malignant_needed=needed,
        expected_sensitivity=float(sensitivity.mean()),
        sensitivity_ci=(float(sensitivity.ppf(0.025)), float(sensitivity.ppf(0.975))),
        expected_specificity=true_negatives / len(benign),
        specificity_ci=metrics.exact_interval(true_negatives, len(benign)),
        sample_sensitivity=float((malignant >= threshold).mean()),
    )


def model_fingerprint(run_dir: str | Path) -> ModelFingerprint:
    """What a site threshold is a threshold *of*: the weights and the calibration that map them to p."""
    return ModelFingerprint(weights=sha256(Path(run_dir) / runs.MODEL_FILE),
                            calibration=tuple(float(v) for v in runs.read_config(run_dir).calibration))


def make_profile(run_dir: str | Path, name: str, frame: pd.DataFrame, source: SampleSource,
                 target: float = DEFAULT_TARGET, rule: str = DEFAULT_RULE, confidence: float = DEFAULT_CONFIDENCE,
                 sample_date: str | None = None) -> SiteProfile:
    """A site profile from a labelled sample's predictions (``label``, ``probability``); ``source`` says where the
    sample came from (labels CSV and images, or the evaluated set)."""
    runs.check_name(name, "site")
    point = choose_operating_point(frame["label"].to_numpy(), frame["probability"].to_numpy(), target, rule,
                                   confidence)
    today = time.strftime("%Y-%m-%d")
    return SiteProfile(name=name, point=point, sample_date=sample_date or today, created=today, source=source,
                       model=model_fingerprint(run_dir))


def load_profile(run_dir: str | Path, name: str) -> SiteProfile:
    """A site profile of this run, refused (RunError) when the run's weights or calibration changed since: its
    threshold would then be a threshold of another model."""
    profile = runs.read_site_profile(run_dir, name)
    if profile.model != model_fingerprint(run_dir):
        raise runs.RunError(f"site profile '{name}' was made for other weights or another calibration of "
                            f"{run_dir}; make it again with `python train.py site --run {run_dir} --name {name} "
                            "--overwrite …`")
    return profile


def usable_profiles(run_dir: str | Path) -> dict[str, SiteProfile]:
    """The run's site profiles that belong to its current weights and calibration."""
    fingerprint = model_fingerprint(run_dir) if (Path(run_dir) / runs.MODEL_FILE).is_file() else None
    return {name: profile for name, profile in runs.site_profiles(run_dir).items() if profile.model == fingerprint}
