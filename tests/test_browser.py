"""End to end in a real browser: headless Debian Chromium (driven by Playwright, no browser download) against
`streamlit run` on localhost. Screenshots go to tests/artifacts/ (or $E2E_ARTIFACTS)."""
from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from core import metrics
from core.audit.interventions import CORNER_CHECK
from core.data import PROJECT_ROOT
from core.predictor import Predictor
from core.runs import DEFAULT_RUN, read_acquisition_summary, read_metrics, read_predictions
from tests.helpers import ARTIFACTS, DashboardServer, corner_dependence

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PAGES = {"": "Predict", "threshold": "Threshold explorer", "browse": "Case browser", "audit": "Error audit",
         "training": "Training report", "data": "Data & split"}
CHROME_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app_url(dashboard: DashboardServer) -> str:
    return dashboard.url


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).is_file():
        message = f"Chromium not found at {CHROMIUM} (Debian package `chromium`; .ci/run installs it)"
        if os.environ.get("REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_url: str) -> Iterator:
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    tab = context.new_page()
    tab.set_default_timeout(60_000)
    yield tab
    context.close()


def settle(tab) -> None:
    """Wait until the script run the last interaction started has finished (Streamlit's running indicator)."""
    tab.wait_for_timeout(300)
    tab.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')", timeout=90_000)


def open_page(tab, app_url: str, path: str) -> None:
    tab.goto(f"{app_url}/{path}")
    tab.get_by_role("heading", name=PAGES[path], level=1).wait_for()
    settle(tab)


def no_exceptions(tab) -> None:
    exceptions = tab.locator("[data-testid=stException]")
    assert exceptions.count() == 0, exceptions.all_inner_texts()


def shot(tab, name: str) -> None:
    """The page as shown, and a copy with every photo masked: those may go in the README (the HAM10000 images are
    licensed and never copied into the repository)."""
    tab.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    tab.screenshot(path=str(ARTIFACTS / "masked" / f"{name}.png"), mask=[tab.locator("[data-testid=stImage]")],
                   mask_color="#d9d9d9")


def charts_drawn(tab) -> None:
    """Wait until every Vega-Lite chart on the page has drawn: a screenshot taken sooner shows empty boxes."""
    charts = tab.locator("[data-testid=stVegaLiteChart]")
    for i in range(charts.count()):
        charts.nth(i).locator("canvas, svg").first.wait_for(timeout=15_000)


def test_every_page_opens(page, app_url: str) -> None:
    for path in PAGES:
        open_page(page, app_url, path)
        no_exceptions(page)
        charts_drawn(page)
        shot(page, f"page_{path or 'predict'}")


def test_upload_shows_probability_and_overlay(page, app_url: str, ham_dir: Path) -> None:
    image = ham_dir / "images" / "ISIC_0024306.jpg"
    open_page(page, app_url, "")
    page.locator("input[type=file]").set_input_files(str(image))
    metric = page.locator("[data-testid=stMetricValue]")
    metric.first.wait_for()
    expected = Predictor.load(DEFAULT_RUN).predict(image, corner_check=True)
    assert metric.first.inner_text() == f"{expected.probability:.3f}"
    # The corner check beside it: p with the corners covered and with a vignette, in that order.
    assert metric.all_inner_texts()[1:] == [f"{expected.corner_probabilities[name]:.3f}" for name in CORNER_CHECK]
    page.get_by_text("gradcam of the").wait_for()
    assert page.locator("[data-testid=stMain] [data-testid=stImage] img").count() >= 2  # photo + CAM overlay
    no_exceptions(page)
    shot(page, "predict_upload")


def test_a_non_dermoscopic_upload_is_withheld_and_a_lesion_gets_similar_cases(page, app_url: str, ham_dir: Path,
                                                                            tmp_path: Path) -> None:
    from skimage import data

    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(photo)
    open_page(page, app_url, "")
    page.locator("input[type=file]").set_input_files([str(photo), str(ham_dir / "images" / "ISIC_0024306.jpg")])
    page.get_by_text("This image is unlike the training data").wait_for()
    page.get_by_text("withheld (image unlike the training data)").wait_for()
    page.get_by_text("Most similar training cases").first.wait_for()
    expected = Predictor.load(DEFAULT_RUN).predict(ham_dir / "images" / "ISIC_0024306.jpg")
    first = expected.similar.iloc[0]
    page.get_by_text(f"d={first['distance']:.3f}").first.wait_for()
    settle(page)
    no_exceptions(page)
    shot(page, "predict_ood")


def _cell(tab, name: str) -> int:
    """A confusion-matrix count as drawn by Vega in the browser (text like ``TP 248``)."""
    text = tab.locator("svg text", has_text=re.compile(rf"^{name} \d+$")).first.text_content()
    return int(text.split()[1])


def test_dragging_the_threshold_moves_the_confusion_matrix(page, app_url: str) -> None:
    open_page(page, app_url, "threshold")
    frame = read_predictions(DEFAULT_RUN, "test")
    youden = read_metrics(DEFAULT_RUN).thresholds["youden"]
    before = metrics.binary_metrics(frame["label"], frame["probability"], youden)
    assert (_cell(page, "TP"), _cell(page, "FN")) == (before["tp"], before["fn"])

    slider = page.locator(".vega-bind input[type=range]")
    slider.scroll_into_view_if_needed()
    settle(page)
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * youden, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.55, y, steps=5)
    during = _cell(page, "TP")  # redrawn in the browser while the button is still down
    page.mouse.move(box["x"] + box["width"] * 0.75, y, steps=5)
    page.mouse.up()
    value = float(slider.input_value())
    after = metrics.binary_metrics(frame["label"], frame["probability"], value)
    assert value > 0.6 and during < before["tp"]
    assert [_cell(page, c) for c in ("TP", "FP", "FN", "TN")] == [after[k] for k in ("tp", "fp", "fn", "tn")]
    # The rest of the app follows: the sidebar's shared threshold comes to the chart's value.
    page.locator("[data-testid=stSidebar] [data-testid=stSliderThumbValue]", has_text=f"{value:.3f}").wait_for()
    no_exceptions(page)
    shot(page, "threshold_dragged")


def test_filtering_the_browser(page, app_url: str) -> None:
    open_page(page, app_url, "browse")
    frame = read_predictions(DEFAULT_RUN, "test")
    youden = read_metrics(DEFAULT_RUN).thresholds["youden"]
    false_negatives = (metrics.outcomes(frame["label"], frame["probability"], youden) == "FN").sum()
    page.get_by_text(f"{len(frame):,} of {len(frame):,} images match").wait_for()
    page.locator("[data-testid=stMain] button", has_text=re.compile(r"^FN$")).click()
    page.get_by_text(f"{false_negatives} of {len(frame):,} images match").wait_for()
    settle(page)
    page.locator("[data-testid=stButton] button", has_text="Open").first.click()
    page.get_by_text("as the model sees it").wait_for()
    no_exceptions(page)
    shot(page, "browse_filtered")


def test_the_browser_filters_decisions_that_depend_on_the_corners(page, app_url: str) -> None:
    youden = read_metrics(DEFAULT_RUN).thresholds["youden"]
    frame = corner_dependence(youden)
    open_page(page, app_url, "browse")
    page.locator("[data-testid=stMain] button", has_text=re.compile(r"^depends on corners$")).click()
    page.get_by_text(f"{frame['dependent'].sum():,} of {len(frame):,} images match").wait_for()
    settle(page)
    assert page.get_by_text("⚠ corners").count() > 0
    no_exceptions(page)


def test_the_audit_shows_the_stress_test(page, app_url: str) -> None:
    youden = read_metrics(DEFAULT_RUN).thresholds["youden"]
    frame = corner_dependence(youden)
    open_page(page, app_url, "audit")
    heading = page.get_by_role("heading", name="Artifact stress test")
    heading.scroll_into_view_if_needed()
    page.get_by_text(f"{frame['dependent'].sum():,} of {len(frame):,} decisions").wait_for()
    flips = ((frame["p_corner_fill"] >= youden) != (frame["probability"] >= youden)).sum()
    page.get_by_text(f"{flips:,} decisions flip at {youden:.3f} with corner_fill").wait_for()
    page.get_by_text("with corner_fill (p = ").first.wait_for()  # the first flipped case, painted and explained
    settle(page)
    no_exceptions(page)
    page.get_by_text("Decisions an artifact changes").scroll_into_view_if_needed()
    shot(page, "audit_stress")


def test_the_audit_shows_the_acquisition_stress_test(page, app_url: str) -> None:
    """The camera section in a real browser: its verdict, the chart against the floor, and the worst edit's changed
    decisions, each photo as taken beside it re-taken."""
    summary = read_acquisition_summary(DEFAULT_RUN, "test")
    open_page(page, app_url, "audit")
    heading = page.get_by_role("heading", name="Acquisition stress test: would another camera change the decision?")
    heading.scroll_into_view_if_needed()
    page.get_by_text(f"{summary.decisions.changed_by_a_camera_edit:.1%} of the decisions change").wait_for()
    page.locator("svg text", has_text="Flip rate of each acquisition edit against its neutral-edit floor").wait_for()
    page.get_by_text("re-taken: ").first.wait_for()
    settle(page)
    no_exceptions(page)
    heading.scroll_into_view_if_needed()
    shot(page, "audit_acquisition")
    page.get_by_text("Flip rate by the image's own source").scroll_into_view_if_needed()
    shot(page, "audit_acquisition_cases")


def choose(tab, label: str, option: str) -> None:
    """Pick ``option`` in the sidebar's select box called ``label``."""
    tab.locator("[data-testid=stSidebar] [data-testid=stSelectbox]", has_text=label).click()
    tab.get_by_role("option", name=option).click()
    settle(tab)


def test_an_evaluated_external_set_is_chosen_in_the_sidebar_and_shows_its_roc(page, app_url: str,
                                                                                external_run: Path) -> None:
    """`train.py evaluate --data … --images …` ran on a copy of the shipped run (the fixture); in the browser the
    run and then its set are chosen in the sidebar, and the Threshold explorer draws the set's ROC and confusion
    matrix, with the set's shift verdict."""
    run_label = f"runs/{external_run.name}"
    for _ in range(30):  # the server looks for new runs every 10 s
        open_page(page, app_url, "threshold")
        page.locator("[data-testid=stSidebar] [data-testid=stSelectbox]", has_text="Run").click()
        if page.get_by_role("option", name=run_label).count():
            break
        page.keyboard.press("Escape")
        time.sleep(1)
    page.get_by_role("option", name=run_label).click()
    settle(page)
    choose(page, "Data set", "clinic_x (external, 48 images)")
    page.get_by_text("On the clinic_x (external, 48 images)").wait_for()
    page.get_by_text("Shift check against val").wait_for()
    page.locator("svg text", has_text=re.compile(r"^ROC$")).first.wait_for()
    frame = read_predictions(external_run, "external_clinic_x")
    youden = read_metrics(external_run).thresholds["youden"]
    expected = metrics.binary_metrics(frame["label"], frame["probability"], youden)
    wanted = [expected[k] for k in ("tp", "fp", "fn", "tn")]
    for _ in range(40):  # the caption changes first; under load Vega redraws the matrix a moment later
        if [_cell(page, c) for c in ("TP", "FP", "FN", "TN")] == wanted:
            break
        time.sleep(0.25)
    assert [_cell(page, c) for c in ("TP", "FP", "FN", "TN")] == wanted
    assert sum(wanted) == 48
    no_exceptions(page)
    shot(page, "threshold_external_set")


def _files_changed_since(root: Path, since: float, skip: tuple[str, ...]) -> list[Path]:
    changed = []
    for path in root.rglob("*"):
        if any(part in skip for part in path.relative_to(root).parts):
            continue
        try:
            if path.is_file() and path.stat().st_mtime >= since:
                changed.append(path)
        except OSError:
            continue
    return changed


def test_uploads_stay_in_memory_and_in_their_session(browser, app_url: str, dashboard: DashboardServer,
                                                     ham_dir: Path, tmp_path: Path) -> None:
    """An upload is never written to disk and never shown to another session."""
    image = tmp_path / "private_photo.jpg"
    image.write_bytes((ham_dir / "images" / "ISIC_0024306.jpg").read_bytes())
    started = time.time()
    alice = browser.new_context(viewport={"width": 1500, "height": 1100})
    bob = browser.new_context(viewport={"width": 1500, "height": 1100})
    try:
        a, b = alice.new_page(), bob.new_page()
        for tab in (a, b):
            tab.set_default_timeout(60_000)
            open_page(tab, app_url, "")
        a.locator("input[type=file]").set_input_files(str(image))
        a.locator("[data-testid=stMetricValue]").first.wait_for()
        assert a.get_by_text("private_photo.jpg").count() >= 1
        b.reload()
        open_page(b, app_url, "")
        assert b.locator("[data-testid=stMetricValue]").count() == 0
        assert b.get_by_text("private_photo.jpg").count() == 0
    finally:
        alice.close()
        bob.close()
    skip = (".git", ".venv", "artifacts", "__pycache__", ".pytest_cache", ".hypothesis")
    assert not _files_changed_since(dashboard.tmp, started, ())
    assert not _files_changed_since(PROJECT_ROOT, started, skip)


def test_uploads_over_the_cap_are_refused_by_the_uploader(page, app_url: str, tmp_path: Path) -> None:
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG" + bytes(26 * 2**20))
    open_page(page, app_url, "")
    page.locator("input[type=file]").set_input_files(str(big))
    page.get_by_text(re.compile(r"File must be 25(\.0)? ?MB or smaller")).wait_for()
    assert page.locator("[data-testid=stMetricValue]").count() == 0
    no_exceptions(page)
