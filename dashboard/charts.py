"""Altair figures shared by the pages.

The threshold explorer is one Vega-Lite spec: its slider is a point selection bound to a range input, and every
threshold-dependent number (operating points, confusion matrix, rates, the histogram's rule) is a Vega transform of
the per-case probabilities. Dragging therefore redraws in the browser with no server round trip; Streamlit only
hears the selection when it changes (to move the rest of the app). Rules match ``core.metrics``: positive iff
``probability >= threshold``.
"""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from core.data import DX_NAMES
from core.run_files import AcquisitionSection, Calibration
from dashboard import labels

THRESHOLD_PARAM = "threshold_pick"
CLASS_COLOURS = alt.Scale(domain=["benign", "malignant"], range=["#4c78a8", "#e45756"])
_POSITIVE = f"datum.probability >= {THRESHOLD_PARAM}.threshold"


def threshold_selection(value: float) -> alt.Parameter:
    return alt.selection_point(name=THRESHOLD_PARAM, fields=["threshold"], value=[{"threshold": value}],
                               bind=alt.binding_range(min=0.0, max=1.0, step=0.001, name="threshold "))


def _counts(base: alt.Chart) -> alt.Chart:
    """One row: tp, fp, fn, tn at the selected threshold."""
    return base.transform_calculate(
        pos=f"{_POSITIVE} ? 1 : 0",
    ).transform_calculate(
        tp="datum.pos * datum.label", fp="datum.pos * (1 - datum.label)",
        fn="(1 - datum.pos) * datum.label", tn="(1 - datum.pos) * (1 - datum.label)",
    ).transform_aggregate(tp="sum(tp)", fp="sum(fp)", fn="sum(fn)", tn="sum(tn)")


def _rates(base: alt.Chart) -> alt.Chart:
    return _counts(base).transform_calculate(
        sensitivity="datum.tp + datum.fn > 0 ? datum.tp / (datum.tp + datum.fn) : NaN",
        specificity="datum.tn + datum.fp > 0 ? datum.tn / (datum.tn + datum.fp) : NaN",
        ppv="datum.tp + datum.fp > 0 ? datum.tp / (datum.tp + datum.fp) : NaN",
        npv="datum.tn + datum.fn > 0 ? datum.tn / (datum.tn + datum.fn) : NaN",
    ).transform_calculate(
        fpr="1 - datum.specificity",
        balanced_accuracy="(datum.sensitivity + datum.specificity) / 2",
        f1="2 * datum.tp + datum.fp + datum.fn > 0 ? 2 * datum.tp / (2 * datum.tp + datum.fp + datum.fn) : NaN",
    )


def confusion_matrix_chart(base: alt.Chart) -> alt.Chart:
    cells = _counts(base).transform_fold(["tp", "fp", "fn", "tn"], as_=["cell", "count"]).transform_calculate(
        actual="datum.cell == 'tp' || datum.cell == 'fn' ? 'malignant' : 'benign'",
        predicted="datum.cell == 'tp' || datum.cell == 'fp' ? 'malignant' : 'benign'",
        caption="upper(datum.cell) + ' ' + datum.count",
    )
    axes = {"x": alt.X("predicted:N", sort=["malignant", "benign"], title="predicted"),
            "y": alt.Y("actual:N", sort=["malignant", "benign"], title="actual")}
    rect = cells.mark_rect().encode(**axes, color=alt.Color("count:Q", scale=alt.Scale(scheme="blues"), legend=None))
    text = cells.mark_text(fontSize=16, fontWeight="bold").encode(
        **axes, text="caption:N",
        color=alt.condition("datum.count > 600", alt.value("white"), alt.value("black")))
    return (rect + text).properties(width=220, height=220, title="Confusion matrix")


def rates_chart(base: alt.Chart) -> alt.Chart:
    names = ["sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "f1"]
    human = "".join(f"datum.metric == '{name}' ? '{labels.label(name)}' : " for name in names) + "datum.metric"
    rows = _rates(base).transform_fold(names, as_=["metric", "value"]).transform_calculate(
        label=f"({human}) + ': ' + (isValid(datum.value) && isFinite(datum.value) ? format(datum.value, '.3f') : '—')")
    return rows.mark_text(align="left", fontSize=14).encode(
        y=alt.Y("metric:N", sort=names, axis=None), text="label:N", x=alt.value(0),
    ).properties(width=200, height=220, title="At this threshold")


def roc_chart(frame: pd.DataFrame, base: alt.Chart) -> alt.Chart:
    fpr, tpr, _ = roc_curve(frame["label"], frame["probability"])
    curve = alt.Chart(pd.DataFrame({"fpr": fpr, "tpr": tpr})).mark_line(interpolate="step-after").encode(
        x=alt.X("fpr:Q", title="1 − specificity"), y=alt.Y("tpr:Q", title="sensitivity"))
    diagonal = alt.Chart(pd.DataFrame({"fpr": [0, 1], "tpr": [0, 1]})).mark_line(
        strokeDash=[4, 4], color="gray").encode(x="fpr:Q", y="tpr:Q")
    point = _rates(base).mark_point(size=160, filled=True, color="#e45756").encode(
        x="fpr:Q", y="sensitivity:Q",
        tooltip=[alt.Tooltip("sensitivity:Q", format=".3f"), alt.Tooltip("specificity:Q", format=".3f")])
    return (diagonal + curve + point).properties(width=260, height=260, title="ROC")


def pr_chart(frame: pd.DataFrame, base: alt.Chart) -> alt.Chart:
    precision, recall, _ = precision_recall_curve(frame["label"], frame["probability"])
    curve = alt.Chart(pd.DataFrame({"recall": recall, "precision": precision})).mark_line(
        interpolate="step-before").encode(x=alt.X("recall:Q", title="sensitivity (recall)"),
                                          y=alt.Y("precision:Q", title="PPV (precision)",
                                                  scale=alt.Scale(domain=[0, 1])))
    prevalence = float(frame["label"].mean())
    floor = alt.Chart(pd.DataFrame({"p": [prevalence]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="p:Q")
    point = _rates(base).mark_point(size=160, filled=True, color="#e45756").encode(
        x="sensitivity:Q", y="ppv:Q", tooltip=[alt.Tooltip("ppv:Q", format=".3f")])
    return (floor + curve + point).properties(width=260, height=260, title="Precision–recall")


def histogram_chart(base: alt.Chart) -> alt.Chart:
    bars = base.mark_bar(opacity=0.6, binSpacing=0).encode(
        x=alt.X("probability:Q", bin=alt.Bin(extent=[0, 1], step=0.025), title="P(malignant)"),
        y=alt.Y("count():Q", stack=None, title="images"),
        color=alt.Color("class:N", scale=CLASS_COLOURS, title="true class", legend=alt.Legend(orient="top")))
    rule = base.transform_aggregate(n="count()").transform_calculate(
        t=f"{THRESHOLD_PARAM}.threshold").mark_rule(color="black", strokeWidth=2).encode(x="t:Q")
    return (bars + rule).properties(width=560, height=200, title="Scores per true class")


def threshold_explorer(frame: pd.DataFrame, value: float) -> alt.VConcatChart:
    """All threshold-dependent figures for one split, driven by one in-chart slider that starts at ``value``."""
    data = frame[["image_id", "label", "probability"]].assign(
        **{"class": np.where(frame["label"] == 1, "malignant", "benign")})
    selection = threshold_selection(value)
    base = alt.Chart(data)
    top = alt.hconcat(roc_chart(data, base), pr_chart(data, base), confusion_matrix_chart(base).add_params(selection))
    return alt.vconcat(top, alt.hconcat(histogram_chart(base), rates_chart(base))).resolve_scale(color="independent")


def calibration_chart(calibration: Calibration) -> alt.LayerChart:
    table = pd.DataFrame({"mean predicted": calibration.mean_predicted,
                          "fraction malignant": calibration.fraction_positive, "images": calibration.count})
    ideal = alt.Chart(pd.DataFrame({"x": [0, 1]})).mark_line(strokeDash=[4, 4], color="gray").encode(
        x="x:Q", y="x:Q")
    curve = alt.Chart(table).mark_line(point=True).encode(
        x=alt.X("mean predicted:Q", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("fraction malignant:Q", scale=alt.Scale(domain=[0, 1])),
        tooltip=[alt.Tooltip("mean predicted:Q", format=".3f"), alt.Tooltip("fraction malignant:Q", format=".3f"),
                 "images:Q"])
    return (ideal + curve).properties(height=280, title=f"Reliability (ECE {calibration.ece:.3f})")


def history_charts(lineage: pd.DataFrame) -> alt.HConcatChart:
    """Loss and val AUROC per epoch over every stage the weights went through (``core.runs.read_lineage``), one
    colour a stage in the order they ran: whole epochs on the x axis (padded, so one epoch is not a lone dot at an
    edge), three decimals on the y axes, the legend below the plot where it is never clipped."""
    stages = list(dict.fromkeys(lineage["stage"]))
    colour = alt.Color("stage:N", title="stage", sort=stages, scale=alt.Scale(domain=stages),
                       legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=400))
    first, last = int(lineage["epoch"].min()), int(lineage["epoch"].max())
    epoch = alt.X("epoch:Q", title="epoch (all stages)" if len(stages) > 1 else "epoch",
                  scale=alt.Scale(domain=[first - 0.5, last + 0.5], nice=False),
                  axis=alt.Axis(format="d", tickMinStep=1, values=list(range(first, last + 1))))
    where = [alt.Tooltip("stage:N"), alt.Tooltip("stage_epoch:Q", title="epoch of the stage")]
    losses = lineage.melt(id_vars=["epoch", "stage", "stage_epoch"], value_vars=["train_loss", "val_loss"],
                          var_name="loss", value_name="value").dropna(subset=["value"])
    losses["loss"] = losses["loss"].map({"train_loss": "train", "val_loss": "val"})
    loss = alt.Chart(losses).mark_line(point=True).encode(
        x=epoch, y=alt.Y("value:Q", title="focal loss", axis=alt.Axis(format=".3f"), scale=alt.Scale(zero=False)),
        color=colour, detail="loss:N",
        strokeDash=alt.StrokeDash("loss:N", sort=["train", "val"], legend=None),
        tooltip=[*where, "loss", alt.Tooltip("value:Q", format=".4f")])
    final = lineage[lineage["stage"] == stages[-1]]["val_auroc"].dropna()
    auroc = alt.Chart(lineage).mark_line(point=True).encode(
        x=epoch, y=alt.Y("val_auroc:Q", title="val AUROC", scale=alt.Scale(zero=False), axis=alt.Axis(format=".3f")),
        color=colour, tooltip=[*where, alt.Tooltip("val_auroc:Q", format=".4f"), alt.Tooltip("note:N")])
    through = alt.Chart(lineage).mark_line(color="lightgray").encode(x=epoch, y="val_auroc:Q")  # stage to stage
    if final.empty:  # e.g. a val split with one class: no AUROC, so no best epoch to mark
        return alt.hconcat(loss.properties(width=380, title="Loss (solid: train, dashed: val)"),
                           (through + auroc).properties(width=380, title="Validation AUROC"))
    best = int(lineage.loc[final.idxmax(), "epoch"])
    marker = alt.Chart(pd.DataFrame({"epoch": [best]})).mark_rule(strokeDash=[4, 4]).encode(x="epoch:Q")
    title = f"Validation AUROC (the weights kept: epoch {best})"
    return alt.hconcat(loss.properties(width=380, title="Loss (solid: train, dashed: val)"),
                       (through + auroc + marker).properties(width=380, title=title))


def rate_bars(table: pd.DataFrame, group: str, title: str, flag: str = "flag") -> alt.Chart:
    """Share of flagged images (the boolean column ``flag``) per ``group`` value, with counts in the tooltip."""
    rates = table.groupby(group, observed=True)[flag].agg(["mean", "sum", "count"]).reset_index()
    rates.columns = [group, "flag rate", "flagged", "images"]
    return alt.Chart(rates).mark_bar().encode(
        x=alt.X(f"{group}:N", title=None), y=alt.Y("flag rate:Q", axis=alt.Axis(format="%")),
        tooltip=[group, alt.Tooltip("flag rate:Q", format=".1%"), "flagged", "images"],
    ).properties(height=240, title=title)


def score_by_group_chart(table: pd.DataFrame, score: str, group: str, threshold: float) -> alt.LayerChart:
    """Overlaid histograms of ``score`` per ``group`` (share of each group per bin), the threshold as a rule."""
    bars = alt.Chart(table[[score, group]]).transform_joinaggregate(total="count()", groupby=[group]).transform_bin(
        "bin", score, bin=alt.Bin(maxbins=40)).transform_aggregate(
        images="count()", total="max(total)", groupby=["bin", group]).transform_calculate(
        share="datum.images / datum.total").mark_bar(opacity=0.55).encode(
        x=alt.X("bin:Q", title=score.replace("_", " ")), y=alt.Y("share:Q", stack=None, axis=alt.Axis(format="%")),
        color=alt.Color(f"{group}:N"), tooltip=[group, alt.Tooltip("share:Q", format=".1%"), "images:Q"])
    rule = alt.Chart(pd.DataFrame({"x": [threshold]})).mark_rule(strokeDash=[4, 4], color="red").encode(x="x:Q")
    return (bars + rule).properties(height=240, title=f"{score.replace('_', ' ')} by {group}")


def corner_vs_dark_chart(table: pd.DataFrame, corner_threshold: float = 0.5) -> alt.LayerChart:
    points = alt.Chart(table).mark_circle(opacity=0.6).encode(
        x=alt.X("dark_corner_score:Q", title="dark-corner score (vignetting)"),
        y=alt.Y("corner_fraction:Q", title="CAM share in the corners"),
        color=alt.Color("outcome:N"), tooltip=["image_id", "dx", "outcome",
                                                alt.Tooltip("probability:Q", format=".3f"),
                                                alt.Tooltip("corner_fraction:Q", format=".3f"),
                                                alt.Tooltip("dark_corner_score:Q", format=".3f")])
    rule = alt.Chart(pd.DataFrame({"y": [corner_threshold]})).mark_rule(strokeDash=[4, 4], color="red").encode(
        y="y:Q")
    return (points + rule).properties(height=300, title="Corner attention vs dark corners")


def subgroup_chart(subgroups: pd.DataFrame) -> alt.Chart:
    shown = subgroups.dropna(subset=["auroc"]).assign(
        label=lambda f: f["group"] + ": " + f["value"].map(lambda v: DX_NAMES.get(v, v)))
    return alt.Chart(shown).mark_bar().encode(
        y=alt.Y("label:N", sort=None, title=None), x=alt.X("auroc:Q", scale=alt.Scale(domain=[0.5, 1]),
                                                          title="AUROC"),
        color=alt.Color("group:N", legend=None), tooltip=["group", "value", "n", "n_malignant",
                                                          alt.Tooltip("auroc:Q", format=".3f")],
    ).properties(height=max(160, 18 * len(shown)), title="AUROC by subgroup (test; groups ≥ 20 images)")


def delta_p_chart(stress: pd.DataFrame, step: float = 0.05) -> alt.Chart:
    """How far each intervention moves P(malignant): the share of images per Δp bin, one line per intervention.
    Binned here, so the spec holds a few hundred points rather than every image × intervention."""
    edges = np.arange(-1, 1 + step / 2, step)
    rows = []
    for name, part in stress.groupby("intervention", sort=False):
        counts, _ = np.histogram(part["delta_p"].clip(-1, 1), bins=edges)
        rows += [{"intervention": name, "delta_p": (low + high) / 2, "share": count / len(part)}
                 for low, high, count in zip(edges[:-1], edges[1:], counts)]
    return alt.Chart(pd.DataFrame(rows)).mark_line(point=True, interpolate="step-after").encode(
        x=alt.X("delta_p:Q", title="Δp = p(with artifact) − p(clean)", scale=alt.Scale(domain=[-1, 1])),
        y=alt.Y("share:Q", title="share of images", axis=alt.Axis(format="%"), scale=alt.Scale(type="sqrt")),
        color=alt.Color("intervention:N"), tooltip=["intervention", alt.Tooltip("delta_p:Q", format="+.3f"),
                                                    alt.Tooltip("share:Q", format=".1%")],
    ).properties(height=300, title="Δp per intervention (test split; square-root scale)")


def p_by_dx_source_chart(frame: pd.DataFrame) -> alt.Chart:
    """P(malignant) by true diagnosis, one box per source side by side: the same diagnosis scored apart by source
    is case mix or the camera (issue #31), and which of the two only an intervention can tell."""
    data = frame[["dx", "source", "probability"]].dropna(subset=["dx"])
    return alt.Chart(data).mark_boxplot(size=12, outliers={"size": 6}).encode(
        x=alt.X("dx:N", title="true diagnosis"), xOffset="source:N",
        y=alt.Y("probability:Q", title="P(malignant)", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("source:N", legend=alt.Legend(orient="top")),
        tooltip=["dx:N", "source:N", alt.Tooltip("median(probability):Q", format=".3f")],
    ).properties(height=260, title="P(malignant) by diagnosis and source")


def floor_chart(summary: AcquisitionSection) -> alt.LayerChart:
    """Each acquisition edit's flip rate with its exact 95 % interval, neutral edits in grey; on each camera edit's
    row a tick at its floor (the neutral flips on the images it was scored on) and one at the limit, 1.5 × that."""
    factor = summary.holds.factor
    floors = {name: float("nan") if row.floor is None else row.floor for name, row in summary.edits.items()}
    rows = pd.DataFrame([{"edit": name, "kind": row.kind, "what": row.what, "flipped": row.flipped,
                          "low": row.flipped_ci[0], "high": row.flipped_ci[1], "images": row.n,
                          "floor": floors[name], "limit": factor * floors[name]}
                         for name, row in summary.edits.items()])
    order = list(rows["edit"])
    base = alt.Chart(rows).encode(y=alt.Y("edit:N", sort=order, title=None,
                                          axis=alt.Axis(labelOverlap=False, labelLimit=180)))
    bars = base.mark_bar().encode(
        x=alt.X("flipped:Q", title="decisions flipped at the val threshold", axis=alt.Axis(format="%")),
        color=alt.Color("kind:N", scale=alt.Scale(domain=["neutral", "camera"], range=["#9e9e9e", "#1f77b4"]),
                        title="edit"),
        tooltip=["edit", "what", alt.Tooltip("flipped:Q", format=".1%"), alt.Tooltip("low:Q", format=".1%"),
                 alt.Tooltip("high:Q", format=".1%"), "images"])
    whiskers = base.mark_rule(color="black").encode(x="low:Q", x2="high:Q")
    marks = rows.melt(id_vars=["edit"], value_vars=["floor", "limit"], var_name="mark", value_name="x").dropna()
    marks["mark"] = marks["mark"].map({"floor": "floor (neutral flips, same images)",
                                       "limit": f"limit ({factor:g} × floor)"})
    ticks = alt.Chart(marks).mark_tick(thickness=2, size=18).encode(
        x="x:Q", y=alt.Y("edit:N", sort=order),
        color=alt.Color("mark:N", scale=alt.Scale(range=["#555555", "#d62728"]), title=None),
        tooltip=["edit", "mark", alt.Tooltip("x:Q", format=".1%")])
    return alt.layer(bars, whiskers, ticks).resolve_scale(color="independent").properties(
        height=24 * len(rows) + 40, title="Flip rate of each acquisition edit against its neutral-edit floor")
