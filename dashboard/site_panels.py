"""What the pages say about other clinics: an external set's shift verdict, whether the run's val threshold holds on
it, the site operating point in use, and the form that makes a site profile from an evaluated set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from core import metrics, sites
from core.run_files import ExternalMetrics, SampleSource, SiteProfile
from core.runs import RunError, write_site_profile
from dashboard import loaders, state


def stale_warning(run: Path, report: ExternalMetrics) -> None:
    """Say so when an external set's stored predictions were made by other weights or another calibration."""
    if report.model != loaders.model_fingerprint(run):
        st.warning(f"The predictions of `{report.name}` were made by other weights or another calibration of this "
                   f"run (or before runs recorded which): evaluate the set again with `python train.py evaluate --run "
                   f"{run} --data LABELS.csv --images DIR --name {report.name}`.", icon=":material/history:")


def shift_verdict(report: ExternalMetrics) -> None:
    """The set-level shift check that `train.py evaluate --data` ran on an external set."""
    verdict = report.shift
    if verdict is None:
        st.info(f"No shift check for `{report.name}` (fewer than 20 images, a run without an embedding index, "
                "or evaluated before the check existed).")
        return
    tests = ", ".join(f"{name.replace('_', ' ')}: p = {test.p_value:.2g}, {test.share_flagged:.0%} flagged "
                      f"(val {test.share_flagged_reference:.0%})" for name, test in verdict.tests.items())
    text = (f"**Shift check against val** (are its images farther from the training images than val's?) — {tests}; "
            f"{verdict.adjustment}. {verdict.advice}")
    if verdict.shifted:
        st.error(text, icon=":material/warning:")
    else:
        st.success(text, icon=":material/check_circle:")


def sensitivity_interval(labels: np.ndarray, probs: np.ndarray, threshold: float) -> tuple[float, float, float, int]:
    """Sensitivity at ``threshold`` with its exact 95 % interval, and the number of malignant cases."""
    malignant = probs[labels == 1]
    hits = int((malignant >= threshold).sum())
    if len(malignant) == 0:
        return float("nan"), 0.0, 1.0, 0
    return hits / len(malignant), *metrics.exact_interval(hits, len(malignant)), len(malignant)


def val_threshold_check(run: Path, label: str, labels: np.ndarray, probs: np.ndarray, youden: float) -> None:
    """Say plainly when the run's val Youden threshold gives a sensitivity on this set that the test split's does
    not fall within (its 95 % interval on this set's malignant cases)."""
    try:
        test = loaders.cases(run, "test")
    except RunError:
        return  # nothing to compare with
    expected = metrics.binary_metrics(test["label"], test["probability"], youden)["sensitivity"]
    here, low, high, n = sensitivity_interval(labels, probs, youden)
    if n == 0:
        st.info(f"The {label} has no malignant case, so its sensitivity is undefined.")
        return
    if low <= expected <= high:
        st.caption(f"At the run's val threshold {youden:.3f} the sensitivity here is {here:.1%} (95 % interval "
                   f"{low:.1%}–{high:.1%}, {n} malignant), in line with the test split's {expected:.1%}.")
        return
    st.warning(f"**The run's val threshold does not hold here.** At {youden:.3f} the sensitivity on the {label} is "
               f"**{here:.1%}** (95 % interval {low:.1%}–{high:.1%}, {n} malignant cases) against **{expected:.1%}** "
               "on the test split. Decisions at that threshold would not mean here what they mean on the test "
               "split: choose a site operating point from this site's labelled cases.", icon=":material/warning:")


def profile_caption(profile: SiteProfile) -> str:
    """One site profile's threshold and what it is expected to give there, with intervals."""
    point = profile.point
    s_low, s_high = point.sensitivity_ci
    c_low, c_high = point.specificity_ci
    return (f"site **{profile.name}**, threshold **{point.threshold:.3f}** (rule *{point.rule}*: "
            f"{point.guarantee}; chosen on {point.n} labelled images, {point.n_malignant} malignant, "
            f"sampled {profile.sample_date}): expected sensitivity **{point.expected_sensitivity:.1%}** "
            f"(95 % interval {s_low:.1%}–{s_high:.1%}) and specificity **{point.expected_specificity:.1%}** "
            f"({c_low:.1%}–{c_high:.1%})")


def profile_form(run: Path, set_name: str, frame: pd.DataFrame) -> None:
    """Make a site profile from this evaluated external set's stored predictions (no model pass)."""
    st.header("Make a site operating point from this set")
    st.markdown("The threshold is chosen on this set's **malignant** cases so that sensitivity reaches the target; "
                "its benign cases estimate the specificity. Use a labelled sample of one site, not the cases you "
                "want to judge it on.")
    with st.form("site_profile"):
        columns = st.columns(4)
        columns[0].text_input("Site name", value=set_name, key="site_name")
        target = columns[1].number_input("Target sensitivity", 0.5, 0.99, sites.DEFAULT_TARGET, 0.01,
                                         key="site_target")
        rule = columns[2].selectbox("Rule", sites.RULES, index=sites.RULES.index(sites.DEFAULT_RULE),
                                    key="site_rule", help="sample: ≥ target on this sample only; conformal: "
                                    "expected sensitivity on new cases ≥ target; pac: ≥ target with probability "
                                    "'confidence' over the sample")
        confidence = columns[3].number_input("Confidence (pac)", 0.5, 0.99, sites.DEFAULT_CONFIDENCE, 0.01,
                                             key="site_confidence")
        st.checkbox("Replace a profile of the same name", key="site_overwrite")
        st.form_submit_button("Make site profile", on_click=make_profile, args=(run, set_name, frame))
    needed = sites.malignant_needed(target, rule, confidence)
    st.caption(f"Rule *{rule}* at {target:.2f} needs at least **{needed}** labelled malignant cases; this set has "
               f"{int(frame['label'].sum())}.")
    outcome = st.session_state.pop(MADE_KEY, None)
    if outcome is not None:
        kind, text = outcome
        (st.success if kind == "made" else st.error)(text)


MADE_KEY = "site_profile_outcome"


def make_profile(run: Path, set_name: str, frame: pd.DataFrame) -> None:
    """The form's callback (it runs before the page, so the shared threshold may still move): make, write and use
    the profile, or keep the reason it was refused for the page to show."""
    form = st.session_state
    report = loaders.external_sets(run)[set_name]
    if report.model != loaders.model_fingerprint(run):
        form[MADE_KEY] = ("refused", f"No site profile made: the predictions of `{set_name}` were made by other "
                                     f"weights or another calibration of `{run}`; evaluate the set again first.")
        return
    try:
        source = SampleSource(set=set_name, data=report.data, images=report.images)
        profile = sites.make_profile(run, form["site_name"].strip(), frame, source, form["site_target"],
                                     form["site_rule"], form["site_confidence"])
        write_site_profile(run, profile, form["site_overwrite"])
    except (sites.SiteError, RunError) as err:
        form[MADE_KEY] = ("refused", f"No site profile made: {err}")
        return
    state.select_site(profile.name)
    form[MADE_KEY] = ("made", "Made and in use: " + profile_caption(profile) + f". `train.py predict --site "
                      f"{profile.name}` and the Predict page use it.")
