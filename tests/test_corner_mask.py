"""The fixed corner mask (``mask_corners``, ``mask_radius``): outside the inscribed circle/ellipse (or a smaller
one) the model always sees one constant colour, and it is applied by one code path, so training (after
augmentation), evaluation, the stress test, the Predictor, Grad-CAM and the dashboard's model view all see the same
masked pixels."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from core import checkpoint, runs
from core.audit.interventions import CORNER_INTERVENTIONS, create_intervention
from core.config import RunConfig
from core.inference import Preprocess, predict_probabilities, preload_images
from core.model import create_model, head_outputs
from core.predictor import Predictor
from core.train.augment import BatchAugment
from core.train.training import create_training_parts, training_loss
from core.transforms import CORNER_FILL, CornerMask, ellipse_radius, view_shape
from tests.helpers import write_image

SIZE = 48


def masked_config(crop: str = "square", radius: float = 1.0) -> RunConfig:
    return RunConfig(pretrained=False, input_size=SIZE, crop=crop, mask_corners=True, mask_radius=radius,
                       normalization="imagenet", tta_views=2)


def outside(crop: str, radius: float = 1.0) -> torch.Tensor:
    return ellipse_radius(*view_shape(SIZE, crop)) > radius


def saved_run(path: Path, cfg: RunConfig) -> Path:
    """A run directory with random weights: enough for the Predictor and the dashboard to load."""
    path.mkdir()
    torch.manual_seed(0)
    model = create_model(cfg.model, pretrained=False, num_outputs=head_outputs(cfg.head))
    checkpoint.save_weights(model, path / runs.MODEL_FILE)
    cfg.to_yaml(path / "config.yaml")
    return path


@pytest.mark.parametrize("radius", [1.0, 0.85])
@pytest.mark.parametrize("crop", ["square", "frame"])
def test_the_mask_paints_the_corners_one_colour_and_keeps_the_rest(crop: str, radius: float) -> None:
    shape = view_shape(SIZE, crop)
    images = torch.randint(0, 256, (3, 3, *shape), dtype=torch.uint8)
    mask = CornerMask(radius)
    masked = mask(images)
    out = outside(crop, radius)
    assert torch.equal(masked[:, :, ~out], images[:, :, ~out])
    assert (masked[:, :, out] == torch.tensor(CORNER_FILL, dtype=torch.uint8).view(1, 3, 1)).all()
    # A float image in [0, 1] (the augmented training batch) gets the same fill as its uint8 original.
    assert torch.equal((mask(images.float() / 255) * 255).round().to(torch.uint8), masked)
    assert torch.equal(mask(masked), masked)  # idempotent: masking a masked view changes nothing


@pytest.mark.parametrize("radius", [0.0, -1.0, 1.5])
def test_a_mask_radius_outside_the_view_is_refused(radius: float) -> None:
    with pytest.raises(ValueError, match="mask_radius must be in"):
        masked_config(radius=radius)


def test_without_the_flag_nothing_is_masked() -> None:
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    plain = Preprocess(RunConfig(pretrained=False, normalization="imagenet"))
    assert torch.equal(plain.view(images), images)


def test_training_sees_constant_corners_after_augmentation() -> None:
    """Rotation, zoom and the random corner artifacts happen first; the mask after them, so the corners the network
    gets in training are the same constant as at evaluation."""
    cfg = masked_config()
    cfg.corner_artifacts, cfg.rotation = 1.0, 30.0
    model, loss_fn, augment, preprocess = create_training_parts(cfg, torch.device("cpu"))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    training_loss(model, loss_fn, augment, preprocess, images, torch.tensor([0.0, 1.0, 0.0, 1.0]),
                  amp=False, generator=torch.Generator().manual_seed(0))
    evaluated = preprocess(images)
    corner = evaluated[0, :, 0, 0]
    assert torch.allclose(seen[0][:, :, outside("square")], corner.view(1, 3, 1), atol=1e-6)
    assert not torch.allclose(seen[0][:, :, ~outside("square")], evaluated[:, :, ~outside("square")])  # augmented


@pytest.mark.parametrize(("crop", "radius"), [("square", 1.0), ("frame", 1.0), ("square", 0.85)])
def test_one_code_path_for_evaluation_predictor_gradcam_and_the_dashboard(tmp_path: Path, crop: str,
                                                                          radius: float) -> None:
    from dashboard import loaders, state

    cfg = masked_config(crop, radius)
    run = saved_run(tmp_path / "run", cfg)
    photo = write_image(tmp_path / "photo.png", (80, 60), seed=4)
    predictor = Predictor.load(run)
    seen = []
    hook = predictor.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    result = predictor.predict(photo, explain=True, threshold=0.5)
    hook.remove()
    # Evaluation: the preloaded view through the run's preprocessing, as `train.py evaluate` runs it.
    preloaded = preload_images([str(photo)], SIZE, crop)
    expected = predict_probabilities(predictor.model, preloaded, Preprocess(cfg), torch.device("cpu"),
                                     tta_views=2)
    assert result.probability == pytest.approx(float(expected[0]), abs=1e-6)
    inputs = Preprocess(cfg)(preloaded)
    assert torch.allclose(seen[0][:1], inputs)     # the prediction's forward (identity view of the TTA pair)
    assert torch.allclose(seen[-1], inputs)        # Grad-CAM's forward
    # The dashboard shows exactly what the network got: the same masked pixels.
    assert state.run_view(run) == (SIZE, crop, radius)
    view = loaders.model_view(str(photo), *state.run_view(run))
    assert np.array_equal(view, result.model_input)
    assert np.array_equal(view, Preprocess(cfg).view(preloaded)[0].permute(1, 2, 0).numpy())
    assert (view[outside(crop, radius).numpy()] == CORNER_FILL).all()
    assert not (view[~outside(crop, radius).numpy()] == CORNER_FILL).all(axis=-1).all()


def test_corner_interventions_outside_the_circle_cannot_move_a_masked_model(tmp_path: Path) -> None:
    """By construction: the corner fill and the light vignette only touch pixels the mask replaces. The stronger
    vignettes reach inside the circle and still can move p, which is what training with artifacts is for."""
    run = saved_run(tmp_path / "run", masked_config())
    predictor = Predictor.load(run)
    images = torch.randint(0, 256, (6, 3, SIZE, SIZE), dtype=torch.uint8)
    clean = predict_probabilities(predictor.model, images, predictor.preprocess, torch.device("cpu"))
    for name in CORNER_INTERVENTIONS:
        painted = predict_probabilities(predictor.model, create_intervention(name)(images), predictor.preprocess,
                                        torch.device("cpu"))
        if name in ("corner_fill", "vignette_light"):
            assert np.array_equal(painted, clean), name
        else:
            assert not np.array_equal(painted, clean), name
    unmasked = Preprocess(RunConfig(pretrained=False, input_size=SIZE, normalization="imagenet"))
    filled = create_intervention("corner_fill")(images)
    assert not np.array_equal(predict_probabilities(predictor.model, filled, unmasked, torch.device("cpu")),
                              predict_probabilities(predictor.model, images, unmasked, torch.device("cpu")))


def test_a_mask_inside_the_strong_vignette_leaves_no_corner_intervention_anything_to_change(tmp_path: Path) -> None:
    """At 0.85 of the radius the mask covers every pixel any corner intervention paints (the strong vignette starts
    at 0.85): the stress test's four corner interventions cannot move such a model at all, in the Predictor's path."""
    predictor = Predictor.load(saved_run(tmp_path / "run", masked_config(radius=0.85)))
    images = torch.randint(0, 256, (6, 3, SIZE, SIZE), dtype=torch.uint8)
    clean = predict_probabilities(predictor.model, images, predictor.preprocess, torch.device("cpu"))
    for name in CORNER_INTERVENTIONS:
        painted = create_intervention(name)(images)
        assert not torch.equal(painted, images), name
        assert np.array_equal(predict_probabilities(predictor.model, painted, predictor.preprocess,
                                                    torch.device("cpu")), clean), name


def test_an_index_keeps_its_fingerprint_unless_the_mask_changes(tmp_path: Path) -> None:
    """Indexes built before the radius was a setting stay valid: unmasked runs keep ``False`` in the view, masked
    ones at radius 1 compare equal to the ``True`` they stored; another radius is another view."""
    from core.embedding import run_fingerprint

    run = saved_run(tmp_path / "run", masked_config())
    plain = run_fingerprint(run, dataclasses.replace(masked_config(), mask_corners=False))["view"]
    assert plain == [SIZE, "square", False, 2]
    assert run_fingerprint(run, masked_config())["view"] == [SIZE, "square", True, 2]
    assert run_fingerprint(run, masked_config(radius=0.85))["view"] != [SIZE, "square", True, 2]


def test_augmentation_keeps_a_fixed_seed_reproducible_with_the_mask() -> None:
    cfg = masked_config()
    augment = BatchAugment(corner_artifacts=0.5)
    images = torch.rand(8, 3, SIZE, SIZE)
    first = Preprocess(cfg)(augment(images, torch.Generator().manual_seed(3)))
    again = Preprocess(cfg)(augment(images, torch.Generator().manual_seed(3)))
    assert torch.equal(first, again)


def test_an_ensemble_of_members_with_different_masks_gives_each_its_own_view(tmp_path: Path) -> None:
    """A mixed ensemble's shared view is unmasked and each masked member masks its own copy: the ensemble answers
    the mean of what each member says on its own view, and a corner fill moves it by exactly the unmasked member's
    share (the masked members cannot see it)."""
    from core.ensemble import create_ensemble
    from core.inference import load_run
    from dashboard import state

    configs = {"masked": masked_config(), "plain": dataclasses.replace(masked_config(), mask_corners=False),
               "tighter": masked_config(radius=0.85)}
    ensemble = create_ensemble([saved_run(tmp_path / name, cfg) for name, cfg in configs.items()],
                               tmp_path / "ensemble")
    top, model = load_run(ensemble)
    assert top.corner_mask is None and state.run_view(ensemble)[2] is None
    images = torch.randint(0, 256, (5, 3, SIZE, SIZE), dtype=torch.uint8)
    filled = create_intervention("corner_fill")(images)
    cpu = torch.device("cpu")

    def each_member(batch: torch.Tensor) -> list[np.ndarray]:
        return [predict_probabilities(member, batch, Preprocess(cfg), cpu, tta_views=2)
                for member, cfg in zip(model.members, configs.values())]

    members = each_member(images)
    assert not np.allclose(members[0], members[1], atol=1e-4)  # same weights, different views
    together = predict_probabilities(model, images, Preprocess(top), cpu, tta_views=2)
    np.testing.assert_allclose(together, np.mean(members, axis=0), atol=1e-6)
    members_filled = each_member(filled)
    for k in (0, 2):
        np.testing.assert_array_equal(members_filled[k], members[k])
    moved = predict_probabilities(model, filled, Preprocess(top), cpu, tta_views=2) - together
    np.testing.assert_allclose(moved, (members_filled[1] - members[1]) / 3, atol=1e-6)
    assert np.abs(moved).max() > 0
    # The Predictor and Grad-CAM take the same path.
    result = Predictor.load(ensemble).predict(write_image(tmp_path / "photo.png", (80, 60), seed=4), explain=True,
                                              threshold=0.5)
    assert result.cam is not None and not (result.model_input == CORNER_FILL).all(axis=-1).any()


def test_an_ensemble_whose_members_share_a_mask_keeps_it_in_its_view(tmp_path: Path) -> None:
    from core.ensemble import create_ensemble
    from core.inference import load_run

    ensemble = create_ensemble([saved_run(tmp_path / "a", masked_config(radius=0.9)),
                                saved_run(tmp_path / "b", masked_config(radius=0.9))], tmp_path / "ensemble")
    top, model = load_run(ensemble)
    assert top.corner_mask == 0.9 and model.input_masks == [None, None]


@pytest.mark.parametrize("setting", [{"normalization": "per_image"}, {"shades_of_gray": True}])
def test_differing_masks_need_a_normalisation_that_ignores_the_corners(tmp_path: Path, setting: dict) -> None:
    """Per-image statistics and Shades-of-Gray read the corners: a member could not rebuild its masked input from
    an unmasked shared one, so such an ensemble is refused and nothing is written."""
    from core.ensemble import create_ensemble

    masked = saved_run(tmp_path / "masked", dataclasses.replace(masked_config(), **setting))
    plain = saved_run(tmp_path / "plain", dataclasses.replace(masked_config(), mask_corners=False, **setting))
    with pytest.raises(ValueError, match="different corner masks .* fixed per-channel normalisation"):
        create_ensemble([masked, plain], tmp_path / "ensemble")
    assert not (tmp_path / "ensemble").exists()
