"""Corner geometry, in one place: where the dermoscope's vignette ring sits in the model's view, and how dark it is.

The corner squares and the outer frame are where the CAM audit measures attention (``core.audit.explain``), where the
artifact interventions may paint on an image without a lesion mask (``core.audit.interventions``) and what the
dark-corner score reads (``core.audit.stress``); the inscribed circle/ellipse is what the corner mask keeps
(``core.transforms``). None of it needs a model, so importing it costs nothing (no pytorch-grad-cam on a Predictor's
import).
"""
from __future__ import annotations

import numpy as np

from core import transforms

CORNER_SIDE = 0.25    # each corner square is ¼ of the image side: a uniform CAM puts 4 · (¼)² = 0.25 there
BORDER_WIDTH = 0.125  # the outer frame is ⅛ of the side wide: a uniform CAM puts 1 − (¾)² = 0.4375 there
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as OpenCV's RGB→gray


def _side(n: int, fraction: float) -> int:
    return max(1, int(round(n * fraction)))


def corner_region(shape: tuple[int, int], side: float = CORNER_SIDE) -> np.ndarray:
    """Boolean mask of the four corner squares, each ``side`` of the image side (where the vignette ring sits)."""
    h, w = shape
    ch, cw = _side(h, side), _side(w, side)
    region = np.zeros(shape, dtype=bool)
    for rows in (slice(0, ch), slice(h - ch, h)):
        for cols in (slice(0, cw), slice(w - cw, w)):
            region[rows, cols] = True
    return region


def border_region(shape: tuple[int, int], width: float = BORDER_WIDTH) -> np.ndarray:
    """Boolean mask of the outer frame ``width`` of the side wide: attention on the image edge, corners included."""
    h, w = shape
    bh, bw = _side(h, width), _side(w, width)
    region = np.ones(shape, dtype=bool)
    region[bh:h - bh, bw:w - bw] = False
    return region


def ellipse_radius(shape: tuple[int, int]) -> np.ndarray:
    """Per pixel, the radius in units of the inscribed circle (square view) or ellipse (4:3 view): 1 on it, > 1 in
    the corners outside it, √2 at the very corner. The corner mask's own function (``core.transforms``), so a corner
    fill paints exactly the pixels a masked model never sees."""
    return transforms.ellipse_radius(shape[0], shape[1]).double().numpy()


def unmasked_region(shape: tuple[int, int]) -> np.ndarray:
    """Where an intervention may paint on an image without a lesion mask: the corner squares and the border."""
    return corner_region(shape) | border_region(shape)


def dark_corner_score(image: np.ndarray, skin_percentile: float = 75.0) -> float:
    """How much darker the corners are than the skin: 1 − mean luma of the four ¼-side corner squares ÷ the
    ``skin_percentile`` luma of the rest of the image, on the uint8 ``(H, W, 3)`` image as the model sees it.

    ~0 for an evenly lit image, → 1 for black corners (the dermoscope's vignette ring); negative when the corners are
    brighter. The reference is a bright percentile of the non-corner pixels, not the centre's mean, because the
    lesion sits in the centre: a centre reference made the score track lesion size (Spearman −0.44 with lesion area
    on 300 HAM10000 images). NaN for an image whose reference is black.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"dark_corner_score takes an (H, W, 3) image, got shape {image.shape}")
    luma = image.astype(np.float64) @ LUMA
    corners = corner_region(luma.shape)
    reference = np.percentile(luma[~corners], skin_percentile)
    if reference <= 0:
        return float("nan")
    return float(1.0 - luma[corners].mean() / reference)
