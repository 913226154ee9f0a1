"""Every dashboard page in Streamlit's AppTest, against the shipped run: numbers agree with core.metrics, filters
count right, bad uploads give messages; plus the real server `make dashboard` starts."""
from __future__ import annotations

import io
import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from core import metrics, sites
from core.audit.acquisition import EDITS
from core.audit.interventions import CORNER_CHECK
from core.config import RunConfig
from core.data import PROJECT_ROOT
from core.predictor import Predictor
from core.run_files import dump
from core.runs import (
    DEFAULT_RUN,
    read_acquisition,
    read_acquisition_summary,
    read_external,
    read_lineage,
    read_metrics,
    read_ood_scores,
    read_predictions,
    read_site_profile,
    read_stress_summary,
    write_external,
)
from dashboard import charts, loaders
from tests.helpers import DashboardServer, corner_dependence

APP = str(PROJECT_ROOT / "dashboard" / "app.py")
PAGES = ["predict", "threshold", "browse", "audit", "training", "data"]
IMAGE_ID = "ISIC_0024306"


def open_page(page: str, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    if page != "predict":
        at.switch_page(str(PROJECT_ROOT / "pages" / f"{page}.py")).run()
    return at


def test_pages_render_without_errors(ham_dir: Path) -> None:
    """One AppTest walks every page, as a user switching pages would (the model and tables load once)."""
    at = open_page("predict")
    for page in PAGES:
        at.switch_page(str(PROJECT_ROOT / "pages" / f"{page}.py")).run()
        assert not at.exception, (page, at.exception)
        assert not at.error, (page, [e.value for e in at.error])
        assert any("not a medical device" in c.value for c in at.sidebar.caption)


def test_data_page_shows_the_split(ham_dir: Path) -> None:
    at = open_page("data")
    assert at.title[0].value == "Data & split"
    table = at.dataframe[0].value
    assert table.loc["all", "images"] == 10015 and set(table.index) == {"train", "val", "test", "all"}
    assert any(str(ham_dir) in c.value for c in at.caption)


def _png(mode: str, size: tuple[int, int] = (120, 90)) -> bytes:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    (rgb.convert(mode) if mode != "RGB" else rgb).save(buffer, format="PNG" if mode != "CMYK" else "JPEG")
    return buffer.getvalue()


def test_predict_shows_the_probability_of_an_uploaded_photo(ham_dir: Path) -> None:
    path = ham_dir / "images" / f"{IMAGE_ID}.jpg"
    at = open_page("predict")
    at.file_uploader[0].upload(path.name, path.read_bytes(), "image/jpeg")
    at.run()
    assert not at.exception and not at.error
    expected = Predictor.load(DEFAULT_RUN).predict(path, corner_check=True, threshold=at.session_state["threshold"])
    # P(malignant), then the corner check: with the corners covered, with a vignette added.
    assert [m.value for m in at.metric] == [f"{expected.probability:.3f}"] + [
        f"{expected.corner_probabilities[name]:.3f}" for name in CORNER_CHECK]
    assert any("benign" in m.value or "malignant" in m.value for m in at.markdown if "Decision at" in m.value)
    assert any("not a medical device" in w.value for w in at.warning)
    dependent = any("depends on the image corners" in w.value for w in at.warning)
    assert dependent == expected.corner_dependent


def test_predict_takes_several_photos_and_odd_modes(ham_dir: Path) -> None:
    """Grayscale, palette, RGBA and CMYK photos are converted, not refused: each gets its p, and (being noise, not
    dermoscopy) each is flagged as unlike the training data with its decision withheld."""
    uploads = [(f"photo_{mode}.{'jpg' if mode == 'CMYK' else 'png'}", _png(mode), "image/png")
               for mode in ("L", "P", "RGBA", "CMYK")]
    at = open_page("predict")
    at.file_uploader[0].set_value(uploads)
    at.run()
    assert not at.exception
    assert len(at.error) == 4 and all("unlike the training data" in e.value for e in at.error)
    assert len(at.metric) == 4 * 2 and all(0 <= float(m.value) <= 1 for m in at.metric)  # the corner check's
    greyed = [m.value for m in at.markdown if m.value.startswith("P(malignant) :gray[")]
    assert len(greyed) == 4 and all(0 <= float(v.split("[")[1].split(" ")[0]) <= 1 for v in greyed)


def test_predict_withholds_the_decision_on_a_non_dermoscopic_photo() -> None:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.coffee()).save(buffer, format="PNG")
    at = open_page("predict")
    at.file_uploader[0].upload("coffee.png", buffer.getvalue(), "image/png")
    at.run()
    assert not at.exception
    expected = Predictor.load(DEFAULT_RUN).predict(Image.fromarray(data.coffee()))
    assert expected.out_of_distribution
    guard = Predictor.load(DEFAULT_RUN).ood
    assert len(at.error) == 1
    # The warning names each distance that is too large, with its value.
    if expected.ood_score > guard.threshold:
        assert f"distance to the training images {expected.ood_score:.3f}" in at.error[0].value
    if expected.style_score > guard.style_threshold:
        assert f"style distance {expected.style_score:.3f}" in at.error[0].value
    assert any("**withheld**" in m.value for m in at.markdown if "Decision at" in m.value)
    assert any(f":gray[{expected.probability:.3f}" in m.value for m in at.markdown)
    assert not any(m.label == "P(malignant)" for m in at.metric)


def test_predict_shows_the_most_similar_training_cases(ham_dir: Path) -> None:
    path = ham_dir / "images" / f"{IMAGE_ID}.jpg"
    at = open_page("predict")
    at.file_uploader[0].upload(path.name, path.read_bytes(), "image/jpeg")
    at.run()
    expected = Predictor.load(DEFAULT_RUN).predict(path)
    assert not expected.out_of_distribution and not at.error
    assert any("Like the training data" in c.value for c in at.caption)
    strip = [c.value for c in at.caption if " · d=" in c.value]
    assert strip == [f"**{row.dx}** ({'malignant' if row.label else 'benign'}) · d={row.distance:.3f}"
                     for row in expected.similar.itertuples()]


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("notes.jpg", b"this is not an image", "cannot"),
    ("truncated.jpg", None, "trunc"),
    ("tiny.png", "tiny", "small"),
])
def test_predict_names_a_bad_upload(ham_dir: Path, name: str, content: bytes | str | None, reason: str) -> None:
    if content is None:
        content = (ham_dir / "images" / f"{IMAGE_ID}.jpg").read_bytes()[:1500]
    elif content == "tiny":
        content = _png("RGB", (1, 1))
    at = open_page("predict")
    at.file_uploader[0].upload(name, content, "image/png")
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and name in at.error[0].value and reason in at.error[0].value.lower()
    assert not at.metric


def _table_with(at: AppTest, column: str, skip: int = 0) -> pd.DataFrame:
    """The ``skip``-th table on the page that has ``column``."""
    return [d.value for d in at.dataframe if column in d.value.columns][skip]


def _confusion(at: AppTest) -> tuple[int, int, int, int]:
    table = next(d.value for d in at.dataframe if "predicted malignant" in d.value.columns)
    return (int(table.loc["actual malignant", "predicted malignant"]), int(table.loc["actual benign",
            "predicted malignant"]), int(table.loc["actual malignant", "predicted benign"]),
            int(table.loc["actual benign", "predicted benign"]))


def _expected(split: str, threshold: float) -> tuple[int, int, int, int]:
    frame = read_predictions(DEFAULT_RUN, split)
    at = metrics.binary_metrics(frame["label"], frame["probability"], threshold)
    return at["tp"], at["fp"], at["fn"], at["tn"]


def test_threshold_slider_moves_the_confusion_matrix() -> None:
    at = open_page("threshold")
    youden = read_metrics(DEFAULT_RUN).thresholds["youden"]
    assert at.sidebar.slider[0].value == pytest.approx(youden, abs=1e-4)
    assert _confusion(at) == _expected("test", youden)
    at.sidebar.slider[0].set_value(0.5).run()
    assert _confusion(at) == _expected("test", 0.5)
    assert _confusion(at) != _expected("test", youden)


def test_presets_and_the_val_split() -> None:
    at = open_page("threshold")
    sens95 = read_metrics(DEFAULT_RUN).thresholds["sens95"]
    at.button(key="preset-sens95").click().run()
    assert at.sidebar.slider[0].value == pytest.approx(sens95, abs=1e-4)
    tp, fp, fn, tn = _confusion(at)
    assert (tp, fp, fn, tn) == _expected("test", sens95)
    at.sidebar.selectbox(key="data_set").set_value("val").run()
    val = _expected("val", sens95)
    assert _confusion(at) == val and val[0] / (val[0] + val[2]) >= 0.95  # chosen on val for ≥ 95 % sensitivity


def test_threshold_is_shared_across_pages() -> None:
    at = open_page("threshold")
    at.button(key="preset-0.5").click().run()
    at.switch_page(str(PROJECT_ROOT / "pages" / "browse.py")).run()
    tp, fp, fn, tn = _expected("test", 0.5)
    assert f"TP {tp}, FP {fp}, FN {fn}, TN {tn}" in _match_line(at)


def _match_line(at: AppTest) -> str:
    return next(m.value for m in at.markdown if "images match" in m.value)


def test_browser_filters_count_right(ham_dir: Path) -> None:
    at = open_page("browse")
    frame = read_predictions(DEFAULT_RUN, "test")
    threshold = at.sidebar.slider[0].value
    outcome = metrics.outcomes(frame["label"], frame["probability"], threshold)
    assert _match_line(at).startswith(f"**{len(frame):,} of {len(frame):,}")
    assert len([b for b in at.button if b.label == "Open"]) == 24  # one page, never the whole split

    at.pills(key="f_outcome").set_value(["FN"]).run()
    assert _match_line(at).startswith(f"**{(outcome == 'FN').sum()} of")
    at.multiselect(key="f_dx").set_value(["mel"]).run()
    expected = ((outcome == "FN") & (frame["dx"] == "mel")).sum()
    assert _match_line(at).startswith(f"**{expected} of") and 0 < expected < (outcome == "FN").sum()
    at.multiselect(key="f_sex").set_value(["female"]).run()
    expected = ((outcome == "FN") & (frame["dx"] == "mel") & (frame["sex"] == "female")).sum()
    assert _match_line(at).startswith(f"**{expected} of")


def test_browser_probability_and_age_filters(ham_dir: Path) -> None:
    at = open_page("browse")
    frame = read_predictions(DEFAULT_RUN, "test")
    at.slider(key="f_prob").set_value((0.9, 1.0)).run()
    assert _match_line(at).startswith(f"**{frame['probability'].between(0.9, 1.0).sum()} of")
    at.slider(key="f_prob").set_value((0.0, 1.0))
    at.slider(key="f_age").set_value((60, 100))
    at.checkbox(key="f_age_unknown").uncheck().run()
    assert _match_line(at).startswith(f"**{frame['age'].between(60, 100).sum()} of")


def test_browser_opens_a_case_with_image_cam_and_mask(ham_dir: Path) -> None:
    at = open_page("browse")
    first = next(b for b in at.button if b.label == "Open")
    first.click().run()
    image_id = first.key.removeprefix("open-")
    assert not at.exception and not at.error
    assert any(image_id in s.value for s in at.subheader)
    captions = [caption for element in at.get("image") for caption in element.captions]
    assert "as the model sees it" in captions and any("Grad-CAM" in c for c in captions)
    assert any("lesion mask outline" in c for c in captions) or any("No lesion mask" in i.value for i in at.info)


def test_browser_without_images_says_how_to_point_at_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HAM10000_DIR", str(tmp_path / "nowhere"))
    at = open_page("browse")
    assert not at.exception
    assert any("HAM10000_DIR" in i.value and "nowhere" in i.value for i in at.info)
    assert len(at.dataframe[0].value) == 1500  # the table still works


def test_audit_ranks_mistakes_and_exports(ham_dir: Path) -> None:
    at = open_page("audit", threshold=0.5, chart_threshold=0.5)
    frame = read_predictions(DEFAULT_RUN, "test")
    outcome = metrics.outcomes(frame["label"], frame["probability"], 0.5)
    table = at.dataframe(key="audit_table").value
    assert len(table) == np.isin(outcome, ["FP", "FN"]).sum()
    assert table["how sure of the mistake"].is_monotonic_decreasing  # the columns carry human labels
    assert (table["how sure of the mistake"] >= 0.5).all()  # a mistake at 0.5 is at least half sure of itself
    at.multiselect(key="audit_kinds").set_value(["FN"]).run()
    assert len(at.dataframe(key="audit_table").value) == (outcome == "FN").sum()
    assert at.get("download_button")  # export of the current selection
    flagged = _table_with(at, "CAM share in corners", skip=1)
    assert len(flagged) == pd.read_csv(DEFAULT_RUN / "attention_test.csv")["flag"].sum()


def test_audit_shows_the_stress_test_and_paints_what_it_measured(ham_dir: Path) -> None:
    at = open_page("audit", threshold=0.3, chart_threshold=0.3)
    assert not at.exception and not at.error
    frame = corner_dependence(0.3)
    summary = read_stress_summary(DEFAULT_RUN, "test")
    assert any(f"{frame['dependent'].sum():,} of 1,500 decisions" in m.value for m in at.markdown)
    table = _table_with(at, "AUROC change (95 % CI)")
    assert list(table["intervention"]) == ["none (clean)", *summary.interventions]
    assert table.set_index("intervention").loc["corner_fill", "flipped"] == summary.interventions[
        "corner_fill"].flipped
    # The flipped cases at 0.3, largest |Δp| first; each is painted again now and must score what the test stored.
    flips = frame[(frame["p_corner_fill"] >= 0.3) != (frame["probability"] >= 0.3)]
    assert any(f"**{len(flips):,}** decisions flip at 0.300" in m.value for m in at.markdown)
    first = flips.loc[(flips["p_corner_fill"] - flips["probability"]).abs().idxmax()]
    captions = [c for image in at.get("image") for c in image.captions if c.startswith("with corner_fill")]
    assert captions[0] == f"with corner_fill (p = {first['p_corner_fill']:.3f})"
    # The audit table's corner-dependent filter.
    at.toggle(key="audit_corner").set_value(True).run()
    outcome = metrics.outcomes(frame["label"], frame["probability"], 0.3)
    assert len(at.dataframe(key="audit_table").value) == (np.isin(outcome, ["FP", "FN"]) & frame["dependent"]).sum()


def test_browser_filters_decisions_that_depend_on_the_corners(ham_dir: Path) -> None:
    at = open_page("browse", threshold=0.4, chart_threshold=0.4)
    at.pills(key="f_corners").set_value("depends on corners").run()
    frame = corner_dependence(0.4)
    assert _match_line(at).startswith(f"**{frame['dependent'].sum():,} of 1,500")
    at.pills(key="f_corners").set_value("does not").run()
    assert _match_line(at).startswith(f"**{(~frame['dependent']).sum():,} of 1,500")


def test_browser_and_audit_carry_the_distance_to_training(ham_dir: Path) -> None:
    scores = read_ood_scores(DEFAULT_RUN, "test")
    at = open_page("browse")
    at.pills(key="f_ood").set_value("unlike training").run()
    assert _match_line(at).startswith(f"**{scores['out_of_distribution'].sum():,} of 1,500")
    at = open_page("audit", threshold=0.5, chart_threshold=0.5)
    assert not at.exception
    assert "distance to training" in at.dataframe(key="audit_table").value.columns
    frame = read_predictions(DEFAULT_RUN, "test").merge(scores, on="image_id")
    wrong = np.isin(metrics.outcomes(frame["label"], frame["probability"], 0.5), ["FP", "FN"])
    rate = frame["out_of_distribution"][wrong].mean()
    assert any(f"{rate:.1%} of the mistakes" in m.value for m in at.markdown)


def test_training_report_shows_metrics_and_runs() -> None:
    at = open_page("training")
    table = _table_with(at, "AUROC (95 % CI)")
    assert len(table) == 6 and set(table["split"]) == {"val", "test"}
    runs = _table_with(at, "val AUROC")
    assert "default" in set(runs["run"])
    recipes = " ".join(m.value for m in at.markdown)  # what each shipped member's config says it was trained with
    for name in RunConfig.from_yaml(DEFAULT_RUN / "config.yaml").ensemble:
        member = RunConfig.from_yaml(DEFAULT_RUN / name / "config.yaml")
        assert f"**{member.model}**" in recipes
        assert ("corner mask" in recipes) >= (member.corner_mask is not None)
        assert (f"corner consistency λ {member.corner_consistency:g}" in recipes) == bool(member.corner_consistency)
        stages = list(dict.fromkeys(read_lineage(DEFAULT_RUN / name)["stage"]))
        assert len(stages) > 1 and " → ".join(f"`{s}`" for s in stages) in recipes  # the whole lineage, in order
    captions = " ".join(c.value for c in at.caption)
    assert "lite0_mask090_scratch" in captions and "not kept" in captions  # stages known from the log only


def test_history_chart_shows_every_stage_in_order() -> None:
    """One colour a stage over a shared epoch axis; the dashed marker at the epoch whose weights were kept (the
    last stage's best), not at an earlier stage's higher AUROC."""
    lineage = read_lineage(DEFAULT_RUN / "members" / "lite2_160_dx_cons15_long")
    spec = charts.history_charts(lineage).to_dict()
    layers = spec["hconcat"][1]["layer"]
    coloured = next(layer for layer in layers if "color" in layer["encoding"])
    assert coloured["encoding"]["color"]["scale"]["domain"] == list(dict.fromkeys(lineage["stage"]))
    assert coloured["encoding"]["x"]["axis"]["values"] == list(range(1, len(lineage) + 1))
    marker = next(layer for layer in layers if layer["mark"]["type"] == "rule")
    datasets = spec["datasets"]
    best = datasets[marker["data"]["name"]][0]["epoch"]
    assert best == len(lineage)  # the last stage's epoch 2 (0.9311) is its best


def test_a_broken_run_is_explained_on_every_page(tmp_path: Path) -> None:
    broken = tmp_path / "half_run"
    broken.mkdir()
    (broken / "config.yaml").write_text((DEFAULT_RUN / "config.yaml").read_text())
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")
    at = open_page("predict", run=broken)
    assert not at.exception and "Cannot load the model" in at.error[0].value
    for page in ("threshold", "browse", "audit"):
        at.switch_page(str(PROJECT_ROOT / "pages" / f"{page}.py")).run()
        assert not at.exception
        assert "predictions_" in at.error[0].value and "train.py evaluate" in at.error[0].value


def test_streamlit_server_serves_the_app(dashboard: DashboardServer) -> None:
    with urllib.request.urlopen(f"{dashboard.url}/_stcore/health", timeout=5) as response:
        assert response.read() == b"ok"
    with urllib.request.urlopen(f"{dashboard.url}/", timeout=5) as response:
        assert response.status == 200 and b"<html" in response.read().lower()


def _live_tensors() -> int:
    import gc
    import warnings

    import torch
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_repeated_explained_uploads_leak_no_hooks_or_tensors(ham_dir: Path) -> None:
    """20 uploads with Grad-CAM in one session: no hook is left on the shared model, no tensor outlives its call,
    and the session keeps only the current upload's result (counts, not resident memory: the allocator's RSS is
    too noisy to judge a leak by in a busy test process; the soak in benchmarks/RESULTS.md measures RSS)."""
    images = sorted((ham_dir / "images").glob("*.jpg"))[:20]
    at = open_page("predict")

    def upload(path: Path) -> None:
        at.file_uploader[0].set_value((path.name, path.read_bytes(), "image/jpeg"))
        at.run()
        # p (unless the image is flagged as unlike the training data: then it is greyed text), the corner check
        assert not at.exception and len(at.metric) == len(CORNER_CHECK) + (0 if at.error else 1)

    for path in images[:5]:  # warm-up: caches fill
        upload(path)
    before = _live_tensors()
    for path in images[5:]:
        upload(path)
    assert _live_tensors() <= before + 2, f"{_live_tensors() - before} more live tensors after 15 uploads"
    assert len(at.session_state["predict_results"]) == 1
    shared = loaders.predictor(DEFAULT_RUN)  # the process-wide cached model every session used
    hooks = [m for m in shared.model.modules() if m._forward_hooks or m._backward_hooks or m._forward_pre_hooks]
    assert not hooks, f"{len(hooks)} modules still carry hooks"


def test_run_argument_after_double_dash() -> None:
    """`make dashboard RUN=DIR` = `streamlit run dashboard/app.py -- --run DIR`: the script sees `--run DIR`."""
    from dashboard.state import run_argument
    assert run_argument(["--run", "runs/x"]) == Path("runs/x")
    assert run_argument(["--other", "1"]) is None


def test_run_lineage_follows_a_growing_history(tmp_path: Path) -> None:
    """The training report reads history.csv through a cache keyed on the file itself: a run still training shows
    its new epochs on the next rerun, after the stages it was fine-tuned from."""
    history = tmp_path / "history.csv"
    rows = "epoch,train_loss,val_loss,val_auroc,lr,img_per_s,seconds\n1,0.2,0.3,0.6,3e-4,40,100\n"
    history.write_text(rows)
    (tmp_path / "lineage.csv").write_text("stage,epoch,val_auroc,note\nbase,1,0.5,\nbase,2,0.55,\n")
    assert loaders.run_lineage(tmp_path)["stage"].tolist() == ["base", "base", tmp_path.name]
    history.write_text(rows + "2,0.1,0.2,0.7,2e-4,41,99\n")
    later = history.stat().st_mtime + 1
    os.utime(history, (later, later))
    lineage = loaders.run_lineage(tmp_path)
    assert lineage["epoch"].tolist() == [1, 2, 3, 4] and lineage["stage_epoch"].tolist() == [1, 2, 1, 2]


# ---------------------------------------------------------------- other clinics: external sets and site profiles

def open_external(external_run: Path, page: str, **state) -> AppTest:
    """A page of the external-set run with its evaluated set chosen in the sidebar."""
    at = open_page("predict", run=external_run, **state)
    at.sidebar.selectbox(key="data_set").set_value("external_clinic_x").run()
    if page != "predict":
        at.switch_page(str(PROJECT_ROOT / "pages" / f"{page}.py")).run()
    return at


def test_an_external_set_drives_the_explorer_browser_and_audit(external_run: Path) -> None:
    at = open_external(external_run, "threshold")
    assert not at.exception and not at.error
    assert "clinic_x (external, 48 images)" in at.sidebar.selectbox(key="data_set").format_func("external_clinic_x")
    frame = read_predictions(external_run, "external_clinic_x")
    threshold = at.session_state["threshold"]
    at_threshold = metrics.binary_metrics(frame["label"], frame["probability"], threshold)
    assert _confusion(at) == tuple(at_threshold[k] for k in ("tp", "fp", "fn", "tn"))
    assert any("Shift check against val" in box.value for box in [*at.success, *at.error])  # the set's verdict
    at.switch_page(str(PROJECT_ROOT / "pages" / "browse.py")).run()
    assert not at.exception and not at.error
    assert "48 of 48 images match" in _match_line(at) and "clinic_x" in _match_line(at)
    at.button(key=f"open-{frame['image_id'].iloc[0]}").click().run()
    captions = [caption for element in at.get("image") for caption in element.captions]
    assert not at.exception and "as the model sees it" in captions  # its photo, read from the set's folder
    assert any("Grad-CAM" in c for c in captions) and any("No lesion mask" in i.value for i in at.info)
    at.switch_page(str(PROJECT_ROOT / "pages" / "audit.py")).run()
    assert not at.exception and not at.error


def test_the_explorer_says_when_the_val_threshold_does_not_hold(external_run: Path) -> None:
    """A set whose probabilities collapse as on another clinic's images (the clinic_x predictions scaled by 0.05):
    the run's val threshold misses almost every melanoma there, and the page says so."""
    import dataclasses
    import shutil

    frame = read_predictions(external_run, "external_clinic_x")
    frame.assign(probability=frame["probability"] * 0.05).to_csv(
        external_run / "predictions_external_collapsed.csv", index=False)
    write_external(external_run, dataclasses.replace(read_external(external_run, "clinic_x"), name="collapsed"))
    try:
        at = open_page("threshold", run=external_run)
        at.sidebar.selectbox(key="data_set").set_value("external_collapsed").run()
        assert any("val threshold does not hold here" in w.value for w in at.warning), [w.value for w in at.warning]
        at.sidebar.selectbox(key="data_set").set_value("test").run()
        assert not any("does not hold" in w.value for w in at.warning)
    finally:
        for name in ("predictions_external_collapsed.csv", "metrics_external_collapsed.json"):
            (external_run / name).unlink()
        shutil.rmtree(external_run / "sites", ignore_errors=True)


def test_a_site_profile_made_on_the_explorer_is_used_by_predict(external_run: Path, ham_dir: Path) -> None:
    import shutil

    at = open_external(external_run, "threshold")
    try:
        at.text_input(key="site_name").set_value("../metrics")
        at.button[-1].click().run()  # the form's submit button
        assert any("not allowed" in e.value for e in at.error) and not (external_run / "sites").exists()
        at.text_input(key="site_name").set_value("clinic_x")
        at.selectbox(key="site_rule").set_value("pac")
        at.number_input(key="site_confidence").set_value(0.99)
        at.button[-1].click().run()  # pac at 99 % needs 29 malignant: the set has 24
        assert any("needs at least 29" in e.value for e in at.error) and not (external_run / "sites").exists()
        at.selectbox(key="site_rule").set_value("conformal")
        at.button[-1].click().run()
        assert not at.exception and any("Made and in use" in s.value for s in at.success)
        profile = read_site_profile(external_run, "clinic_x")
        frame = read_predictions(external_run, "external_clinic_x")
        expected = sites.choose_operating_point(frame["label"], frame["probability"], 0.85, "conformal")
        assert profile.point.threshold == pytest.approx(expected.threshold) and profile.source.set == "clinic_x"
        assert at.session_state["threshold"] == pytest.approx(profile.point.threshold)
        assert at.sidebar.selectbox(key="site").value == "clinic_x"
        at.switch_page(str(PROJECT_ROOT / "pages" / "predict.py")).run()
        caption = next(c.value for c in at.caption if "At the operating point of site" in c.value)
        low, high = profile.point.sensitivity_ci
        assert f"{profile.point.expected_sensitivity:.1%}" in caption and f"{low:.1%}–{high:.1%}" in caption
        at.sidebar.slider[0].set_value(0.5).run()  # moved away from the site's threshold: its rates no longer apply
        assert any("has moved from site clinic_x" in c.value for c in at.caption)
    finally:
        shutil.rmtree(external_run / "sites", ignore_errors=True)


def test_a_moved_image_folder_is_named_not_a_crash(external_run: Path, tmp_path: Path) -> None:
    import shutil

    images = Path(str(read_external(external_run, "clinic_x").images))
    moved = tmp_path / "moved"
    shutil.move(images, moved)
    try:
        at = open_external(external_run, "browse")
        assert not at.exception
        assert any(str(images) in i.value and "--name clinic_x" in i.value for i in at.info)
    finally:
        shutil.move(moved, images)


def test_a_set_evaluated_before_sets_recorded_their_folder_is_explained(external_run: Path) -> None:
    """`evaluate --data` wrote no image folder or model fingerprint before issue #30: such a set still opens, says
    how to evaluate it again, and is not used for a site profile (its probabilities may be another model's)."""
    frame = read_predictions(external_run, "external_clinic_x").drop(columns="file")
    frame.to_csv(external_run / "predictions_external_old.csv", index=False)
    report = dump(read_external(external_run, "clinic_x"))
    old = {key: report[key] for key in ("n", "auroc", "auroc_ci", "at_threshold")} | {"name": "old"}
    (external_run / "metrics_external_old.json").write_text(json.dumps(old))
    try:
        at = open_page("browse", run=external_run)
        at.sidebar.selectbox(key="data_set").set_value("external_old").run()
        assert not at.exception and any("evaluated before runs recorded" in i.value for i in at.info)
        at.switch_page(str(PROJECT_ROOT / "pages" / "threshold.py")).run()
        assert not at.exception and any("other weights or another calibration" in w.value for w in at.warning)
        at.button[-1].click().run()  # the profile form's submit
        assert any("evaluate the set again first" in e.value for e in at.error)
        assert not (external_run / "sites").exists()
    finally:
        for name in ("predictions_external_old.csv", "metrics_external_old.json"):
            (external_run / name).unlink()


def test_per_source_rows_and_the_source_filter(ham_dir: Path) -> None:
    """The explorer's per-source rows are core.metrics' at the current threshold; the browser's source filter
    counts the images of that source."""
    at = open_page("threshold")
    threshold = at.session_state["threshold"]
    frame = loaders.cases(DEFAULT_RUN, "test", ham_dir)
    expected = metrics.source_report(frame, {"t": threshold}, n_boot=10)["sources"]
    rows = next(d.value for d in at.dataframe if "source" in d.value.columns).set_index("source")
    assert set(rows.index) == set(expected) == {"rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"}
    for name, row in expected.items():
        assert rows.loc[name, "images"] == row["n"] and rows.loc[name, "AUROC"] == pytest.approx(row["auroc"])
        assert rows.loc[name, "sensitivity"] == pytest.approx(row["at_threshold"]["t"]["sensitivity"])
    assert any("Source-stratified AUROC" in m.value for m in at.markdown)
    at.switch_page(str(PROJECT_ROOT / "pages" / "browse.py")).run()
    at.multiselect(key="f_source").set_value(["vienna_dias"]).run()
    assert _match_line(at).startswith(f"**{expected['vienna_dias']['n']} of 1,500 images match**")


def test_audit_shows_the_acquisition_stress_test_and_retakes_what_it_measured(ham_dir: Path) -> None:
    at = open_page("audit", threshold=0.3, chart_threshold=0.3)
    assert not at.exception and not at.error
    summary = read_acquisition_summary(DEFAULT_RUN, "test")
    table = _table_with(at, "× floor")
    assert list(table["edit"]) == list(summary.edits)
    worst = summary.holds.worst
    assert worst is not None and table.set_index("edit").loc[worst, "flipped"] == summary.edits[worst].flipped
    assert any("of the split's 1,500 images" in m.value and f"{summary.floor.rate:.1%}" in m.value
               for m in at.markdown)
    # The decisions the worst edit flips at 0.3 (the sidebar's threshold, not the summary's), largest |Δp| first.
    stored = read_acquisition(DEFAULT_RUN, "test")
    part = stored[stored["intervention"] == worst]
    flips = part[(part["p"] >= 0.3) != (part["p_clean"] >= 0.3)]
    assert any(f"**{len(flips):,}** of the {len(part):,} sampled decisions flip at 0.300" in m.value
               for m in at.markdown)
    assert any(c.startswith("re-taken: ") for image in at.get("image") for c in image.captions)
    at.selectbox(key="acquisition_edit").set_value("jpeg_90").run()
    part = stored[stored["intervention"] == "jpeg_90"]
    flips = part[(part["p"] >= 0.3) != (part["p_clean"] >= 0.3)]
    assert any(f"**{len(flips):,}** of the {len(part):,} sampled decisions flip at 0.300 with `jpeg_90`" in m.value
               for m in at.markdown)


def test_the_retaken_view_scores_what_the_acquisition_test_stored(ham_dir: Path) -> None:
    """The dashboard re-takes an image the way ``train.py stress --suite acquisition`` did: the shipped Predictor
    gives that copy the stored p."""
    summary = read_acquisition_summary(DEFAULT_RUN, "test")
    stored = read_acquisition(DEFAULT_RUN, "test")
    predictor = Predictor(DEFAULT_RUN)
    size, crop = predictor.config.input_size, predictor.config.crop
    for name in ("jpeg_30", "colour_vidir_molemax"):
        row = stored[stored["intervention"] == name].iloc[0]
        view = loaders.acquired_view(str(ham_dir / "images" / f"{row['image_id']}.jpg"), name, row["source"],
                                     summary.source_colours, size, crop)
        p = predictor.predict_view(torch.from_numpy(view).permute(2, 0, 1)).probability
        assert p == pytest.approx(row["p"], abs=1e-4), name


def test_predict_camera_check_retakes_the_upload(ham_dir: Path) -> None:
    path = ham_dir / "images" / f"{IMAGE_ID}.jpg"
    at = open_page("predict")
    at.file_uploader[0].upload(path.name, path.read_bytes(), "image/jpeg")
    at.run()
    key = next(t.key for t in at.toggle if str(t.key).startswith("camera_"))
    assert not any("decision flips" in d.value.columns for d in at.dataframe)  # off until asked: a second of passes
    at.toggle(key=key).set_value(True).run()
    assert not at.exception and not at.error
    table = _table_with(at, "decision flips")
    assert list(table["edit"]) == list(EDITS)
    # The same photo saved by hand as a JPEG of quality 30 and predicted afresh gets the check's p.
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=30)
    expected = Predictor.load(DEFAULT_RUN).predict(buffer.getvalue()).probability
    assert table.set_index("edit").loc["jpeg_30", "P(malignant)"] == pytest.approx(expected, abs=1e-5)
    p = Predictor.load(DEFAULT_RUN).predict(path).probability
    threshold = at.session_state["threshold"]
    assert (table["decision flips"] == ((table["P(malignant)"] >= threshold) != (p >= threshold))).all()
