"""The out-of-distribution guard: features come from the prediction's own forward pass, the index round-trips and
finds a training image as its own nearest neighbour, a stale index is refused, the CLI columns exist; and on the
shipped model non-dermoscopic images are flagged while ≤ 5 % of the HAM10000 test split is."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

import train
from benchmarks import ood_probes
from core.audit.ood import KNNDistance, Mahalanobis
from core.config import RunConfig
from core.data import PROJECT_ROOT
from core.embedding import INDEX_FILE, EmbeddingIndex, captured_features, feature_layers
from core.ensemble import Ensemble
from core.inference import Preprocess, predict_probabilities
from core.model import create_model
from core.predictor import Predictor
from core.runs import DEFAULT_RUN, RunError, read_external, read_ood_scores, read_ood_summary, read_predictions
from tests.helpers import run_main

SIZE = 48


# ---------------------------------------------------------------- features in the prediction's pass

@pytest.mark.parametrize("crop", ["square", "frame"])
def test_features_come_with_the_prediction_and_do_not_change_it(crop: str) -> None:
    torch.manual_seed(0)
    members = [create_model("efficientnet_lite0", pretrained=False, num_outputs=1),
               create_model("efficientnet_lite0", pretrained=False, num_outputs=7)]
    model = Ensemble(members).eval()
    cfg = RunConfig(pretrained=False, input_size=SIZE, crop=crop, normalization="imagenet")
    shape = (SIZE, SIZE) if crop == "square" else (SIZE, 64)
    images = torch.randint(0, 256, (5, 3, *shape), dtype=torch.uint8)
    features: list[np.ndarray] = []
    p = predict_probabilities(model, images, Preprocess(cfg), torch.device("cpu"), batch_size=4, tta_views=2,
                              features=features)
    assert np.array_equal(p, predict_probabilities(model, images, Preprocess(cfg), torch.device("cpu"),
                                                   batch_size=4, tta_views=2))
    assert features[0].shape == (5, 2 * members[0].num_features)
    # Each member's part is its pooled features, unit-normalised, averaged over the two flip views.
    x = Preprocess(cfg)(images)
    for k, member in enumerate(members):
        views = [member.forward_head(member.forward_features(v), pre_logits=True) for v in (x, x.flip(-1))]
        expected = torch.stack([torch.nn.functional.normalize(v, dim=1) for v in views]).mean(0)
        part = features[0][:, k * member.num_features:(k + 1) * member.num_features]
        assert np.allclose(part, expected.detach().numpy(), atol=1e-4)
    assert len(feature_layers(model)) == 2
    with captured_features(model) as captured:
        pass
    assert all(not layer._forward_pre_hooks for layer in feature_layers(model)) and captured == [[], []]


def test_scores_rank_a_far_point_above_near_ones() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (300, 40))
    frame = pd.DataFrame({"image_id": [f"t{k}" for k in range(300)], "dx": "nv", "label": np.arange(300) % 2})
    index = EmbeddingIndex.fit(train, frame, 8, {})
    near, far = rng.normal(0, 1, (20, 40)), rng.normal(0, 1, (20, 40)) + 6
    for score in (KNNDistance(5).fit(index, index.labels), Mahalanobis().fit(index, index.labels)):
        assert score(*index.project(far)).min() > score(*index.project(near)).max(), type(score).__name__
    # Off the 8 axes: the residual keeps a point far along the other 32 from looking near.
    direction = rng.normal(size=40)
    direction -= index.components.T @ (index.components @ direction)  # orthogonal to the 8 axes
    off_axes = index.mean + 20 * direction / np.linalg.norm(direction)
    knn = KNNDistance(5).fit(index, index.labels)
    coords, residuals = index.project(off_axes[None])
    near_scores = knn(*index.project(near))
    assert np.abs(coords).max() < 1e-3 and residuals[0] == pytest.approx(20, rel=1e-3)
    assert knn(coords, residuals)[0] > near_scores.max()
    nearest = index.nearest(*index.project(train[17:18]), k=3)[0]
    assert nearest["image_id"].iloc[0] == "t17" and nearest["distance"].iloc[0] < 0.05


# ---------------------------------------------------------------- train.py index on a small split

@pytest.fixture(scope="module")
def small_run(ham, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped run whose split file holds 60 train, 30 val and 30 test images, indexed by the CLI."""
    root = tmp_path_factory.mktemp("ood")
    run = root / "run"
    shutil.copytree(DEFAULT_RUN, run, ignore=shutil.ignore_patterns("cams_*", "stress_*", "index*", "ood_*"))
    split = pd.read_csv(PROJECT_ROOT / "splits" / "ham10000.csv")
    test_ids = set(read_predictions(DEFAULT_RUN, "test")["image_id"])
    small = pd.concat([split[split["split"] == name].sample(n, random_state=0)
                       for name, n in (("train", 60), ("val", 30), ("test", 30))])
    assert set(small[small["split"] == "test"]["image_id"]) <= test_ids
    small.to_csv(root / "split.csv", index=False)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(config | {"split_file": str(root / "split.csv")}, sort_keys=False))
    code, out, err = run_main(train.main, "index", "--run", str(run), "--dims", "24", "--device", "cpu")
    assert code == 0, err
    assert "val 6.7 %" in out or "val 3.3 %" in out, out  # 1–2 of 30 above the 95th pct.
    return run


def test_the_index_round_trips_and_finds_a_training_image_itself(small_run: Path, ham_dir: Path) -> None:
    index = EmbeddingIndex.load(small_run)
    assert index.features.shape == (60, 24) and index.features.dtype == np.float16
    assert index.components.shape == (24, 2 * 1280) and len(index.image_ids) == len(index.dx) == 60
    again = EmbeddingIndex.load(small_run)
    assert np.array_equal(again.features, index.features) and again.meta == index.meta
    assert (small_run / INDEX_FILE).stat().st_size < 1_000_000
    predictor = Predictor.load(small_run)
    train_id = index.image_ids[7]
    result = predictor.predict(ham_dir / "images" / f"{train_id}.jpg")
    assert result.similar["image_id"].iloc[0] == train_id and result.similar["distance"].iloc[0] < 0.02
    assert len(result.similar) == 6 and list(result.similar.columns) == ["image_id", "dx", "label", "distance"]
    assert result.similar["distance"].is_monotonic_increasing
    # (Whether it is flagged depends on its 10th neighbour, far away in a 60-image index; the decision follows.)
    assert result.decision(0.5) == ("withheld" if result.out_of_distribution else
                                    "malignant" if result.probability >= 0.5 else "benign")


def test_scores_and_summary_are_written_for_val_and_test(small_run: Path, ham_dir: Path) -> None:
    summary = read_ood_summary(small_run)
    test = read_ood_scores(small_run, "test")
    assert len(test) == 30 and len(read_ood_scores(small_run, "val")) == 30
    assert summary.flag_rate["test"] == pytest.approx(test["out_of_distribution"].mean())
    # Flagged when either distance is above its threshold, both at the val percentile where the union flags 5 %.
    assert (test["out_of_distribution"] == ((test["ood_score"] > summary.threshold)
                                            | (test["style_score"] > summary.style_threshold))).all()
    assert summary.union_percentile is not None and summary.union_percentile >= summary.percentile
    # The Predictor gives a test image the score train.py index wrote for it.
    row = test.iloc[3]
    result = Predictor.load(small_run).predict(ham_dir / "images" / f"{row['image_id']}.jpg")
    assert result.ood_score == pytest.approx(row["ood_score"], rel=1e-3)
    assert result.style_score == pytest.approx(row["style_score"], rel=1e-3)
    mistakes = summary.mistakes_test
    assert 0 <= mistakes.flag_rate_mistakes <= 1 and mistakes.n >= 0


def test_an_index_of_another_run_is_refused(small_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(small_run, other)
    split_file = Path(yaml.safe_load((other / "config.yaml").read_text())["split_file"])
    moved = tmp_path / "split.csv"
    frame = pd.read_csv(split_file)
    frame.loc[frame.index[0], "split"] = "val"  # another split: one training image less
    frame.to_csv(moved, index=False)
    config = yaml.safe_load((other / "config.yaml").read_text()) | {"split_file": str(moved)}
    (other / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(RunError, match=r"built for another run \(split differ.*train.py index --run"):
        Predictor.load(other)
    shutil.copy(small_run / "config.yaml", other / "config.yaml")
    (other / INDEX_FILE).write_bytes((small_run / INDEX_FILE).read_bytes()[:500])
    with pytest.raises(RunError, match="not a readable index"):
        Predictor.load(other)
    code, _, err = run_main(train.main, "index", "--run", str(other), "--method", "cosine")
    assert code == 2 and "choose from 'knn', 'mahalanobis'" in err


def test_predict_and_evaluate_data_carry_the_flag(small_run: Path, ham_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    test = read_ood_scores(small_run, "test").head(4)
    for image_id in test["image_id"]:
        shutil.copy(ham_dir / "images" / f"{image_id}.jpg", folder)
    ood_probes.photos()["astronaut"].save(folder / "astronaut.png")
    out = tmp_path / "predictions.csv"
    code, _, err = run_main(train.main, "predict", "--run", str(small_run), "--images", str(folder), "--out", str(out))
    assert code == 0, err
    table = pd.read_csv(out)
    assert list(table.columns) == ["image", "probability", "ood_score", "style_score", "out_of_distribution",
                                   "unlike_in_content", "threshold", "decision"] and len(table) == 5
    assert (table["decision"] == np.where(table["out_of_distribution"], "withheld", np.where(
        table["probability"] >= table["threshold"], "malignant", "benign"))).all()
    scores = table.set_index("image")["ood_score"]
    for image_id, score in zip(test["image_id"], test["ood_score"]):
        assert scores[f"{image_id}.jpg"] == pytest.approx(score, rel=1e-3)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"image": [f"{i}.jpg" for i in test["image_id"]] + ["astronaut.png"],
                  "label": [0, 1, 0, 1, 0]}).to_csv(labels, index=False)
    code, out, err = run_main(train.main, "evaluate", "--run", str(small_run), "--data", str(labels), "--images",
                              str(folder), "--device", "cpu")
    assert code == 0, err
    assert "of the images flagged" in out
    report = read_external(small_run, "labels").ood
    assert report is not None
    parts = [part.n for part in (report.flagged, report.unflagged) if part is not None]
    flagged = report.flagged.n if report.flagged is not None else 0
    assert sum(parts) == 5 and report.share_flagged == pytest.approx(flagged / 5)
    written = pd.read_csv(small_run / "predictions_external_labels.csv")
    assert {"ood_score", "out_of_distribution"} <= set(written.columns)


# ---------------------------------------------------------------- the shipped model's index

@pytest.fixture(scope="module")
def shipped() -> Predictor:
    return Predictor.load(DEFAULT_RUN)


def test_the_shipped_run_flags_few_of_its_own_test_split(shipped: Predictor) -> None:
    summary = read_ood_summary(DEFAULT_RUN)
    assert summary.flag_rate["val"] == pytest.approx(1 - summary.percentile / 100, abs=0.002)
    # In distribution: the val rate within its binomial noise on 1,500 images (two standard errors, 1.1 points).
    assert summary.flag_rate["test"] <= 0.05 + 2 * (0.05 * 0.95 / 1500) ** 0.5
    assert shipped.ood is not None and shipped.ood.threshold == pytest.approx(summary.threshold)
    assert (DEFAULT_RUN / INDEX_FILE).stat().st_size < 6_000_000  # committed: a few MB


# Noise and flat colours must all be caught. Text and photos: with the penultimate features alone the corner-robust
# model's index missed "ERROR 404" (score 0.963, threshold 0.965) and 3 of 18 photos; with the style statistics of
# earlier stages (issue #30) all are caught, at the same 4.5 % of the test split. One photo of slack is left.
@pytest.mark.parametrize(("kind", "share"), [("photos", 0.9), ("noise", 1.0), ("flat", 1.0), ("text", 1.0)])
def test_non_dermoscopic_images_are_flagged(shipped: Predictor, kind: str, share: float) -> None:
    probes = ood_probes.non_dermoscopic()[kind]
    results = {name: shipped.predict(image) for name, image in probes.items()}
    flagged = {name for name, result in results.items() if result.out_of_distribution}
    assert len(flagged) >= share * len(probes), sorted(set(probes) - flagged)
    assert all(results[name].decision(0.3) == "withheld" for name in flagged)


def test_altered_ham_images_are_reported(shipped: Predictor, ham) -> None:
    """Blurred and colour-shifted HAM images: what happens is reported (printed), not asserted either way, except
    that the score is finite and the flag is the threshold's."""
    rows = ham.sample(6, random_state=0)
    altered = ood_probes.ham_altered([Image.open(p) for p in rows["path"]], rows["image_id"].tolist())
    results = [shipped.predict(image) for image in altered.values()]
    for result in results:
        assert np.isfinite(result.ood_score)
        assert result.out_of_distribution == (result.ood_score > shipped.ood.threshold
                                              or result.style_score > shipped.ood.style_threshold)
    print(f"altered HAM images flagged: {sum(r.out_of_distribution for r in results)} of {len(results)}")
