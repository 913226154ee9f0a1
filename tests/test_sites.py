"""Site operating points (``core.sites``): each rule's threshold is the order statistic it says, each keeps its stated
guarantee in simulation, the expected sensitivity and intervals are what the simulation gives, and samples too small
or one-sided are refused with the number of malignant cases the target needs; profiles are named safely, never
overwritten by accident, and refused once the run's weights or calibration change."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from core import runs, sites
from core.run_files import SampleSource
from core.sites import SiteError, choose_operating_point, malignant_needed, order_statistic

TARGET = 0.85


def test_how_many_malignant_cases_each_rule_needs() -> None:
    # conformal: ⌊(n + 1) · 0.15⌋ ≥ 1 from n = 6; pac at 95 %: 0.85ⁿ ≤ 0.05 from n = 19 (0.85¹⁸ = 0.054).
    assert malignant_needed(TARGET, "conformal") == 6 and order_statistic(5, TARGET, "conformal") == 0
    assert malignant_needed(TARGET, "pac", 0.95) == 19 and 0.85 ** 18 > 0.05 >= 0.85 ** 19
    assert malignant_needed(TARGET, "sample") == 1
    assert [order_statistic(20, TARGET, rule) for rule in sites.RULES] == [4, 3, 1]
    with pytest.raises(SiteError, match="unknown rule"):
        order_statistic(20, TARGET, "median")
    with pytest.raises(SiteError, match="strictly between 0 and 1"):
        order_statistic(20, 1.0)


@pytest.mark.parametrize("n_malignant", [8, 20, 50])
def test_each_rule_keeps_its_guarantee_in_simulation(n_malignant: int) -> None:
    """Malignant scores uniform on [0, 1]: a threshold t then has true sensitivity 1 − t, so 40,000 simulated
    samples give each rule's sensitivity on new cases exactly, without a model."""
    rng = np.random.default_rng(0)
    draws = np.sort(rng.random((40_000, n_malignant)), axis=1)
    for rule in sites.RULES:
        k = order_statistic(n_malignant, TARGET, rule)
        if k == 0:
            continue
        sensitivity = 1 - draws[:, k - 1]
        law = sites.sensitivity_distribution(n_malignant, k)
        assert sensitivity.mean() == pytest.approx(law.mean(), abs=0.003)  # the reported expectation
        assert np.quantile(sensitivity, 0.025) == pytest.approx(law.ppf(0.025), abs=0.006)
        if rule == "conformal":
            assert sensitivity.mean() >= TARGET - 0.003
        if rule == "pac":
            assert (sensitivity >= TARGET).mean() >= 0.95 - 0.004
        if rule == "sample":  # the baseline misses its target on new cases
            assert sensitivity.mean() < TARGET


def test_the_operating_point_of_a_sample() -> None:
    rng = np.random.default_rng(1)
    malignant, benign = rng.uniform(0.2, 1.0, 30), rng.uniform(0.0, 0.6, 70)
    labels = np.r_[np.ones(30), np.zeros(70)]
    point = choose_operating_point(labels, np.r_[malignant, benign], TARGET, "conformal")
    k = order_statistic(30, TARGET, "conformal")
    assert point.threshold == np.sort(malignant)[k - 1] and point.k == k == 4
    assert point.sample_sensitivity == pytest.approx(27 / 30)
    assert point.expected_sensitivity == pytest.approx(1 - k / 31)
    assert point.expected_specificity == pytest.approx((benign < point.threshold).mean())
    low, high = point.specificity_ci
    assert low < point.expected_specificity < high
    assert (point.n, point.n_malignant, point.n_benign) == (100, 30, 70)
    sample = choose_operating_point(labels, np.r_[malignant, benign], TARGET, "sample")
    assert sample.sample_sensitivity >= TARGET and sample.threshold >= point.threshold


@pytest.mark.parametrize("labels, rule, message", [
    ([0, 0, 0, 0], "conformal", "no malignant case.*at least 6"),
    ([1, 1, 1, 0, 0], "conformal", "3 malignant case.*needs at least 6"),
    ([1] * 10 + [0] * 5, "pac", "10 malignant case.*needs at least 19"),
    ([1] * 10, "conformal", "no benign case"),
])
def test_samples_that_cannot_give_an_operating_point_are_refused(labels: list[int], rule: str, message: str) -> None:
    with pytest.raises(SiteError, match=message):
        choose_operating_point(np.array(labels), np.linspace(0, 1, len(labels)), TARGET, rule)


@pytest.fixture
def run_copy(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name in (runs.CONFIG_FILE, runs.MODEL_FILE):
        shutil.copy(runs.DEFAULT_RUN / name, run / name)
    return run


def _frame(n_malignant: int = 20, n_benign: int = 40):
    import pandas as pd

    rng = np.random.default_rng(2)
    return pd.DataFrame({"label": [1] * n_malignant + [0] * n_benign,
                         "probability": np.r_[rng.uniform(0.1, 1, n_malignant), rng.uniform(0, 0.5, n_benign)]})


def test_profiles_are_named_safely_and_kept_from_accidental_overwrites(run_copy: Path) -> None:
    profile = sites.make_profile(run_copy, "clinic_a", _frame(), SampleSource(data="labels.csv"),
                                 sample_date="2026-11-30")
    path = runs.write_site_profile(run_copy, profile)
    assert path == run_copy / "sites" / "clinic_a.json"
    loaded = sites.load_profile(run_copy, "clinic_a")
    assert loaded == profile and loaded.sample_date == "2026-11-30"
    assert set(sites.usable_profiles(run_copy)) == {"clinic_a"}
    with pytest.raises(runs.RunError, match="already holds the site profile 'clinic_a'"):
        runs.write_site_profile(run_copy, profile)
    moved = dataclasses.replace(profile, point=dataclasses.replace(profile.point, threshold=0.5))
    runs.write_site_profile(run_copy, moved, overwrite=True)
    assert sites.load_profile(run_copy, "clinic_a").point.threshold == 0.5
    for bad in ("../metrics", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(runs.RunError, match="not allowed"):
            sites.make_profile(run_copy, bad, _frame(), SampleSource())
    assert sorted(p.name for p in run_copy.iterdir()) == ["config.yaml", "model.safetensors", "sites"]


def test_a_profile_is_refused_once_the_calibration_changes(run_copy: Path) -> None:
    runs.write_site_profile(run_copy, sites.make_profile(run_copy, "clinic_a", _frame(), SampleSource()))
    config = yaml.safe_load((run_copy / runs.CONFIG_FILE).read_text())
    (run_copy / runs.CONFIG_FILE).write_text(yaml.safe_dump(config | {"calibration": [1.5, -0.2]}, sort_keys=False))
    with pytest.raises(runs.RunError, match="made for other weights or another calibration"):
        sites.load_profile(run_copy, "clinic_a")
    assert sites.usable_profiles(run_copy) == {}


# ---------------------------------------------------------------- the command line, on the shipped model

@pytest.fixture(scope="module")
def site_sample(ham_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A copy of the shipped run, and a labelled sample of one "site": 12 malignant and 28 benign test images."""
    import pandas as pd

    from core.runs import read_predictions

    root = tmp_path_factory.mktemp("site")
    run = root / "run"
    shutil.copytree(runs.DEFAULT_RUN, run, ignore=shutil.ignore_patterns("cams_*", "stress_*", "attention_*"))
    (root / "images").mkdir()
    test = read_predictions(runs.DEFAULT_RUN, "test")
    chosen = pd.concat([test[test["label"] == 1].sample(12, random_state=5), test[test["label"] == 0].sample(
        28, random_state=5)])
    for image_id in chosen["image_id"]:
        shutil.copy(ham_dir / "images" / f"{image_id}.jpg", root / "images")
    pd.DataFrame({"image": chosen["image_id"] + ".jpg", "label": chosen["label"]}).to_csv(root / "labels.csv",
                                                                                        index=False)
    return run, root / "labels.csv", root / "images"


def test_site_then_predict_with_its_threshold(site_sample: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import pandas as pd

    import train
    from core.predictor import Predictor
    from tests.helpers import run_main

    run, labels, images = site_sample
    code, out, err = run_main(train.main, "site", "--run", str(run), "--name", "clinic_a", "--data", str(labels),
                              "--images", str(images), "--sample-date", "2026-11-30", "--device", "cpu")
    assert code == 0, err
    profile = sites.load_profile(run, "clinic_a")
    point = profile.point
    assert (point.n, point.n_malignant, profile.sample_date) == (40, 12, "2026-11-30")
    assert point.rule == "conformal" and profile.source.images == str(images.resolve())
    assert f"threshold {point.threshold:.4f}" in out and "expected sensitivity" in out
    code, _, err = run_main(train.main, "site", "--run", str(run), "--name", "clinic_a", "--data", str(labels),
                            "--images", str(images))
    assert code == 2 and "already holds the site profile 'clinic_a'" in err
    out_csv = tmp_path / "predictions.csv"
    code, out, err = run_main(train.main, "predict", "--run", str(run), "--images", str(images), "--out",
                              str(out_csv), "--site", "clinic_a", "--device", "cpu")
    assert code == 0, err
    table = pd.read_csv(out_csv)
    assert len(table) == 40 and np.allclose(table["threshold"], point.threshold, rtol=0, atol=1e-12)
    decided = np.where(table["probability"] >= point.threshold, "malignant", "benign")
    guard = Predictor.load(run).ood
    # At a site's threshold only images unlike the training data in content are withheld.
    assert (table["decision"] == np.where(table["ood_score"] > guard.threshold, "withheld", decided)).all()
    # Batched forward passes give what one image at a time gives.
    one = Predictor.load(run).predict(images / table["image"].iloc[0])
    assert table["probability"].iloc[0] == pytest.approx(one.probability, abs=1e-5)
    code, _, err = run_main(train.main, "predict", "--run", str(run), "--images", str(images), "--out",
                            str(out_csv), "--site", "elsewhere")
    assert code == 2 and "sites/elsewhere.json is missing" in err and "train.py site" in err


def test_site_refusals_name_the_problem(site_sample: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import pandas as pd

    import train
    from tests.helpers import run_main

    run, labels, images = site_sample
    benign_only = tmp_path / "benign.csv"
    frame = pd.read_csv(labels)
    frame[frame["label"] == 0].to_csv(benign_only, index=False)
    code, _, err = run_main(train.main, "site", "--run", str(run), "--name", "b", "--data", str(benign_only),
                            "--images", str(images))
    assert code == 2 and "no malignant case" in err and "at least 6" in err
    code, _, err = run_main(train.main, "site", "--run", str(run), "--name", "b", "--data", str(labels), "--images",
                            str(images), "--rule", "pac")
    assert code == 2 and "12 malignant case(s)" in err and "needs at least 19" in err
    code, _, err = run_main(train.main, "site", "--run", str(run), "--name", "../metrics", "--data", str(labels),
                            "--images", str(images))
    assert code == 2 and "not allowed" in err
    missing = tmp_path / "missing.csv"
    pd.DataFrame({"image": ["nowhere.jpg"], "label": [1]}).to_csv(missing, index=False)
    code, _, err = run_main(train.main, "site", "--run", str(run), "--name", "b", "--data", str(missing),
                            "--images", str(images))
    assert code == 2 and "have no image file" in err and "nowhere" in err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"not a jpeg")
    code, _, err = run_main(train.main, "predict", "--run", str(run), "--images", str(junk), "--out",
                            str(tmp_path / "p.csv"))
    assert code == 2 and "none of the 1 image files" in err and not (tmp_path / "p.csv").exists()
    assert not (run / "sites" / "b.json").exists()


def test_evaluate_names_the_set_and_records_where_its_images_are(site_sample: tuple[Path, Path, Path]) -> None:
    import train
    from tests.helpers import run_main

    run, labels, images = site_sample
    code, out, err = run_main(train.main, "evaluate", "--run", str(run), "--data", str(labels), "--images",
                              str(images), "--name", "clinic_a", "--device", "cpu")
    assert code == 0, err
    report = runs.read_external(run, "clinic_a")
    assert report.images == str(images.resolve()) and report.n == 40 and report.shift is not None
    assert set(report.shift.tests) == {"ood_score", "style_score"} and report.shift.advice is not None
    written = runs.read_predictions(run, "external_clinic_a")
    assert sorted(written["file"]) == sorted(p.name for p in images.iterdir())
    assert set(runs.external_sets(run)) == {"clinic_a"}
    code, _, err = run_main(train.main, "evaluate", "--run", str(run), "--data", str(labels), "--images",
                            str(images), "--name", "a/b")
    assert code == 2 and "not allowed" in err
    code, _, err = run_main(train.main, "evaluate", "--run", str(run), "--name", "x")
    assert code == 2 and "--name names an external set" in err


def test_at_a_site_threshold_another_camera_is_decided_not_withheld(site_sample: tuple[Path, Path, Path],
                                                                    tmp_path: Path) -> None:
    """The same lesions through another camera (warmer, resampled, JPEG 60): their style is unlike the training
    images, so without a site they are withheld; a site's threshold was chosen on such images, so there only an image
    unlike the training data in content is."""
    import pandas as pd

    import train
    from benchmarks.site_shifts import SHIFTS
    from core.images import open_rgb
    from tests.helpers import run_main

    run, _, images = site_sample
    other = tmp_path / "other_camera"
    other.mkdir()
    for path in sorted(images.iterdir())[:8]:
        SHIFTS["camera"](open_rgb(path)).save(other / path.name)
    runs.write_site_profile(run, sites.make_profile(run, "camera_site", _frame(), SampleSource()), overwrite=True)
    tables = {}
    for site in (None, "camera_site"):
        out = tmp_path / f"{site}.csv"
        code, _, err = run_main(train.main, "predict", "--run", str(run), "--images", str(other), "--out", str(out),
                                *(["--site", site] if site else []))
        assert code == 0, err
        tables[site] = pd.read_csv(out)
    from core.predictor import Predictor

    content = tables[None]["ood_score"] > Predictor.load(run).ood.threshold
    assert (tables[None]["decision"][tables[None]["out_of_distribution"]] == "withheld").all()
    assert (tables[None]["out_of_distribution"] & ~content).any()  # some are flagged for their style alone
    assert ((tables["camera_site"]["decision"] == "withheld") == content).all()


def test_predict_without_val_thresholds_still_writes_the_probabilities(site_sample: tuple[Path, Path, Path],
                                                                      tmp_path: Path) -> None:
    import pandas as pd

    import train
    from tests.helpers import run_main

    run, _, images = site_sample
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("metrics*.json", "sites"))
    out = tmp_path / "p.csv"
    code, _, err = run_main(train.main, "predict", "--run", str(bare), "--images", str(images), "--out", str(out))
    assert code == 0, err
    assert "threshold and decision columns stay empty" in err
    table = pd.read_csv(out)
    assert len(table) == 40 and table["probability"].between(0, 1).all()
    assert table["threshold"].isna().all() and table["decision"].isna().all()
