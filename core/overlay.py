"""Pictures of explanations: a CAM blended over the image the model saw, and a lesion mask's outline.

Kept out of ``core.audit.explain`` (which computes and scores CAMs) so viewers need neither torch nor a model for them.
"""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image
from skimage.segmentation import find_boundaries


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 2-D map in [0, 1] (or uint8 0–255) resized bilinearly to ``size`` = (height, width), as float in [0, 1]."""
    values = np.asarray(values)
    scaled = values.astype(np.float32) / 255.0 if values.dtype == np.uint8 else values.astype(np.float32)
    image = Image.fromarray(np.clip(scaled, 0, 1)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def cam_overlay(image: np.ndarray, cam: np.ndarray, opacity: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """``image`` uint8 (H, W, 3) with ``cam`` (any size, resized to the image) blended in by ``colormap``.

    Opacity grows with the CAM so unattended skin stays visible. (pytorch-grad-cam's ``show_cam_on_image`` divides
    the blend by its maximum, which brightens the photo and changes its colours, so it is not used here.)
    """
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    heat = resize_map(cam, image.shape[:2])
    colours = colormaps[colormap](heat)[..., :3]
    alpha = opacity * (0.25 + 0.75 * heat)[..., None]
    blended = (1 - alpha) * (image.astype(np.float32) / 255.0) + alpha * colours
    return np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8)


def outline_mask(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0),
                 thickness: int = 2) -> np.ndarray:
    """``image`` with the boundary of the boolean ``mask`` (same height and width) drawn in ``colour``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape[:2]}")
    edge = find_boundaries(mask, mode="inner")
    for _ in range(thickness - 1):
        edge |= find_boundaries(edge, mode="outer")
    out = image.copy()
    out[edge] = colour
    return out
