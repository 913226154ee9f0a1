"""Preprocessing: shapes, normalisation, colour constancy, and image–mask alignment through every geometric step."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from core.config import RunConfig
from core.images import open_mask, open_rgb
from core.train.augment import BatchAugment
from core.transforms import (
    IMAGENET_MEAN,
    CenterFrameCrop,
    CenterSquareCrop,
    ShadesOfGray,
    create_transform,
    resize_transform,
    view_shape,
)
from tests.helpers import l_shaped_mask


def encode(mask: np.ndarray) -> tuple[Image.Image, tv_tensors.Mask]:
    """An image whose red channel *is* the mask (255 inside, 0 outside), and the mask itself."""
    rgb = np.zeros((*mask.shape, 3), dtype=np.uint8)
    rgb[..., 0] = mask * 255
    rgb[..., 1:] = 60
    return Image.fromarray(rgb), tv_tensors.Mask(torch.from_numpy(mask).unsqueeze(0).to(torch.uint8))


def iou(image: torch.Tensor, mask: torch.Tensor, channel: int = 0) -> float:
    """Overlap of the image channel that encodes the mask (thresholded half-way) with the mask tensor."""
    red = image[channel]
    inside = red > (red.max() + red.min()) / 2
    m = mask[0].bool()
    return float((inside & m).sum() / (inside | m).sum())


GEOMETRIC = {
    "centre crop": [CenterSquareCrop()],
    "resize": [CenterSquareCrop(), v2.Resize((224, 224), antialias=True)],
    "random resized crop": [v2.RandomResizedCrop(160, scale=(0.9, 1.0), ratio=(1.0, 1.0), antialias=True)],
    "zoom": [v2.RandomAffine(degrees=0.0, scale=(1.0, 1.1))],
    "horizontal flip": [v2.RandomHorizontalFlip(p=1.0)],
    "vertical flip": [v2.RandomVerticalFlip(p=1.0)],
    "rotation": [v2.RandomRotation(15)],
}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_each_geometric_step_keeps_mask_aligned(name: str, seed: int) -> None:
    image, mask = encode(l_shaped_mask())
    torch.manual_seed(seed)
    out_image, out_mask = v2.Compose([v2.ToImage(), *GEOMETRIC[name]])(image, mask)
    assert out_image.shape[-2:] == out_mask.shape[-2:]
    assert iou(out_image.float(), out_mask) > 0.9


@pytest.mark.parametrize("crop", ["square", "frame"])
@pytest.mark.parametrize("normalization", ["imagenet", "per_image"])
@pytest.mark.parametrize("shades_of_gray", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_full_training_pipeline_keeps_mask_aligned(normalization: str, shades_of_gray: bool, seed: int,
                                                   crop: str) -> None:
    image, mask = encode(l_shaped_mask())
    torch.manual_seed(seed)
    out_image, out_mask = create_transform(224, True, normalization, shades_of_gray, crop=crop)(image, mask)
    shape = view_shape(224, crop)
    assert out_image.shape == (3, *shape) and out_mask.shape == (1, *shape)
    assert set(out_mask.unique().tolist()) <= {0, 1}  # nearest-neighbour: still a binary mask
    assert iou(out_image, out_mask) > 0.9


def test_alignment_check_catches_a_misaligned_mask() -> None:
    """The check above can fail: flip the image alone and the overlap collapses."""
    image, mask = encode(l_shaped_mask())
    flipped = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(p=1.0)])(image)
    assert iou(flipped.float(), mask) < 0.5


@pytest.mark.parametrize("crop", ["square", "frame"])
def test_real_lesion_masks_follow_their_images(ham: pd.DataFrame, crop: str) -> None:
    """Real photos with their real (irregular) masks: the mask is burnt into the photo's blue channel, the rest of
    the photo kept, and after the random training geometry the burnt-in mask and the mask tensor must coincide.
    (Lesions under 10 % of the frame are left out: on a 20-pixel blob, resampling alone moves IoU by 0.1.)"""
    transform = create_transform(160, train=True, normalization="imagenet", crop=crop)
    checked = 0
    for k, row in enumerate(ham.iloc[::250].itertuples()):
        raw_mask = open_mask(row.mask_path)
        if not 0.1 < raw_mask.mean() < 0.9:
            continue
        photo = np.asarray(open_rgb(row.path)).copy()
        photo[..., 2] = raw_mask * 255
        torch.manual_seed(k)
        mask = tv_tensors.Mask(torch.from_numpy(raw_mask).unsqueeze(0).to(torch.uint8))
        image, out_mask = transform(Image.fromarray(photo), mask)
        assert iou(image, out_mask, channel=2) > 0.9, row.image_id
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("size", [(200, 150), (600, 450), (150, 200), (64, 64), (1920, 1080)])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("crop", "shape"), [("square", (160, 160)), ("frame", (160, 216))])
def test_any_input_size_gives_the_model_size(size: tuple[int, int], train: bool, crop: str,
                                             shape: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (200, 120, 100))
    assert create_transform(160, train=train, crop=crop)(image).shape == (3, *shape)


def test_view_shape_and_unknown_crops() -> None:
    assert view_shape(144, "frame") == (144, 192) and view_shape(224, "frame") == (224, 296)
    assert view_shape(160) == (160, 160)
    with pytest.raises(ValueError, match="unknown crop 'circle'; choose one of square, frame"):
        resize_transform(160, "circle")
    with pytest.raises(ValueError, match="crop must be one of square, frame, got 'wide'"):
        RunConfig(crop="wide")


def test_frame_crop_keeps_a_4_3_photo_whole_and_trims_wider_ones() -> None:
    columns = np.tile(np.arange(200, dtype=np.uint8), (150, 1))
    out = v2.Compose([v2.ToImage(), CenterFrameCrop()])(Image.fromarray(np.stack([columns] * 3, axis=2)))
    assert out.shape == (3, 150, 200) and out[0, 0, 0] == 0 and out[0, 0, -1] == 199  # nothing cut
    wide = np.tile(np.arange(240, dtype=np.uint8), (90, 1))  # 240×90 (8:3) → its centred 120×90
    out = v2.Compose([v2.ToImage(), CenterFrameCrop()])(Image.fromarray(np.stack([wide] * 3, axis=2)))
    assert out.shape == (3, 90, 120) and out[0, 0, 0] == 60 and out[0, 0, -1] == 179


def test_frame_crop_turns_a_portrait_photo_with_its_mask() -> None:
    """A 150×200 portrait becomes the 200×150 landscape it is a quarter-turn of, not a squashed or cut copy."""
    image, mask = encode(l_shaped_mask(200, 150))
    out_image, out_mask = v2.Compose([v2.ToImage(), CenterFrameCrop()])(image, mask)
    assert out_image.shape == (3, 150, 200) and out_mask.shape == (1, 150, 200)
    expected = torch.rot90(torch.from_numpy(np.array(image)).permute(2, 0, 1), 1, dims=(1, 2))
    assert torch.equal(out_image, expected) and iou(out_image.float(), out_mask) == 1.0


@pytest.mark.parametrize("shape", [(144, 192), (96, 96), (192, 144)])
def test_batch_rotation_turns_a_disc_into_itself_on_any_aspect(shape: tuple[int, int]) -> None:
    """A centred disc is rotation-invariant, so the batch augmentation's rotation (crop, zoom and jitter off) must
    leave it a disc. Without the aspect term in the affine map a 4:3 frame is sheared: IoU drops to 0.78–0.88."""
    h, w = shape
    yy, xx = torch.meshgrid(torch.arange(h) - h / 2 + 0.5, torch.arange(w) - w / 2 + 0.5, indexing="ij")
    disc = (yy ** 2 + xx ** 2) < (min(h, w) / 3) ** 2
    images = disc.float().expand(8, 3, h, w).contiguous()
    rotate_only = BatchAugment(rotation=45, jitter=0.0, crop_scale=(1, 1), zoom=(1, 1))
    out = rotate_only(images, torch.Generator().manual_seed(0))
    rotated = out[:, 0] > 0.5
    assert ((rotated & disc).sum((1, 2)) / (rotated | disc).sum((1, 2))).min() > 0.97


def test_centre_crop_keeps_the_centre_square() -> None:
    columns = np.tile(np.arange(200, dtype=np.uint8), (150, 1))
    image = np.stack([columns] * 3, axis=2)
    out = v2.Compose([v2.ToImage(), CenterSquareCrop()])(Image.fromarray(image))
    assert out.shape == (3, 150, 150) and out[0, 0, 0] == 25 and out[0, 0, -1] == 174


def test_eval_is_deterministic_train_is_random_but_seeded() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8))
    evaluate, train = create_transform(128), create_transform(128, train=True)
    assert torch.equal(evaluate(image), evaluate(image))
    torch.manual_seed(1)
    a = train(image)
    torch.manual_seed(1)
    assert torch.equal(a, train(image))
    assert not torch.equal(a, train(image))


def test_per_image_normalisation() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(30, 200, (150, 200, 3), dtype=np.uint8))
    out = create_transform(96, normalization="per_image")(image)
    assert torch.allclose(out.mean(dim=(1, 2)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(out.std(dim=(1, 2)), torch.ones(3), atol=1e-3)


def test_imagenet_normalisation() -> None:
    mean_colour = tuple(round(255 * m) for m in IMAGENET_MEAN)
    out = create_transform(96, normalization="imagenet")(Image.new("RGB", (200, 150), mean_colour))
    assert out.abs().max() < 0.02


def test_shades_of_gray_removes_a_colour_cast() -> None:
    rng = np.random.default_rng(0)
    grey = torch.from_numpy(rng.uniform(0.2, 0.7, (1, 64, 64))).float().expand(3, 64, 64)
    cast = grey * torch.tensor([1.3, 1.0, 0.7]).view(3, 1, 1)
    corrected = ShadesOfGray()(tv_tensors.Image(cast))
    illuminant = corrected.pow(6).mean(dim=(1, 2)).pow(1 / 6)
    assert (illuminant.max() - illuminant.min()) < 0.01 < (cast.max(dim=0).values - cast.min(dim=0).values).mean()


def test_photometric_steps_leave_masks_alone() -> None:
    mask = tv_tensors.Mask(torch.from_numpy(l_shaped_mask()).unsqueeze(0).to(torch.uint8))
    image = tv_tensors.Image(torch.rand(3, 150, 200))
    _, out = v2.Compose([ShadesOfGray(), v2.Normalize(IMAGENET_MEAN, (0.2, 0.2, 0.2))])(image, mask)
    assert torch.equal(out, mask)


def test_unknown_normalisation_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown normalization 'zscore'"):
        create_transform(normalization="zscore")
