"""The artifact stress test: interventions paint the corners and border but never a lesion pixel, are seeded and
batch-independent, and the audit built on them catches a model that reads the corners and clears one that reads
only the centre; then the real CLI on a 40-image subset of the shipped model, and the Predictor's corner check."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train
from core.audit.corners import ellipse_radius, unmasked_region
from core.audit.interventions import (
    CORNER_CHECK,
    CORNER_INTERVENTIONS,
    INTERVENTIONS,
    corner_dependent,
    create_intervention,
    image_key,
)
from core.audit.stress import image_flags, intervened_probabilities, run_scorer, stress_table, summarize
from core.inference import model_view_masks, preload_images
from core.predictor import Predictor
from core.run import load
from core.runs import DEFAULT_RUN, RunError, read_metrics, read_stress, read_stress_summary
from core.transforms import view_shape
from tests.helpers import run_main

SKIN = np.array([205.0, 150.0, 135.0])


def skin_images(n: int, shape: tuple[int, int], seed: int = 0, dark_corners: bool = False) -> torch.Tensor:
    """Noisy skin with a dark central lesion, uint8 (N, 3, H, W); optionally with a black vignette already in."""
    rng = np.random.default_rng(seed)
    radius = ellipse_radius(shape)
    images = SKIN * (1 - 0.6 * (radius < 0.35))[..., None] + rng.normal(0, 10, (n, *shape, 3))
    if dark_corners:
        images[:, radius > 1.05] = 10
    return torch.from_numpy(np.clip(images, 0, 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def lesion_masks(n: int, shape: tuple[int, int]) -> list[np.ndarray]:
    return [ellipse_radius(shape) < 0.4] * n


def changed(before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
    """(N, H, W) bool: which pixels an intervention changed."""
    return (before != after).any(dim=1).numpy()


# ---------------------------------------------------------------- the interventions

@pytest.mark.parametrize("crop", ["square", "frame"])
@pytest.mark.parametrize("name", list(INTERVENTIONS))
def test_an_intervention_paints_outside_the_lesion_only(name: str, crop: str) -> None:
    shape = view_shape(160, crop)
    images = skin_images(6, shape)
    masks = lesion_masks(6, shape)
    out = create_intervention(name)(images, masks, range(6))
    assert out.shape == images.shape and out.dtype == torch.uint8
    diff = changed(images, out)
    assert not diff[:, masks[0]].any(), "a lesion pixel changed"
    assert diff.reshape(6, -1).any(axis=1).all(), "the artifact is missing on some image"
    if name in CORNER_INTERVENTIONS:  # corner artifacts live outside the inscribed circle (or near it)
        assert (ellipse_radius(shape)[diff.any(axis=0)] > 0.84).all()
    # Without a mask (an upload), the artifact stays in the corner squares and the border.
    bare = create_intervention(name)(images, None, range(6))
    assert not changed(images, bare)[:, ~unmasked_region(shape)].any()
    assert changed(images, bare).reshape(6, -1).any(axis=1).all()


def test_real_lesion_masks_are_left_untouched(ham: pd.DataFrame) -> None:
    rows = ham[ham["mask_path"].notna()].sample(8, random_state=1)
    for crop in ("square", "frame"):
        images = preload_images(rows["path"].tolist(), 160, crop)
        masks = model_view_masks(rows["mask_path"].tolist(), 160, crop)
        for name in INTERVENTIONS:
            out = create_intervention(name)(images, masks, [image_key(i) for i in rows["image_id"]])
            diff = changed(images, out)
            for k, mask in enumerate(masks):
                assert not diff[k][mask].any(), (name, crop, rows["image_id"].iloc[k])


@pytest.mark.parametrize("name", list(INTERVENTIONS))
def test_an_intervention_is_seeded_and_independent_of_the_batch(name: str) -> None:
    images = skin_images(5, (160, 160), seed=3)
    masks, keys = lesion_masks(5, (160, 160)), [image_key(f"ISIC_{k}") for k in range(5)]
    whole = create_intervention(name, seed=7)(images, masks, keys)
    assert torch.equal(whole, create_intervention(name, seed=7)(images, masks, keys))
    alone = create_intervention(name, seed=7)(images[2:3], masks[2:3], keys[2:3])
    assert torch.equal(whole[2:3], alone)
    if name in ("ink", "ruler", "hair"):  # the random artifacts: another seed draws another one
        others = [create_intervention(name, seed=s)(images, masks, keys) for s in (8, 9)]
        assert any(not torch.equal(whole, other) for other in others)


def test_corner_fill_paints_the_images_own_skin_colour() -> None:
    images = skin_images(2, (160, 160), dark_corners=True)
    out = create_intervention("corner_fill")(images, lesion_masks(2, (160, 160)))
    corners = out.permute(0, 2, 3, 1).numpy()[:, ellipse_radius((160, 160)) > 1.02]
    assert np.abs(corners.astype(float) - SKIN).max() < 12  # the skin's median, not the black ring


def test_bad_input_is_refused_with_its_reason() -> None:
    with pytest.raises(ValueError, match="unknown intervention 'glitter'.*vignette"):
        create_intervention("glitter")
    with pytest.raises(ValueError, match="uint8 batches"):
        create_intervention("ink")(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="mask 0 has shape"):
        create_intervention("ink")(skin_images(1, (64, 64)), [np.zeros((32, 32), bool)])


# ---------------------------------------------------------------- the audit against known answers

def corner_reader(images: torch.Tensor) -> np.ndarray:
    """A cheater: P(malignant) is high when the corners are dark, whatever the lesion."""
    outside = torch.from_numpy(ellipse_radius(tuple(images.shape[-2:])) > 1.0)
    luma = images.float().mean(1)[:, outside].mean(1) / 255
    return torch.sigmoid(12 * (0.35 - luma)).double().numpy()


def centre_reader(images: torch.Tensor) -> np.ndarray:
    """An honest model: P(malignant) reads the centre of the view (where the lesion is) only."""
    h, w = images.shape[-2:]
    centre = images.float()[:, :, h // 3:2 * h // 3, w // 3:2 * w // 3].mean((1, 2, 3)) / 255
    return torch.sigmoid(40 * (0.42 - centre)).double().numpy()


def audit(score, images: torch.Tensor, masks, labels: np.ndarray, threshold: float) -> tuple[dict, pd.DataFrame]:
    n = len(images)
    frame = pd.DataFrame({"image_id": [f"img{k}" for k in range(n)], "lesion_id": [f"les{k}" for k in range(n)],
                          "dx": np.where(labels == 1, "mel", "nv"), "label": labels})
    probabilities = intervened_probabilities(score, images, masks, range(n), list(INTERVENTIONS), chunk=16)
    table = stress_table(frame, probabilities, threshold)
    return summarize(table, threshold, n_boot=50), image_flags(table, threshold)


def test_a_model_that_reads_the_corners_is_caught() -> None:
    images = skin_images(40, (160, 160), seed=5, dark_corners=True)
    labels = np.arange(40) % 2
    summary, flags = audit(corner_reader, images, lesion_masks(40, (160, 160)), labels, 0.5)
    assert summary["interventions"]["corner_fill"]["flipped"] >= 0.95
    assert summary["interventions"]["corner_fill"]["to_benign"] >= 0.95
    assert flags["corner_dependent"].all() and summary["corner_dependent"]["rate"] == 1.0


def test_a_model_that_reads_the_centre_is_cleared() -> None:
    images = skin_images(40, (160, 160), seed=6)
    images[::2] = (images[::2].float() * 0.9).to(torch.uint8)  # half the lesions (and skin) darker: a spread of p
    labels = np.arange(40) % 2
    summary, flags = audit(centre_reader, images, None, labels, 0.5)
    for name, row in summary["interventions"].items():
        assert row["flipped"] == 0 and row["mean_abs_delta_p"] == 0, name
        assert row["auroc_change"] == 0
    assert not flags["corner_dependent"].any()


def test_the_corner_flag_is_a_flip_or_a_large_move() -> None:
    checked = {"corner_fill": np.array([0.45, 0.30, 0.31, 0.9]), "vignette": np.array([0.4, 0.30, 0.30, 0.61])}
    flags = corner_dependent(np.array([0.55, 0.32, 0.52, 0.9]), checked, threshold=0.5, min_delta=0.2)
    assert flags.tolist() == [True, False, True, True]  # flip; nothing; flip of a small move; |Δp| 0.29 ≥ 0.2


# ---------------------------------------------------------------- the real model and the command line

@pytest.fixture(scope="module")
def stressed_run(ham, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped run, stress-tested by the real CLI on 40 test and 24 val images."""
    run = tmp_path_factory.mktemp("stress") / "run"
    shutil.copytree(DEFAULT_RUN, run, ignore=shutil.ignore_patterns("cams_*", "stress_*"))
    for split, limit, corners in (("test", "40", []), ("val", "24", ["--no-train-corners"])):
        code, out, err = run_main(train.main, "stress", "--run", str(run), "--split", split, "--limit", limit,
                                  "--interventions", "corner_fill", "vignette", "ink", "--device", "cpu", *corners)
        assert code == 0, err
    assert "corner-dependent decisions" in out and "corner_fill" in out
    return run


def test_cli_writes_the_table_and_the_summary(stressed_run: Path) -> None:
    table = read_stress(stressed_run, "test")
    assert len(table) == 40 * 3 and set(table["intervention"]) == {"corner_fill", "vignette", "ink"}
    assert np.allclose(table["delta_p"], table["p"] - table["p_clean"], atol=2e-6)
    # The clean p is the run's own prediction, computed as evaluation computes it.
    predictions = pd.read_csv(stressed_run / "predictions_test.csv", dtype={"image_id": str}).set_index("image_id")
    clean = table.drop_duplicates("image_id").set_index("image_id")["p_clean"]
    assert np.allclose(clean, predictions.loc[clean.index, "probability"], atol=1e-5)
    threshold = read_metrics(stressed_run).thresholds["youden"]
    assert (table["flipped"] == ((table["p"] >= threshold) != (table["p_clean"] >= threshold))).all()
    test = read_stress_summary(stressed_run, "test")
    assert read_stress_summary(stressed_run, "val").n == 24  # a second split is added, not written over
    assert test.n == 40 and set(test.interventions) == {"corner_fill", "vignette", "ink"}
    row = test.interventions["corner_fill"]
    assert row.flipped == pytest.approx(row.to_malignant + row.to_benign)
    assert row.flipped == pytest.approx(table[table["intervention"] == "corner_fill"]["flipped"].mean())
    assert row.auroc_change_ci[0] <= row.auroc_change <= row.auroc_change_ci[1]
    assert test.cam_validation is not None and "corner_fill" in test.cam_validation.interventions
    assert test.dark_corners_train is not None and test.dark_corners_train.n == 40
    assert set(test.dark_corners_train.by_label) <= {"benign", "malignant"}


def test_cli_refuses_what_it_cannot_do(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train.main(["stress", "--run", str(DEFAULT_RUN), "--interventions", "ink", "ruler"]) == 2
    assert "corner-dependence flag needs corner_fill, vignette" in capsys.readouterr().err
    assert train.main(["stress", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics.json" in err and "train.py evaluate" in err
    with pytest.raises(RunError, match="train.py stress --split val"):
        read_stress_summary(tmp_path, "val")


def test_the_predictor_checks_the_corners_in_one_batch(ham_dir: Path) -> None:
    """Predict's corner check is the stress test's code path: the same p for the same (unmasked) images."""
    predictor = Predictor.load(DEFAULT_RUN)
    path = ham_dir / "images" / "ISIC_0024306.jpg"
    result = predictor.predict(path, corner_check=True, threshold=0.3)
    plain = predictor.predict(path)
    assert result.probability == pytest.approx(plain.probability, abs=1e-6)
    score = run_scorer(load(DEFAULT_RUN))
    expected = intervened_probabilities(score, predictor.model_input(path).unsqueeze(0), [None], [0], CORNER_CHECK)
    for name in CORNER_CHECK:
        assert result.corner_probabilities[name] == pytest.approx(float(expected[name][0]), abs=1e-5)
        assert result.corner_views[name].shape == result.model_input.shape
    assert result.corner_dependent == bool(corner_dependent(result.probability, result.corner_probabilities, 0.3))
