"""Loss, sampler, batch augmentation, config and checkpoint files: the parts of the engine, one at a time."""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import checkpoint
from core.config import NOT_FLAGS, PredictionSettings, RunConfig, TrainConfig, add_config_arguments
from core.inference import FLIP_DIMS, Preprocess, predict_probabilities
from core.train.augment import BatchAugment
from core.train.losses import BinaryFocalLoss, create_loss, jensen_shannon
from core.train.sampler import BalancedSampler, balanced_probabilities
from core.train.training import consistency_weights, create_training_parts, training_loss
from core.transforms import ellipse_radius
from tests.helpers import l_shaped_mask

# --- focal loss ---------------------------------------------------------------------------------------------------

def test_focal_loss_matches_hand_computed_values() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    targets = torch.tensor([1.0, 1.0, 0.0, 0.0])
    alpha, gamma = 0.6, 2.0
    expected = []
    for z, y in zip(logits.tolist(), targets.tolist()):
        p = 1 / (1 + math.exp(-z))
        p_t, a_t = (p, alpha) if y == 1 else (1 - p, 1 - alpha)
        expected.append(-a_t * (1 - p_t) ** gamma * math.log(p_t))
    assert BinaryFocalLoss(alpha, gamma)(logits, targets).item() == pytest.approx(np.mean(expected), rel=1e-5)


def test_focal_loss_with_gamma_zero_is_weighted_bce() -> None:
    logits, targets = torch.randn(50), (torch.rand(50) > 0.5).float()
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert BinaryFocalLoss(alpha=0.5, gamma=0.0)(logits, targets).item() == pytest.approx(0.5 * bce.item(), rel=1e-5)


def test_plain_bce_takes_the_binary_heads_column_of_logits() -> None:
    logits, targets = torch.randn(6, 1), (torch.rand(6) > 0.5).float()  # what the binary head and the labels are
    expected = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], targets)
    assert create_loss("bce")(logits, targets).item() == pytest.approx(expected.item())


def test_focal_loss_is_stable_for_extreme_logits() -> None:
    loss = BinaryFocalLoss()(torch.tensor([80.0, -80.0]), torch.tensor([0.0, 1.0]))
    assert torch.isfinite(loss) and loss > 10


def test_unknown_loss() -> None:
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        create_loss("hinge")


# --- balanced sampler ---------------------------------------------------------------------------------------------

def test_sampler_draws_sixty_forty() -> None:
    labels = np.r_[np.ones(195), np.zeros(805)]
    draws = np.array(list(BalancedSampler(labels, 0.4, num_samples=20_000, seed=1)))
    assert labels[draws].mean() == pytest.approx(0.4, abs=0.015)


def test_sampler_is_seeded_per_epoch_and_shards_across_ranks() -> None:
    labels = (np.arange(300) % 5 == 0).astype(int)
    full = BalancedSampler(labels, seed=3)
    full.set_epoch(2)
    order = list(full)
    shards = []
    for rank in range(2):
        part = BalancedSampler(labels, seed=3, rank=rank, world_size=2)
        part.set_epoch(2)
        shards.append(list(part))
    assert shards[0] == order[0::2] and shards[1] == order[1::2] and len(shards[0]) == len(part)
    full.set_epoch(3)
    assert list(full) != order


def test_source_balanced_sampling_gives_every_source_the_same_malignant_share() -> None:
    """HAM10000's sources hold 0.7 % to 41 % malignant images; balanced within each, the source no longer tells the
    label, and each source keeps its share of the draws."""
    rng = np.random.default_rng(0)
    sources = np.repeat(["molemax", "rosendahl", "modern"], [600, 300, 100])
    labels = np.r_[rng.random(600) < 0.01, rng.random(300) < 0.41, rng.random(100) < 0.27].astype(int)
    labels[0] = 1  # at least one malignant MoleMax image
    draws = np.array(list(BalancedSampler(labels, 0.4, num_samples=60_000, seed=1, groups=sources)))
    for source, share in (("molemax", 0.6), ("rosendahl", 0.3), ("modern", 0.1)):
        mine = sources[draws] == source
        assert mine.mean() == pytest.approx(share, abs=0.01), source
        assert labels[draws][mine].mean() == pytest.approx(0.4, abs=0.02), source
    plain = np.array(list(BalancedSampler(labels, 0.4, num_samples=60_000, seed=1)))
    assert labels[plain][sources[plain] == "molemax"].mean() < 0.1  # without groups, MoleMax stays benign
    one_class = np.r_[np.zeros(5), np.ones(5)].astype(int)
    probabilities = balanced_probabilities(one_class, 0.4, np.r_[["a"] * 5, ["b"] * 5])
    assert probabilities[:5].sum() == pytest.approx(0.5)  # a source with one class keeps its share on it
    with pytest.raises(ValueError, match="10 labels but 9 groups"):
        balanced_probabilities(one_class, 0.4, np.zeros(9))


def test_sampler_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        BalancedSampler(np.zeros(10))


# --- batch augmentation -------------------------------------------------------------------------------------------

def test_camera_augmentation_retakes_its_share_and_leaves_the_rest() -> None:
    """Off, the random stream and the output are as before; on, about its share of the images change, within
    [0, 1], seeded; all of them at p = 1."""
    x = torch.rand(200, 3, 48, 48)
    plain = BatchAugment()(x, torch.Generator().manual_seed(0))
    assert torch.equal(BatchAugment(camera=0.0)(x, torch.Generator().manual_seed(0)), plain)
    geometry_only = dict(rotation=0.0, jitter=0.0, crop_scale=(1.0, 1.0), zoom=(1.0, 1.0))
    base = BatchAugment(**geometry_only)(x, torch.Generator().manual_seed(1))
    edited = BatchAugment(**geometry_only, camera=0.5)(x, torch.Generator().manual_seed(1))
    changed = (edited - base).abs().flatten(1).amax(1) > 1e-4
    assert 0.35 < changed.float().mean() < 0.65
    assert edited.min() >= 0 and edited.max() <= 1
    assert torch.equal(edited, BatchAugment(**geometry_only, camera=0.5)(x, torch.Generator().manual_seed(1)))
    everything = BatchAugment(**geometry_only, camera=1.0)(x, torch.Generator().manual_seed(2))
    assert ((everything - BatchAugment(**geometry_only)(x, torch.Generator().manual_seed(2))).abs()
            .flatten(1).amax(1) > 1e-4).all()


def test_batch_augment_draws_per_sample_and_is_seeded() -> None:
    x = torch.rand(1, 3, 64, 64).repeat(6, 1, 1, 1)
    augment = BatchAugment()
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert all(not torch.equal(a[0], a[k]) for k in range(1, 6))  # each sample its own draw


def test_batch_augment_geometry_is_a_mild_similarity() -> None:
    """The L-shaped figure survives: area within the zoom/crop range, never flipped into noise."""
    shape = torch.from_numpy(l_shaped_mask(96, 96)).float()
    x = torch.stack([shape, torch.zeros_like(shape), torch.zeros_like(shape)]).unsqueeze(0).repeat(64, 1, 1, 1)
    out = BatchAugment(jitter=0.0)(x, torch.Generator().manual_seed(1))
    ratio = (out[:, 0] > 0.5).float().mean(dim=(1, 2)) / shape.mean()
    # area grows by 1/scale × zoom² ∈ [1, 1/0.9 × 1.21 ≈ 1.34] (a bit lost to the frame edge)
    assert ratio.min() > 0.85 and ratio.max() < 1.45
    flipped_x = torch.from_numpy(l_shaped_mask(96, 96)[:, ::-1].copy()).float()
    overlap = lambda m: ((out[:, 0] > 0.5) & (m > 0.5)).float().sum(dim=(1, 2))  # noqa: E731
    assert (overlap(flipped_x) > overlap(shape)).any() and (overlap(shape) > overlap(flipped_x)).any()


def test_corner_artifacts_come_at_their_rate_and_leave_the_rest_aligned() -> None:
    """Random vignettes / corner fills land on about ``p`` of the images (label-blind: each half of the batch,
    standing for a class, gets its share), change only the rim of the view, keep the geometry of the same seed
    exactly (so image and mask stay aligned) and repeat with the seed."""
    x = torch.rand(1, 3, 32, 48).repeat(1200, 1, 1, 1) * 0.5 + 0.5
    plain = BatchAugment(jitter=0.0)(x, torch.Generator().manual_seed(3))
    augment = BatchAugment(jitter=0.0, corner_artifacts=0.5)
    out = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(3)))
    changed = ((out - plain).abs() > 1e-3).flatten(1).any(1).float()
    for half in changed.chunk(2):
        assert abs(half.mean().item() - 0.5) < 0.06
    inner = ellipse_radius(32, 48) < 0.74  # the rings start at 0.75, the fills at 1: the lesion's place is kept
    assert torch.allclose(out[:, :, inner], plain[:, :, inner], atol=1e-5)  # (jitter's mean-centring rounds)
    assert (out[:, :, ~inner] <= plain[:, :, ~inner] + 1e-6).float().mean() > 0.9  # mostly darker rims
    assert BatchAugment(corner_artifacts=0.0)(x[:4], torch.Generator().manual_seed(3)).equal(
        BatchAugment()(x[:4], torch.Generator().manual_seed(3)))  # off: the old random stream, bit for bit


def test_ring_only_artifacts_reach_inside_the_circle_from_their_start_radius() -> None:
    """``fill_share=0`` (for masked runs, where a fill changes nothing the model sees) gives only rings, and a ring
    never darkens inside its ``ring_start`` range's lower end but does inside the circle above it."""
    x = torch.full((400, 3, 40, 40), 0.8)
    plain = BatchAugment(jitter=0.0)(x, torch.Generator().manual_seed(5))
    out = BatchAugment(jitter=0.0, corner_artifacts=1.0, ring_start=(0.6, 0.9), fill_share=0.0)(
        x, torch.Generator().manual_seed(5))
    radius = ellipse_radius(40, 40)
    inner, band = radius < 0.59, (radius > 0.92) & (radius <= 1)
    assert torch.allclose(out[:, :, inner], plain[:, :, inner], atol=1e-5)
    darker_in_band = (out[:, :, band] < plain[:, :, band] - 0.05).flatten(1).any(1)
    assert darker_in_band.all()  # every image got a ring, and every ring starts inside the circle
    # a fill (the skin colour outside the circle) would leave the band untouched: none at fill_share 0


def test_paired_augmentation_differs_only_by_the_corner_artifact() -> None:
    """The consistency loss's pairs: the same crop, flips, rotation and colour jitter, with a ring or fill on every
    twin and nothing else changed; the unpaired stream is untouched and a seed repeats."""
    x = torch.rand(1, 3, 32, 48).repeat(300, 1, 1, 1) * 0.5 + 0.5
    augment = BatchAugment(jitter=0.1)
    clean, twin = augment(x, torch.Generator().manual_seed(4), twins=("corner",))
    again = augment(x, torch.Generator().manual_seed(4), twins=("corner",))
    assert torch.equal(clean, again[0]) and torch.equal(twin, again[1])
    inner = ellipse_radius(32, 48) < 0.74
    # jitter's contrast step centres on the whole image's mean, which the artifact moves: a small shift only
    assert (clean[:, :, inner] - twin[:, :, inner]).abs().max() < 0.05
    assert ((clean - twin).abs() > 0.05).flatten(1).any(1).all()  # every twin carries an artifact
    plain = augment(x, torch.Generator().manual_seed(4))
    assert not torch.equal(plain, clean)  # the twin's draws come before the jitter's...
    assert torch.equal(plain, BatchAugment(jitter=0.1)(x, torch.Generator().manual_seed(4)))  # ...unpaired as ever


def test_gaussian_blur_gives_each_image_its_own_sigma() -> None:
    """The batched blur equals blurring each image alone with a plain separable kernel of its σ."""
    from core.train.augment import gaussian_blur

    images, sigma = torch.rand(3, 3, 20, 24), torch.tensor([0.0, 0.6, 1.2])
    blurred = gaussian_blur(images, sigma)
    assert torch.allclose(blurred[0], images[0], atol=1e-6)  # σ 0: unchanged
    for i in (1, 2):
        x = torch.arange(-4, 5, dtype=torch.float32)
        k = torch.exp(-x ** 2 / (2 * float(sigma[i]) ** 2))
        k = k / k.sum()
        one = F.pad(images[i:i + 1], (4, 4, 0, 0), mode="reflect")
        one = F.conv2d(one, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
        one = F.conv2d(F.pad(one, (0, 0, 4, 4), mode="reflect"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
        assert torch.allclose(blurred[i], one[0], atol=1e-5)


def test_camera_twin_differs_by_a_camera_edit_and_keeps_the_corner_twin() -> None:
    """A camera twin shares the crop, flips and jitter with its clean image and differs by a re-take (resolution,
    blur, tone curve, white balance) over the whole frame, corners included; asking for both twins returns both,
    each with its own edit only."""
    x = torch.rand(64, 3, 32, 32)
    augment = BatchAugment(jitter=0.1)
    clean, camera = augment(x, torch.Generator().manual_seed(5), twins=("camera",))
    assert clean.shape == camera.shape == x.shape
    differs = (clean - camera).abs().flatten(1).mean(1)
    assert (differs > 0.005).all()  # every image re-taken
    inner = ellipse_radius(32, 32) < 0.5
    assert ((clean[:, :, inner] - camera[:, :, inner]).abs().flatten(1).mean(1) > 0.005).all()  # the lesion too
    same = x[:1].repeat(16, 1, 1, 1)  # one image sixteen times: each copy gets its own tone, balance, size and blur
    retaken = BatchAugment(rotation=0, jitter=0, crop_scale=(1, 1), zoom=(1, 1), camera=1.0)(same, torch.Generator()
                                                                                            .manual_seed(7))
    assert len({round(float(v), 4) for v in retaken.mean(dim=(1, 2, 3))}) == 16
    both, corner, camera_too = augment(x, torch.Generator().manual_seed(6), twins=("corner", "camera"))
    centre = ellipse_radius(32, 32) < 0.74
    assert (both[:, :, centre] - corner[:, :, centre]).abs().max() < 0.05  # the corner twin: corners only
    assert ((both[:, :, inner] - camera_too[:, :, inner]).abs().flatten(1).mean(1) > 0.005).all()


@pytest.mark.parametrize("outputs", [1, 7])
def test_jensen_shannon_is_zero_for_equal_predictions_symmetric_and_bounded(outputs: int) -> None:
    a, b = torch.randn(16, outputs) * 3, torch.randn(16, outputs) * 3
    assert jensen_shannon(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert jensen_shannon(a, b).item() == pytest.approx(jensen_shannon(b, a).item(), rel=1e-5)
    assert 0 < jensen_shannon(a, b).item() < math.log(2)
    far = torch.full((4, outputs), 30.0), torch.full((4, outputs), -30.0)
    if outputs == 1:  # certain and opposite: the bound, not an overflow
        assert jensen_shannon(*far).item() == pytest.approx(math.log(2), rel=1e-3)


@pytest.mark.parametrize("kind", ["corner", "camera"])
def test_consistency_adds_its_weight_times_a_positive_divergence(kind: str) -> None:
    """loss(λ) = task loss on the clean images + λ·JS(clean, twin): linear in λ, with a positive slope when the
    edit moves the prediction. Refused beside mixup, whose blends have no unedited
    twin."""
    torch.manual_seed(0)
    cfg = RunConfig(pretrained=False, input_size=32, **{f"{kind}_consistency": 1.0})
    model, loss_fn, augment, preprocess = create_training_parts(cfg, torch.device("cpu"))
    model.eval()  # BatchNorm on running statistics and no dropout: the same pass for every λ
    with torch.no_grad():  # an untrained net barely reacts to a ring (JS ~1e-6, float32's noise on the loss)
        model.get_classifier().weight.mul_(100)
    images = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    targets = torch.tensor([0., 1., 0., 1.])

    def loss(weights: dict) -> float:
        return training_loss(model, loss_fn, augment, preprocess, images.clone(), targets, False,
                             torch.Generator().manual_seed(1), consistency=weights).item()

    by_weight = {lam: loss({kind: lam}) for lam in (0.5, 1.0, 2.0)}
    slope = by_weight[2.0] - by_weight[1.0]
    assert slope > 1e-4 and slope == pytest.approx(2 * (by_weight[1.0] - by_weight[0.5]), rel=1e-4)
    with pytest.raises(ValueError, match=f"{kind}_consistency.*mixup"):
        RunConfig(mixup=0.2, **{f"{kind}_consistency": 1.0})
    with pytest.raises(ValueError, match="mixup"):
        training_loss(model, loss_fn, augment, preprocess, images.clone(), targets, False, mixup_lam=0.5,
                      consistency={kind: 1.0})


def test_fine_tuning_starts_from_an_ensemble_member() -> None:
    from core.ensemble import init_weights
    from core.inference import load_run
    from core.model import model_from_config

    cfg, ensemble = load_run("models/default")
    first = Path("models/default") / cfg.ensemble[0]
    model = init_weights(model_from_config(RunConfig.from_yaml(first / "config.yaml")), first)
    expected = ensemble.members[0].state_dict()
    assert all(torch.equal(v.float(), expected[k].float()) for k, v in model.state_dict().items())
    with pytest.raises(checkpoint.CheckpointError, match="neither a trained run"):
        init_weights(model, "models/default/members/nobody")


# --- device placement -----------------------------------------------------------------------------------------------

META = torch.device("meta")  # a device other than the CPU, on any machine: stands in for the GPU CI does not have


@pytest.mark.parametrize("settings", [
    {"head": "binary"}, {"head": "dx"}, {"head": "dx", "loss": "bce", "mixup": 0.2},
    {"head": "binary", "loss": "bce", "normalization": "per_image", "shades_of_gray": True, "mixup": 0.2},
    {"head": "binary", "normalization": "imagenet", "channels_last": False},
    {"head": "dx", "corner_consistency": 1.0, "corner_artifacts": 0.5},
    {"head": "binary", "camera_consistency": 1.0, "corner_consistency": 1.0, "camera_augment": 0.5}])
def test_a_training_step_runs_wholly_on_another_device(settings: dict) -> None:
    """Every tensor a step uses follows the model to the training device: one left on the CPU fails here, not on
    the first GPU run."""
    cfg = RunConfig(pretrained=False, input_size=32, **settings)
    model, loss_fn, augment, preprocess = create_training_parts(cfg, META)
    outputs = 7 if cfg.head == "dx" else 1
    targets = torch.empty(4, outputs, device=META) if outputs > 1 else torch.empty(4, device=META)
    images = torch.empty(4, 3, 32, 32, dtype=torch.uint8, device=META)
    loss = training_loss(model, loss_fn, augment, preprocess, images, targets, cfg.amp,
                         mixup_lam=0.7 if cfg.mixup else None, consistency=consistency_weights(cfg))
    loss.backward()
    assert loss.device == META and all(p.grad is None or p.grad.device == META for p in model.parameters())


def test_a_loss_left_on_the_cpu_is_caught_on_another_device() -> None:
    cfg = RunConfig(pretrained=False, input_size=32, head="dx")
    model, _, augment, preprocess = create_training_parts(cfg, META)
    images = torch.empty(2, 3, 32, 32, dtype=torch.uint8, device=META)
    with pytest.raises(RuntimeError, match="device"):
        training_loss(model, create_loss(head="dx"), augment, preprocess, images, torch.empty(2, 7, device=META),
                      amp=False)


# --- config -------------------------------------------------------------------------------------------------------

def test_config_yaml_round_trip_and_flag_override(tmp_path: Path) -> None:
    cfg = RunConfig(epochs=7, zoom=[1.0, 1.2])
    cfg.to_yaml(tmp_path / "c.yaml")
    loaded = RunConfig.from_yaml(tmp_path / "c.yaml")
    assert loaded == cfg
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--lr", "0.001", "--tta-views", "2", "--train-limit", "64"])
    merged = loaded.override(args)
    assert (merged.lr, merged.tta_views, merged.train_limit, merged.epochs) == (0.001, 2, 64, 7)


def test_config_rejects_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config key\\(s\\) learning_rate"):
        RunConfig.from_yaml(tmp_path / "c.yaml")


def test_every_fit_flag_has_a_sentence_and_bad_choices_are_refused(capsys: pytest.CaptureFixture) -> None:
    """`train.py fit --help` explains each flag (its help text lives with the config field), and a choice outside
    a field's ``Literal`` is refused by argparse for a flag and by the config itself for a YAML file."""
    import train

    with pytest.raises(SystemExit):
        train.main(["fit", "--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(RunConfig):
        if f.name not in NOT_FLAGS:
            flag = "--" + f.name.replace("_", "-")
            entry = re.search(rf"^  {flag}( \S+)*\s+(.*?)(?=^  --|\Z)", help_text, flags=re.M | re.S)
            sentence = entry.group(2).split("(default")[0] if entry else ""
            assert len(re.findall(r"[A-Za-z]{2,}", sentence)) >= 3, f"{flag}: {sentence!r}"
    with pytest.raises(SystemExit):
        train.main(["fit", "--out", "x", "--crop", "circle"])
    assert "invalid choice: 'circle'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="head must be one of binary, dx, got 'softmax'"):
        RunConfig.from_dict({"head": "softmax"})


def test_configs_from_before_one_tta_setting_still_load() -> None:
    """Runs written with ``tta_flips`` (+ ``tta_views``, default 4) read as the one ``tta_views`` setting."""
    assert RunConfig.from_dict({"tta_flips": True, "tta_views": 2}).tta_views == 2
    assert RunConfig.from_dict({"tta_flips": True}).tta_views == 4
    assert RunConfig.from_dict({"tta_flips": False, "tta_views": 4}).tta_views == 1


def test_prediction_settings_are_not_training_settings() -> None:
    """A run's config is how it was trained plus how it predicts; the dashboard and prediction code name RunConfig,
    never a class called Train (issue 32)."""
    train = {f.name for f in dataclasses.fields(TrainConfig)}
    predict = {f.name for f in dataclasses.fields(PredictionSettings)}
    assert predict == {"tta_views", "eval_batch_size", "calibration"} and not train & predict
    assert {f.name for f in dataclasses.fields(RunConfig)} == train | predict
    assert not hasattr(TrainConfig(), "tta_views")
    with pytest.raises(ValueError, match="calibration must be two finite numbers"):
        RunConfig(calibration=[0.0, 1.0])
    from core.data import PROJECT_ROOT
    for folder in ("dashboard", "pages"):
        for path in (PROJECT_ROOT / folder).glob("*.py"):
            assert "TrainConfig" not in path.read_text(), path


def test_a_config_extends_another_and_its_own_settings_win(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("epochs: 8\nlr: 0.0003\nmodel: efficientnet_lite2\n")
    (tmp_path / "stage.yaml").write_text("extends: base.yaml\nepochs: 2\n")
    (tmp_path / "deeper").mkdir()
    (tmp_path / "deeper" / "next.yaml").write_text("extends: ../stage.yaml\nlr: 0.0001\n")
    cfg = RunConfig.from_yaml(tmp_path / "deeper" / "next.yaml")
    assert (cfg.model, cfg.epochs, cfg.lr) == ("efficientnet_lite2", 2, 0.0001)
    (tmp_path / "loop.yaml").write_text("extends: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ValueError, match="loops back"):
        RunConfig.from_yaml(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ValueError, match="nowhere.yaml does not exist"):
        RunConfig.from_yaml(tmp_path / "orphan.yaml")


@pytest.mark.parametrize("name", ["reference.yaml", "default.yaml"])
def test_shipped_configs_load(name: str) -> None:
    from core.data import PROJECT_ROOT
    RunConfig.from_yaml(PROJECT_ROOT / "configs" / name)


# --- checkpoint files ---------------------------------------------------------------------------------------------

def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(1))


def test_weights_round_trip_in_fp16(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    checkpoint.save_weights(model, tmp_path / "m.safetensors", dtype=torch.float16)
    other = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    checkpoint.load_weights(other, tmp_path / "m.safetensors")
    assert torch.allclose(other[0].weight, model[0].weight, atol=1e-3)
    assert other[1].num_batches_tracked.dtype == torch.long


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    checkpoint.save_weights(nn.Linear(4, 3), tmp_path / "m.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match=r"shape mismatch.*weight: file \(3, 4\) vs model \(2, 4\)"):
        checkpoint.load_weights(nn.Linear(4, 2), tmp_path / "m.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors file"):
        checkpoint.load_weights(nn.Linear(4, 3), tmp_path / "bad.safetensors")


def test_optimizer_state_round_trips_without_pickle(tmp_path: Path) -> None:
    model = nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
    tensors, meta = checkpoint.optimizer_to_tensors(optimizer)
    checkpoint.save_training_state(tmp_path / "last.safetensors", tensors, meta | {"epoch": 4})
    loaded, loaded_meta = checkpoint.load_training_state(tmp_path / "last.safetensors")
    fresh = torch.optim.AdamW(nn.Linear(4, 1).parameters(), lr=1e-2)
    checkpoint.optimizer_from_tensors(fresh, loaded, loaded_meta)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert loaded_meta["epoch"] == 4


# --- prediction with flip TTA ---------------------------------------------------------------------------------------

class _CountingNet(nn.Module):
    """A position-sensitive net (flips change its output) that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head, self.calls = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 1), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(nn.functional.adaptive_avg_pool2d(self.conv(x), 6).flatten(1))


@pytest.mark.parametrize("views", [1, 2, 4])
def test_tta_views_go_through_the_network_as_one_batch(views: int) -> None:
    torch.manual_seed(0)
    net, images = _CountingNet().eval(), torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    preprocess = Preprocess(RunConfig(normalization="imagenet"))
    probs = predict_probabilities(net, images, preprocess, torch.device("cpu"), batch_size=8, tta_views=views)
    assert net.calls == math.ceil(10 / max(1, 8 // views))  # one pass per chunk of images, all its views at once
    with torch.no_grad():
        x = preprocess(images)
        expected = torch.stack([torch.sigmoid(net(x.flip(d) if d else x)).view(-1) for d in FLIP_DIMS[:views]]).mean(0)
    np.testing.assert_allclose(probs, expected.double().numpy(), rtol=1e-5, atol=1e-6)
