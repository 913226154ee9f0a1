"""The acquisition stress test on the Error audit: which decisions another camera would change, read against the
flips of edits that change nothing clinically (``train.py stress --suite acquisition``)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from core.audit.acquisition import EDITS
from core.data import DX_NAMES
from core.run_files import AcquisitionSection
from dashboard import charts, gallery, loaders, state

PER_PAGE = 4
CAMERA_KEY = "camera_checks"  # this session's camera checks, by upload


def edit_rows(summary: AcquisitionSection) -> pd.DataFrame:
    """One labelled row per edit: what it does, its flips with their interval, the multiple of the floor."""
    rows = []
    for name, row in summary.edits.items():
        low, high = row.flipped_ci
        change_low, change_high = row.auroc_change_ci
        rows.append({"edit": name, "kind": row.kind, "what it does": row.what, "images": row.n,
                     "flipped": row.flipped, "95 % CI": f"{low:.1%} – {high:.1%}",
                     # text: Streamlit draws a missing number as "None", whatever the Styler says
                     "× floor": "—" if row.times_floor is None else f"{row.times_floor:.2f}",
                     "benign → malignant": row.to_malignant,
                     "malignant → benign": row.to_benign, "mean Δp": row.mean_delta_p,
                     "AUROC change (95 % CI)": f"{row.auroc_change:+.3f} ({change_low:+.3f} to {change_high:+.3f})"})
    return pd.DataFrame(rows)


def by_source_rows(summary: AcquisitionSection) -> pd.DataFrame:
    """Flip rate of each edit among the images of each source (rows: edits; columns: the image's own source)."""
    return pd.DataFrame({name: row.flipped_by_source for name, row in summary.edits.items()}).T.rename_axis(
        "edit").reset_index()


def acquisition_section(run: Path, split: str, cases: pd.DataFrame, threshold: float,
                        view: tuple[int, str, float | None]) -> None:
    """The whole section: summary, table, chart, flips by source, and the changed decisions one edit at a time."""
    summary = loaders.acquisition_summary(run, split)
    st.header("Acquisition stress test: would another camera change the decision?")
    if summary is None:
        st.info(f"`{run}` has no acquisition stress test of the {split} split. Make it with "
                f"`python train.py stress --run {run} --split {split} --suite acquisition` (~6 min on 2 CPU cores).")
        return
    floor, holds, decided = summary.floor, summary.holds, summary.decisions
    verdict = ("**holds**: every camera edit stays within" if holds.passed else
               f"**does not hold**: {len(holds.failing)} of the camera edits flip more than")
    st.markdown(
        f"{summary.n:,} of the split's {summary.split_size:,} images (a random sample) were re-taken as "
        f"another camera would have: another JPEG quality, resolution, focus, white balance, tone curve, and each "
        f"other source's colours; the file's pixels are edited, then cropped and resized as usual. Edits that change "
        f"nothing a clinician would see ({', '.join(floor.edits)}) set the **floor**: {floor.rate:.1%} of the "
        f"decisions flip under the worst of them (a colour match, scored only on the other sources' images, is read "
        f"against the neutral flips on those). The model {verdict} {holds.factor:g} × its floor "
        f"({holds.limit:.1%} for the edits scored on every image). "
        f"**{decided.changed_by_a_camera_edit:.1%} of the decisions change under at least one of the camera "
        f"edits**, against {decided.changed_by_a_neutral_edit:.1%} under at least one neutral one"
        + (f" (per edit: {decided.mean_camera_edit:.1%} against {decided.mean_neutral_edit:.1%})"
           if decided.mean_camera_edit is not None else "")
        + f". Flips are read at the val Youden threshold ({summary.threshold_youden_val:.3f}).")
    rows = edit_rows(summary)
    st.dataframe(rows.style.format({"flipped": "{:.1%}", "benign → malignant": "{:.1%}", "malignant → benign": "{:.1%}",
                                    "mean Δp": "{:+.3f}"}),
                 hide_index=True, key="acquisition_table")
    left, right = st.columns([3, 2])
    left.altair_chart(charts.floor_chart(summary), width="stretch")
    by_source = by_source_rows(summary)
    if len(by_source.columns) > 1:
        right.markdown("**Flip rate by the image's own source**")
        right.dataframe(by_source.style.format("{:.1%}", subset=list(by_source.columns[1:]), na_rep="—"),
                        hide_index=True, key="acquisition_by_source")
        right.caption("A colour match is not scored on its own source's images (—).")
    changed_cases(run, split, cases, summary, threshold, view)


def changed_cases(run: Path, split: str, cases: pd.DataFrame, summary: AcquisitionSection, threshold: float,
                  view: tuple[int, str, float | None]) -> None:
    """The sampled decisions one edit flips at the sidebar's threshold, largest |Δp| first: as taken, and re-taken."""
    table = loaders.acquisition_table(run, split)
    if table is None:
        return
    st.subheader("Decisions a camera edit changes, largest |Δp| first")
    names = list(summary.edits)
    worst = summary.holds.worst
    name = st.selectbox("Edit", names, key="acquisition_edit", index=names.index(worst) if worst in names else 0,
                        format_func=lambda n: f"{n}: {summary.edits[n].what}")
    # Both p from the test's own table: its clean p came the same road as the edited one.
    part = table[table["intervention"] == name][["image_id", "p_clean", "p"]].rename(columns={"p": "p_edited"})
    changed = cases.merge(part, on="image_id", how="inner")
    changed = changed[(changed["p_edited"] >= threshold) != (changed["p_clean"] >= threshold)]
    changed = changed.reindex((changed["p_edited"] - changed["p_clean"]).abs().sort_values(ascending=False).index)
    st.markdown(f"**{len(changed):,}** of the {len(table[table['intervention'] == name]):,} sampled decisions flip at "
                f"{threshold:.3f} with `{name}`.")
    for _, row in gallery.page_of(changed, "acquisition_page", PER_PAGE).iterrows():
        with st.container(border=True):
            st.markdown(f"**{row['image_id']}** — {DX_NAMES.get(row['dx'], row['dx'])}"
                        + (f" · source `{row['source']}`" if isinstance(row.get("source"), str) else "")
                        + f" · P(malignant) {row['p_clean']:.3f} → **{row['p_edited']:.3f}** with `{name}`")
            if not isinstance(row.get("path"), str):
                st.info("Images not found, so only the numbers are shown. " + state.images_hint())
                continue
            source = row["source"] if isinstance(row.get("source"), str) else None
            columns = st.columns(2)
            columns[0].image(loaders.model_view(row["path"], *view), caption="as taken", width="stretch")
            columns[1].image(loaders.acquired_view(row["path"], name, source, summary.source_colours, *view),
                             caption=f"re-taken: {summary.edits[name].what}", width="stretch")


def camera_check(predictor, upload, probability: float, threshold: float, run: Path) -> None:
    """On Predict, behind a toggle: the upload re-taken with every acquisition edit that needs no source, each p and
    whether the decision at ``threshold`` would flip; the neutral edits say how much moves for nothing."""
    if not st.toggle("Camera check: would another camera change this decision?", key=f"camera_{upload.file_id}",
                     help="The photo re-taken as another JPEG quality, resolution, focus, white balance and tone "
                          f"curve would (core.audit.acquisition; {len(EDITS)} network passes, about a second)."):
        return
    checks = st.session_state.setdefault(CAMERA_KEY, {})
    key = (str(run), upload.file_id)  # another run's check is another model's numbers
    if key not in checks:
        checks[key] = predictor.camera_check(upload.getvalue())
    p = checks[key]
    decided = probability >= threshold
    rows = pd.DataFrame([{"edit": name, "kind": edit.kind, "what it does": edit.what, "P(malignant)": p[name],
                          "Δp": p[name] - probability, "decision flips": (p[name] >= threshold) != decided}
                         for name, edit in ((name, make()) for name, make in EDITS.items())])
    flipped = rows[rows["decision flips"] & (rows["kind"] == "camera")]["edit"].tolist()
    neutral = rows[rows["decision flips"] & (rows["kind"] == "neutral")]["edit"].tolist()
    if neutral:
        st.warning(f"Even edits that change nothing clinically flip it ({', '.join(neutral)}): the decision sits on "
                   "the threshold's edge.", icon=":material/photo_camera:")
    elif flipped:
        st.warning(f"Another camera could change this decision: it flips with {', '.join(flipped)}.",
                   icon=":material/photo_camera:")
    else:
        st.caption(f"The decision at {threshold:.3f} holds under every camera edit (largest |Δp| "
                   f"{rows['Δp'].abs().max():.3f}).")
    st.dataframe(rows.style.format({"P(malignant)": "{:.3f}", "Δp": "{:+.3f}"}), hide_index=True,
                 key=f"camera_table_{upload.file_id}")
