"""The set-level shift check (``core.audit.shift``, ``train.py shift``): its false-alarm rate on draws from one
distribution, each test catching the shift it is for, and on the shipped model: a few hundred of our own test images are
not shifted, the same images re-photographed (colour, resampling, JPEG) are; bad folders are named."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import train
from core.audit import shift
from core.run_files import ShiftReport
from core.runs import DEFAULT_RUN, read_predictions, read_shift_report
from tests.helpers import run_main

IN_DISTRIBUTION = 150  # "a random few hundred images of our own test split"
THRESHOLDS = {"ood_score": 1.2, "style_score": 0.6}


def _draw(rng: np.random.Generator, n: int) -> dict:
    scores = pd.DataFrame({"ood_score": rng.normal(1, 0.1, n), "style_score": rng.normal(0.5, 0.05, n)})
    return {"scores": scores, "probabilities": rng.beta(1, 4, n), "features": rng.normal(0, 1, (n, 6))}


def _compare(sample: dict, reference: dict, alpha: float = shift.DEFAULT_ALPHA) -> ShiftReport:
    return shift.compare(sample["scores"], reference["scores"], THRESHOLDS, sample["probabilities"],
                         reference["probabilities"], sample["features"], reference["features"], alpha)


def test_false_alarms_stay_near_alpha_on_draws_from_one_distribution() -> None:
    rng = np.random.default_rng(0)
    reference = _draw(rng, 400)
    alarms = [_compare(_draw(rng, 60), reference, alpha=0.05).shifted for _ in range(80)]
    assert np.mean(alarms) <= 0.05 + 2 * (0.05 * 0.95 / 80) ** 0.5  # Bonferroni keeps it at or below alpha


@pytest.mark.parametrize("moved", ["ood_score", "style_score"])
def test_each_distance_catches_its_shift(moved: str) -> None:
    rng = np.random.default_rng(1)
    reference, sample = _draw(rng, 400), _draw(rng, 100)
    sample["scores"][moved] += {"ood_score": 0.06, "style_score": 0.03}[moved]
    report = _compare(sample, reference)
    assert report.shifted and report.tests[moved].p_value < 0.01 / 2
    assert report.p_value == pytest.approx(min(1.0, 2 * min(t.p_value for t in report.tests.values())))
    assert report.tests[moved].share_flagged >= report.tests[moved].share_flagged_reference


def test_another_case_mix_is_reported_but_is_not_a_shift() -> None:
    """Probabilities and features of another malignant share differ; the distances to training do not."""
    rng = np.random.default_rng(2)
    reference, sample = _draw(rng, 400), _draw(rng, 100)
    sample["probabilities"], sample["features"] = rng.beta(2, 2, 100), sample["features"] + 0.6
    report = _compare(sample, reference)
    assert not report.shifted
    assert report.case_mix["probability"].p_value < 0.01 and report.case_mix["features"].p_value < 0.01


def test_too_few_images_or_a_bad_alpha_are_refused() -> None:
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="at least 20 images"):
        _compare(_draw(rng, 5), _draw(rng, 100))
    with pytest.raises(ValueError, match="alpha"):
        _compare(_draw(rng, 30), _draw(rng, 100), alpha=1.5)


def test_the_permutation_p_value_is_exact_in_form() -> None:
    rng = np.random.default_rng(4)
    _, p = shift.mmd_test(rng.normal(size=(30, 3)), rng.normal(size=(40, 3)), permutations=199)
    assert 0 < p <= 1 and round(p * 200) == p * 200  # (1 + count) / (1 + permutations)


# ---------------------------------------------------------------- the shipped model, end to end

@pytest.fixture(scope="module")
def own_images(ham_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("own") / "images"
    folder.mkdir()
    test = read_predictions(DEFAULT_RUN, "test").sample(IN_DISTRIBUTION, random_state=3)
    for image_id in test["image_id"]:
        shutil.copy(ham_dir / "images" / f"{image_id}.jpg", folder)
    return folder


def rephotographed(source: Path, target: Path) -> Path:
    """The same lesions as another camera might give them: warmer, softer (resampled at half size) and JPEG at
    quality 60."""
    target.mkdir()
    for path in sorted(source.iterdir()):
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(float) * [1.12, 1.0, 0.85]
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        image.resize((image.width // 2, image.height // 2)).resize(image.size).save(target / path.name, quality=60)
    return target


def test_our_own_test_images_are_not_shifted_and_rephotographed_ones_are(own_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "shift.json"
    code, stdout, err = run_main(train.main, "shift", "--run", str(DEFAULT_RUN), "--images", str(own_images),
                                 "--out", str(out), "--device", "cpu")
    assert code == 0, err
    report = read_shift_report(out)
    assert report.shifted is False and report.p_value >= 0.01 and report.n == IN_DISTRIBUTION
    assert set(report.tests) == {"ood_score", "style_score"} and set(report.case_mix) == {"probability", "features"}
    assert "not shifted" in stdout and "No evidence of a shift" in str(report.advice)

    moved = rephotographed(own_images, tmp_path / "moved")
    code, stdout, err = run_main(train.main, "shift", "--run", str(DEFAULT_RUN), "--images", str(moved),
                                 "--out", str(out), "--device", "cpu")
    assert code == 0, err
    report = read_shift_report(out)
    assert report.shifted is True and report.p_value < 0.01
    assert "SHIFTED" in stdout and "train.py site" in str(report.advice)


def test_bad_folders_are_named(tmp_path: Path) -> None:
    code, _, err = run_main(train.main, "shift", "--run", str(DEFAULT_RUN), "--images", str(tmp_path / "nowhere"))
    assert code == 2 and "is not a folder" in err
    (tmp_path / "notes.txt").write_text("not an image")
    code, _, err = run_main(train.main, "shift", "--run", str(DEFAULT_RUN), "--images", str(tmp_path))
    assert code == 2 and "no images" in err
    for k in range(3):
        (tmp_path / f"broken_{k}.jpg").write_bytes(b"not a jpeg")
    code, _, err = run_main(train.main, "shift", "--run", str(DEFAULT_RUN), "--images", str(tmp_path))
    assert code == 2 and "skipped: " in err and "none of the 3 image files" in err
    for k in range(5):
        Image.new("RGB", (64, 48), (200, 150, 130)).save(tmp_path / f"flat_{k}.png")
    code, _, err = run_main(train.main, "shift", "--run", str(DEFAULT_RUN), "--images", str(tmp_path))
    assert code == 2 and "at least 20 images, got 5" in err
