"""Preprocessing as in the reference recipe, on torchvision ``transforms.v2``.

Eval: centre-crop to a square → resize → (Shades-of-Gray) → normalise. With ``crop="frame"`` the first step keeps
the whole 4:3 dermoscopy frame instead of its centre square (portrait photos are turned to landscape first), so no
lesion edge or context is cut off. Train adds, between resize and normalise, random resized crop (scale 0.9–1.0),
random zoom, flips, rotation ±15° and colour jitter 0.1. Every geometric step
is a v2 transform, so a ``tv_tensors.Mask`` passed with its image gets exactly the same geometry (nearest-neighbour),
while the photometric steps leave masks alone.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# "imagenet": ImageNet mean/std; "per_image": zero mean, unit variance per image (the reference recipe's); or an
# explicit (mean, std) pair, e.g. what the pretrained weights were trained with (core.model.pretrained_config).
Normalization = Literal["imagenet", "per_image"] | tuple[tuple[float, ...], tuple[float, ...]]
# "square": the centred square (drops a quarter of a 4:3 photo, the reference recipe's); "frame": the whole frame.
Crop = Literal["square", "frame"]
CROPS = ("square", "frame")
CROP_DESCRIPTIONS = {"square": "centre square, resized", "frame": "whole 4:3 frame, resized"}
FRAME_ASPECT = 4 / 3  # HAM10000 / ISIC dermoscopy: 600×450
# What CornerMask paints outside the inscribed circle/ellipse: the ImageNet mean in uint8, ≈ 0 after normalisation.
CORNER_FILL = (124, 116, 104)


def view_shape(input_size: int, crop: Crop = "square") -> tuple[int, int]:
    """(height, width) of the model's view: ``input_size`` square, or ``input_size`` high and 4:3 wide (rounded to
    a multiple of 8), e.g. 144 → (144, 192)."""
    if crop == "square":
        return input_size, input_size
    if crop == "frame":
        return input_size, 8 * round(input_size * FRAME_ASPECT / 8)
    raise ValueError(f"unknown crop {crop!r}; choose one of {', '.join(CROPS)}")


def ellipse_radius(height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(H, W)``: per pixel, the radius in units of the circle (square view) or ellipse (4:3 view) inscribed in the
    view: 1 on it, > 1 in the corners, √2 at the very corner (as ``core.audit.corners.ellipse_radius``)."""
    v = (torch.arange(height, device=device) + 0.5) / height * 2 - 1
    u = (torch.arange(width, device=device) + 0.5) / width * 2 - 1
    return torch.sqrt(u[None, :] ** 2 + v[:, None] ** 2)


class _ImageOnly(v2.Transform):
    """Base for photometric steps: applied to images (and plain tensors), never to masks."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, (tv_tensors.Mask, tv_tensors.BoundingBoxes)):
            return inpt
        return tv_tensors.wrap(self.apply(inpt.as_subclass(torch.Tensor)), like=inpt) \
            if isinstance(inpt, tv_tensors.TVTensor) else self.apply(inpt)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CenterSquareCrop(v2.Transform):
    """Crop the largest centred square: 200×150 → 150×150, 600×450 → 450×450. Keeps the lesion, drops the sides."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"side": min(height, width)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.center_crop, inpt, output_size=[params["side"]] * 2)


class PerImageStandardize(_ImageOnly):
    """Zero mean, unit variance per image and channel (the reference recipe's normalisation)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        mean = image.mean(dim=(-2, -1), keepdim=True)
        std = image.std(dim=(-2, -1), keepdim=True)
        return (image - mean) / (std + self.eps)


class ShadesOfGray(_ImageOnly):
    """Colour constancy (Finlayson & Trezzi 2004): estimate the illuminant as the Minkowski p-norm mean of each
    channel and rescale channels so it becomes grey. Evens out the colour casts of different dermoscopes.
    Expects a float image in [0, 1]."""

    def __init__(self, power: float = 6.0) -> None:
        super().__init__()
        self.power = power

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        illuminant = image.clamp_min(0).pow(self.power).mean(dim=(-2, -1), keepdim=True).pow(1 / self.power)
        gain = illuminant.mean(dim=-3, keepdim=True) / illuminant.clamp_min(1e-6)
        return (image * gain).clamp(0, 1)


class CornerMask(_ImageOnly):
    """Everything outside ``radius`` of the inscribed circle/ellipse becomes one constant colour (:data:`CORNER_FILL`),
    so the corners carry nothing by construction: no vignette, ruler or dark skin there can move p. uint8 or float in
    [0, 1] alike (the fill is the same uint8 value either way, so a preloaded and an augmented image agree).

    ``fill`` gives the colour in the units of an already normalised tensor instead (``(3,)``: :data:`CORNER_FILL`
    through the run's normalisation), for a member of a mixed ensemble that masks its own copy of the shared input."""

    def __init__(self, radius: float = 1.0, fill: torch.Tensor | None = None) -> None:
        super().__init__()
        self.radius = radius
        self.fill = fill

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        outside = ellipse_radius(height, width, device=image.device) > self.radius
        if self.fill is not None:
            fill = self.fill.to(image.device, image.dtype).view(3, 1, 1)
        else:
            fill = torch.tensor(CORNER_FILL, device=image.device).view(3, 1, 1)
            fill = fill.to(image.dtype) if not image.is_floating_point() else fill.to(image.dtype) / 255
        return torch.where(outside, fill, image)


class CenterFrameCrop(v2.Transform):
    """Landscape, then the largest centred 4:3 rectangle: 200×150 and 600×450 stay whole, a 150×200 portrait is
    turned a quarter (a lesion has no up), a 16:9 phone photo loses its sides."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        portrait = height > width
        if portrait:
            height, width = width, height
        crop = (height, min(width, round(height * FRAME_ASPECT))) if width / height >= FRAME_ASPECT \
            else (min(height, round(width / FRAME_ASPECT)), width)
        return {"portrait": portrait, "crop": list(crop)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["portrait"]:
            inpt = self._call_kernel(F.rotate, inpt, angle=90.0, expand=True)
        return self._call_kernel(F.center_crop, inpt, output_size=params["crop"])


def resize_transform(input_size: int, crop: Crop = "square") -> v2.Compose:
    """Crop (``crop``) → resized to ``view_shape(input_size, crop)``, still uint8: what every path (train, eval,
    preload, predict, CAM overlays) starts with."""
    shape = view_shape(input_size, crop)  # refuses an unknown crop
    cropper = CenterSquareCrop() if crop == "square" else CenterFrameCrop()
    return v2.Compose([v2.ToImage(), cropper, v2.Resize(shape, antialias=True)])


def normalize_transform(normalization: Normalization = "imagenet", shades_of_gray: bool = False) -> v2.Compose:
    """uint8 → float in [0, 1] → (Shades-of-Gray) → normalised. Works on one image or a batch."""
    steps: list[v2.Transform] = [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.uint8,
                                             "others": None}, scale=True)]
    if shades_of_gray:
        steps.append(ShadesOfGray())
    if normalization == "imagenet":
        steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    elif normalization == "per_image":
        steps.append(PerImageStandardize())
    elif isinstance(normalization, (tuple, list)) and len(normalization) == 2:
        steps.append(v2.Normalize(list(normalization[0]), list(normalization[1])))
    else:
        raise ValueError(f"unknown normalization {normalization!r}; choose 'imagenet', 'per_image' or (mean, std)")
    return v2.Compose(steps)


def create_transform(input_size: int = 224, train: bool = False, normalization: Normalization = "imagenet",
                     shades_of_gray: bool = False, rotation: float = 15.0, jitter: float = 0.1,
                     crop_scale: tuple[float, float] = (0.9, 1.0), zoom: tuple[float, float] = (1.0, 1.1),
                     crop: Crop = "square") -> v2.Compose:
    """The pipeline for one image (PIL or uint8 tensor), optionally with its ``tv_tensors.Mask``.

    Returns a float tensor ``(3, *view_shape(input_size, crop))`` (and the mask, same geometry).
    """
    steps: list[v2.Transform] = [resize_transform(input_size, crop)]
    if train:
        height, width = view_shape(input_size, crop)
        steps += [
            v2.RandomResizedCrop((height, width), scale=crop_scale, ratio=(width / height,) * 2, antialias=True),
            v2.RandomAffine(degrees=0.0, scale=zoom),  # random zoom-in
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(rotation),
            v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
        ]
    return v2.Compose([*steps, normalize_transform(normalization, shades_of_gray)])
