"""CAMs and attention scores: the scores mean what they say on maps whose answer is known, the CAMs from the real
backbone are well-formed, deterministic, aligned with the input and leave nothing behind on the model, and deleting
the attended pixels moves the probability.

Real-model tests run at 97 px: with an odd size every stride-2 layer of EfficientNet-Lite sees an odd
input (97 → 49 → 25 → 13 → 7 → 4), so its sampling grid is mirror-symmetric and a mirror-symmetric network is
exactly mirror-equivariant. (At even sizes the grid shifts by a pixel under a flip, and stride-16 CAMs of even a
symmetric network correlate only ~0.5 with their mirror image.)
"""
from __future__ import annotations

import copy
import gc
import math
from collections.abc import Iterator

import numpy as np
import pytest
import timm
import torch
from torchvision import tv_tensors

from core.audit import corners, explain
from core.images import open_mask, open_rgb
from core.model import create_model
from core.transforms import resize_transform

S = 97
BLOB = (0.3, 0.72)  # off the diagonal and off both mid-lines: a transposed or mirrored CAM lands elsewhere


# ---------------------------------------------------------------- helpers

def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) → the [-1, 1] batch the EfficientNet-Lite package weights expect."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def scene(size: int, centre: tuple[float, float] | None = BLOB, seed: int = 0) -> np.ndarray:
    """Skin-coloured noise with a dark Gaussian 'lesion' at ``centre`` (row, col as fractions): uint8 (S, S, 3)."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    image = np.ones((size, size, 3)) * np.array([200.0, 150.0, 130.0])
    if centre is not None:
        blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * 0.08 ** 2))
        image *= 1 - 0.7 * blob[..., None]
    image += np.random.default_rng(seed).normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def disc(size: int, centre: tuple[float, float], radius: float = 0.2) -> np.ndarray:
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def point_head_at_blob(model: torch.nn.Module) -> torch.nn.Module:
    """Make the logit 'how much does this look like the blob scene, not the plain one', so the CAM has a right
    answer: the blob."""
    with torch.no_grad():
        def features(image: np.ndarray) -> torch.Tensor:
            return model.forward_head(model.forward_features(normalise(image[None])), pre_logits=True)[0]
        direction = features(scene(S)) - features(scene(S, None))
        model.classifier.weight.copy_(direction[None] / direction.norm())
        model.classifier.bias.zero_()
    return model


def hooks(model: torch.nn.Module) -> int:
    return sum(len(getattr(m, name)) for m in model.modules()
               for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def live_tensors() -> int:
    gc.collect()
    # type(obj), not isinstance: isinstance reads __class__, which warns on torch.distributed's deprecated proxies
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Intra-op threads fighting another process for the cores (a training run beside the tests) make each CAM call
    100x slower (3.7 s instead of 22 ms at 97 px on 2 busy cores); one thread is plenty for these small inputs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    torch.manual_seed(0)  # the fresh head's init
    return create_model("efficientnet_lite0", pretrained=True, num_outputs=1).eval()


@pytest.fixture(scope="module")
def blob_model(lite0: torch.nn.Module) -> torch.nn.Module:
    return point_head_at_blob(copy.deepcopy(lite0))


@pytest.fixture(scope="module")
def mirror_model(lite0: torch.nn.Module) -> torch.nn.Module:
    """lite0 with every kernel averaged with its left-right mirror: exactly equivariant to horizontal flips."""
    model = copy.deepcopy(lite0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
    return point_head_at_blob(model)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return normalise(np.stack([scene(S, BLOB, 1), scene(S, (0.7, 0.3), 2)]))


# ---------------------------------------------------------------- attention_scores on known maps

@pytest.mark.parametrize("size", [97, 160, 224])
def test_uniform_cam_puts_the_area_share_in_corners_and_border(size: int) -> None:
    scores = explain.attention_scores(np.ones((size, size), np.float32))
    assert scores["corner_fraction"] == pytest.approx(4 * corners.CORNER_SIDE ** 2, abs=0.01)
    assert scores["border_fraction"] == pytest.approx(1 - (1 - 2 * corners.BORDER_WIDTH) ** 2, abs=0.01)
    assert scores["corner_fraction"] == pytest.approx(0.25, abs=0.01)
    assert scores["border_fraction"] == pytest.approx(0.4375, abs=0.01)
    assert scores["flag"] is False


@pytest.mark.parametrize("corner", ["top_left", "top_right", "bottom_left", "bottom_right"])
def test_cam_in_one_corner_is_flagged(corner: str) -> None:
    cam = np.zeros((160, 160), np.float32)
    rows = slice(0, 15) if corner.startswith("top") else slice(145, 160)
    cols = slice(0, 15) if corner.endswith("left") else slice(145, 160)
    cam[rows, cols] = 1.0
    scores = explain.attention_scores(cam)
    assert scores["corner_fraction"] == pytest.approx(1.0)
    assert scores["border_fraction"] == pytest.approx(1.0)
    assert scores["flag"] is True


def test_centred_blob_is_not_flagged() -> None:
    yy, xx = np.mgrid[0:160, 0:160] - 79.5
    cam = np.exp(-(yy ** 2 + xx ** 2) / (2 * 16.0 ** 2)).astype(np.float32)
    scores = explain.attention_scores(cam)
    assert scores["corner_fraction"] < 0.01
    assert scores["border_fraction"] < 0.05
    assert scores["flag"] is False


def test_flag_rule_is_corner_fraction_at_least_the_threshold() -> None:
    cam = np.ones((8, 8), np.float32)  # corners are 2x2 squares: 16 of 64 pixels
    cam[corners.corner_region(cam.shape)] = 3.0  # 48 of 96 units of mass: exactly half
    scores = explain.attention_scores(cam)
    assert scores["corner_fraction"] == 0.5 and scores["flag"] is True
    assert explain.attention_scores(cam, corner_threshold=0.6)["flag"] is False
    assert explain.attention_scores(np.ones((8, 8)), corner_threshold=0.2)["flag"] is True


def test_mask_scores_on_a_half_image_lesion() -> None:
    """Lesion = left half; CAM 3 inside, 1 outside: ¾ of the mass inside, background mean a third of lesion mean."""
    mask = np.zeros((160, 160), bool)
    mask[:, :80] = True
    cam = np.where(mask, 0.75, 0.25).astype(np.float32)
    scores = explain.attention_scores(cam, mask)
    assert scores["outside_lesion_fraction"] == pytest.approx(0.25)
    assert scores["background_lesion_ratio"] == pytest.approx(1 / 3)
    # the lesion gets nothing, the background something: infinitely background-focused
    assert explain.attention_scores(np.where(mask, 0.0, 1.0), mask)["background_lesion_ratio"] == math.inf


@pytest.mark.parametrize("mask", [None, np.zeros((32, 32), bool), np.ones((32, 32), bool)],
                         ids=["no_mask", "empty", "full"])
def test_mask_scores_are_nan_without_an_inside_and_an_outside(mask: np.ndarray | None) -> None:
    scores = explain.attention_scores(np.random.default_rng(0).random((32, 32)), mask)
    assert math.isnan(scores["outside_lesion_fraction"]) and math.isnan(scores["background_lesion_ratio"])
    assert not math.isnan(scores["corner_fraction"])


def test_zero_cam_gives_nan_fractions_and_no_flag() -> None:
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    scores = explain.attention_scores(np.zeros((32, 32), np.float32), mask)
    assert scores["flag"] is False
    for key in ("corner_fraction", "border_fraction", "outside_lesion_fraction", "background_lesion_ratio"):
        assert math.isnan(scores[key]), key


def test_attention_scores_refuse_bad_shapes() -> None:
    with pytest.raises(ValueError, match="one CAM"):
        explain.attention_scores(np.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="mask shape"):
        explain.attention_scores(np.ones((8, 8)), np.ones((9, 9), bool))


# ---------------------------------------------------------------- dark_corner_score

def test_dark_corner_score_is_zero_for_an_evenly_lit_image() -> None:
    assert corners.dark_corner_score(np.full((160, 160, 3), 180, np.uint8)) == pytest.approx(0.0, abs=1e-9)
    # Noise only: the 75th-percentile reference sits a little above the mean.
    assert abs(corners.dark_corner_score(scene(160, None))) < 0.05


def test_dark_corner_score_is_high_for_a_vignette() -> None:
    image = np.full((160, 160, 3), 180, np.uint8)
    black_corners = image.copy()
    black_corners[corners.corner_region((160, 160))] = 0
    assert corners.dark_corner_score(black_corners) == pytest.approx(1.0)
    ring = image.copy()
    ring[~disc(160, (0.5, 0.5), radius=0.5)] = 0  # the dermoscope's circular field of view
    assert corners.dark_corner_score(ring) > 0.3
    brighter = image.copy()
    brighter[corners.corner_region((160, 160))] = 255
    assert corners.dark_corner_score(brighter) < 0
    assert math.isnan(corners.dark_corner_score(np.zeros((16, 16, 3), np.uint8)))


def test_dark_corner_score_ignores_a_dark_central_lesion() -> None:
    """The reference is the skin, so a lesion in the middle — small or large — leaves the score alone."""
    image = np.full((160, 160, 3), 180, np.uint8)
    small, large = image.copy(), image.copy()
    small[disc(160, (0.5, 0.5), radius=0.1)] = 40
    large[disc(160, (0.5, 0.5), radius=0.3)] = 40
    assert corners.dark_corner_score(small) == pytest.approx(0.0, abs=1e-9)
    assert corners.dark_corner_score(large) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- compute_cam on the real backbone

@pytest.mark.parametrize("method", list(explain.CAM_METHODS))
def test_cam_is_well_formed_and_deterministic(lite0: torch.nn.Module, method: str) -> None:
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    first = explain.compute_cam(lite0, x, method)
    second = explain.compute_cam(lite0, x, method)
    assert first.shape == (2, S, S) and first.dtype == np.float32
    assert np.isfinite(first).all() and first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("method", list(explain.CAM_METHODS))
def test_cam_of_a_mirrored_image_is_the_mirrored_cam(mirror_model: torch.nn.Module, method: str) -> None:
    """On an exactly flip-equivariant network, CAM(flip x) must equal flip(CAM x). The map is neither its own mirror
    image nor symmetric under a half turn (the blob is off-centre, off the diagonals), so an output left unflipped,
    transposed (then CAM(flip x) would be the *vertical* flip of CAM(x)) or shifted would fail."""
    x = normalise(scene(S)[None])
    cam, cam_of_flipped = explain.compute_cam(mirror_model, torch.cat([x, x.flip(-1)]), method)
    assert cam.max() > 0
    assert corr(cam_of_flipped, cam[:, ::-1]) > 0.99
    assert corr(cam, cam[:, ::-1]) < 0.5     # the check has teeth: not mirror-symmetric ...
    assert corr(cam, cam[::-1, ::-1]) < 0.5  # ... nor half-turn symmetric


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam"])
def test_cam_lands_on_the_object_the_logit_responds_to(blob_model: torch.nn.Module, inputs: torch.Tensor,
                                                       method: str) -> None:
    """With the head pointed at the blob, the CAM is brighter on the blob than where a transposed or mirrored map
    would put it. (Grad-CAM++ is left out: on these scenes its map is not reliably on the blob.)"""
    cams = explain.compute_cam(blob_model, inputs, method)
    for cam, (r, c) in zip(cams, [BLOB, (0.7, 0.3)]):
        on_blob = cam[disc(S, (r, c))].mean()
        elsewhere = max(cam[disc(S, p)].mean() for p in [(c, r), (1 - r, c), (r, 1 - c)])
        assert on_blob > 2 * elsewhere, (on_blob, elsewhere)


@pytest.mark.parametrize("method", list(explain.CAM_METHODS))
def test_cam_of_a_model_with_no_gradient_is_zero_not_nan(lite0: torch.nn.Module, method: str) -> None:
    flat = copy.deepcopy(lite0)
    with torch.no_grad():
        flat.classifier.weight.zero_()
    cams = explain.compute_cam(flat, normalise(scene(S)[None]), method)
    assert cams.shape == (1, S, S) and not np.isnan(cams).any() and (cams == 0).all()


def test_cam_works_from_no_grad_and_inference_mode_callers(lite0: torch.nn.Module) -> None:
    x = normalise(scene(S)[None])
    expected = explain.compute_cam(lite0, x)
    with torch.no_grad():
        np.testing.assert_array_equal(explain.compute_cam(lite0, x), expected)
    with torch.inference_mode():
        frozen = x.clone()
    np.testing.assert_array_equal(explain.compute_cam(lite0, frozen), expected)


def test_cam_leaves_no_hooks_gradients_or_memory_behind(lite0: torch.nn.Module) -> None:
    model = copy.deepcopy(lite0).train()
    x = normalise(scene(S)[None])
    assert hooks(model) == 0
    for _ in range(3):  # warm up allocator and library caches
        explain.compute_cam(model, x)
    tensors, rss = live_tensors(), rss_mb()
    for k in range(50):
        explain.compute_cam(model, x, list(explain.CAM_METHODS)[k % 4])
    assert hooks(model) == 0
    assert live_tensors() <= tensors
    assert rss_mb() - rss < 50
    assert model.training  # mode restored
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_hooks_are_released_when_the_forward_fails(lite0: torch.nn.Module) -> None:
    model = copy.deepcopy(lite0)
    with pytest.raises(RuntimeError):
        explain.compute_cam(model, torch.zeros(1, 4, S, S))  # wrong channel count: the stem conv raises
    assert hooks(model) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_method_is_refused(lite0: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="unknown CAM method"):
        explain.compute_cam(lite0, torch.zeros(1, 3, S, S), "scorecam")


# ---------------------------------------------------------------- deletion_change

@pytest.mark.parametrize("mode", ["blur", "remove"])
def test_deletion_change(blob_model: torch.nn.Module, inputs: torch.Tensor, mode: str) -> None:
    cams = explain.compute_cam(blob_model, inputs)
    none = explain.deletion_change(blob_model, inputs, cams, fraction=0.0, mode=mode)
    assert none.shape == (2,) and (none == 0).all()
    half = explain.deletion_change(blob_model, inputs, cams, fraction=0.5, mode=mode)
    assert half.shape == (2,) and np.isfinite(half).all()
    # erasing the blob the logit was built on lowers the probability (blurring a large soft blob leaves some of it)
    assert (half < 0).all() and half.min() < -0.05, half


def test_deletion_change_refuses_bad_arguments(lite0: torch.nn.Module) -> None:
    x, cams = torch.zeros(1, 3, 16, 16), np.zeros((1, 16, 16), np.float32)
    with pytest.raises(ValueError, match="mode"):
        explain.deletion_change(lite0, x, cams, mode="erase")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cams shape"):
        explain.deletion_change(lite0, x, cams[:, :8])


# ---------------------------------------------------------------- target_layer

def output_size(model: torch.nn.Module, module: torch.nn.Module, size: int) -> tuple[int, int]:
    shapes = []
    handle = module.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[-2:])))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        handle.remove()
    return shapes[0]


@pytest.mark.parametrize("size, cells", [(160, 10), (224, 14)])
def test_efficientnet_target_layer_is_the_stride_16_stage(lite0: torch.nn.Module, size: int, cells: int) -> None:
    layer = explain.target_layer(lite0)
    assert layer is lite0.blocks[4]
    assert output_size(lite0, layer, size) == (cells, cells)
    assert output_size(lite0, lite0.blocks[-1], size) == (cells // 2, cells // 2)  # the usual, coarser choice


def test_other_supported_architectures_get_their_stride_16_stage() -> None:
    convnext = create_model("convnext_tiny", pretrained=False)
    assert explain.target_layer(convnext) is convnext.stages[2]
    assert output_size(convnext, convnext.stages[2], 160) == (10, 10)
    b0 = create_model("efficientnet_b0", pretrained=False)
    assert explain.target_layer(b0) is b0.blocks[4]


def test_unsupported_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="no CAM target layer known for Sequential"):
        explain.target_layer(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()))
    with pytest.raises(ValueError, match="no CAM target layer known for ResNet"):
        explain.target_layer(timm.create_model("resnet18", pretrained=False, num_classes=1))


# ---------------------------------------------------------------- a real image and its mask

def test_real_image_mask_and_cam_share_the_model_view(ham, lite0: torch.nn.Module) -> None:
    """The lesion mask through the same crop + resize lies on the dark lesion of the resized image, and the scores
    come out finite."""
    row = ham[ham["mask_path"].notna()].iloc[0]
    resize = resize_transform(S)
    image = resize(open_rgb(row["path"])).permute(1, 2, 0).numpy()
    mask = resize(tv_tensors.Mask(torch.from_numpy(open_mask(row["mask_path"])).unsqueeze(0).to(torch.uint8)))
    mask = mask[0].numpy().astype(bool)
    assert image.shape == (S, S, 3) and mask.shape == (S, S) and 0 < mask.mean() < 1
    luma = image.astype(float) @ corners.LUMA
    assert luma[mask].mean() < luma[~mask].mean()
    cam = explain.compute_cam(lite0, normalise(np.ascontiguousarray(image)[None]))[0]
    scores = explain.attention_scores(cam, mask)
    assert 0 <= scores["corner_fraction"] <= 1 and 0 <= scores["outside_lesion_fraction"] <= 1
    assert np.isfinite(scores["background_lesion_ratio"])
    assert np.isfinite(corners.dark_corner_score(image))


def test_categories_choose_which_decision_is_explained(blob_model: torch.nn.Module, inputs: torch.Tensor) -> None:
    """Category 0 explains the benign direction (negated logit): on the blob model, whose logit grows with the
    blob, the malignant CAM sits on the blob and the benign one does not."""
    malignant = explain.compute_cam(blob_model, inputs, "gradcam", [1, 1])
    benign = explain.compute_cam(blob_model, inputs, "gradcam", [0, 0])
    assert not np.allclose(malignant, benign)
    np.testing.assert_array_equal(explain.compute_cam(blob_model, inputs, "gradcam"), malignant)  # default: 1
    with pytest.raises(ValueError, match="1 categories for 2 images"):
        explain.compute_cam(blob_model, inputs, "gradcam", [1])
