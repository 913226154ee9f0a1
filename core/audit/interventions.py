"""Image interventions on the model's view: paint an artifact, leave the lesion alone, and see whether p moves.

A CAM says where a model looks; an intervention says what it *uses* (Bissoto et al. 2019/2020; Winkler et al.,
JAMA Dermatol. 2019, on surgical ink). Each intervention is a small seeded callable in the manner of
pytorch-grad-cam's targets: :class:`Intervention` holds the skeleton — draw an overlay (alpha and colour), protect
the lesion, blend — and each artifact is a tiny subclass that only says what its overlay looks like.

Every intervention:

* works on uint8 batches ``(N, 3, H, W)`` as the model sees them (square or 4:3 frame views alike) and returns the
  same shape and dtype;
* is deterministic: image ``k`` draws from ``numpy.random.default_rng([seed, keys[k]])``, so an image gets the same
  artifact whatever batch it is in (pass stable keys, e.g. :func:`image_key` of the image id);
* is applied the same way to both classes and never changes a lesion pixel: where a lesion mask is given (bool
  ``(H, W)`` in the model's view) those pixels are kept; where there is none (an upload) it stays inside the four
  ¼-side corner squares and the ⅛-wide border, well away from a centred lesion.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence

import cv2
import numpy as np
import torch

from core.audit.corners import ellipse_radius, unmasked_region

Masks = Sequence[np.ndarray | None] | None


def image_key(image_id: str) -> int:
    """A stable per-image key (CRC-32 of the id): the same artifact for an image in every run and batch."""
    return zlib.crc32(str(image_id).encode())


def skin_colour(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The image's own skin colour, uint8 ``(3,)``: the per-channel median inside the inscribed circle/ellipse and
    outside the lesion; without a mask, of the ring 0.7–1 of the radius (the lesion sits in the centre)."""
    radius = ellipse_radius(image.shape[:2])
    region = (radius <= 1) & ~mask if mask is not None else (radius > 0.7) & (radius <= 1)
    if region.sum() < 16:  # a lesion filling the whole circle: take the ring anyway
        region = (radius > 0.7) & (radius <= 1)
    return np.median(image[region], axis=0).astype(np.uint8)


class Intervention:
    """Skeleton: ``overlay`` draws (alpha ``(H, W)`` in [0, 1], colour ``(3,)`` or ``(H, W, 3)``) for one image;
    ``__call__`` protects the lesion and blends, ``out = (1 − alpha)·image + alpha·colour``."""

    name = "intervention"
    touches = "corners"  # what the summary says it changes: "corners" or "border"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def overlay(self, image: np.ndarray, mask: np.ndarray | None,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, masks: Masks = None, keys: Sequence[int] | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"interventions take uint8 batches (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        n, _, h, w = images.shape
        masks = [None] * n if masks is None else list(masks)
        keys = list(range(n)) if keys is None else list(keys)
        if len(masks) != n or len(keys) != n:
            raise ValueError(f"{n} images but {len(masks)} masks and {len(keys)} keys")
        out = images.permute(0, 2, 3, 1).numpy().copy()
        free = unmasked_region((h, w))
        for k in range(n):
            mask = None if masks[k] is None else np.asarray(masks[k], dtype=bool)
            if mask is not None and mask.shape != (h, w):
                raise ValueError(f"mask {k} has shape {mask.shape}; the view is {(h, w)}")
            alpha, colour = self.overlay(out[k], mask, np.random.default_rng([self.seed, keys[k]]))
            alpha = np.where(mask if mask is not None else ~free, 0.0, np.clip(alpha, 0, 1))[..., None]
            out[k] = np.rint((1 - alpha) * out[k] + alpha * np.asarray(colour, dtype=np.float64)).astype(np.uint8)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class Vignette(Intervention):
    """The dermoscope's dark ring: darkness ramps up from ``radius`` (1 = the inscribed circle/ellipse) over
    ``softness`` (in radius units) to ``darkness`` (1 = black)."""

    name = "vignette"

    def __init__(self, radius: float = 0.95, softness: float = 0.12, darkness: float = 0.85,
                 colour: tuple[int, int, int] = (12, 8, 8), seed: int = 0) -> None:
        super().__init__(seed)
        self.radius, self.softness, self.darkness, self.colour = radius, softness, darkness, colour

    def overlay(self, image, mask, rng):
        ramp = np.clip((ellipse_radius(image.shape[:2]) - self.radius) / self.softness, 0, 1)
        return self.darkness * ramp * ramp * (3 - 2 * ramp), np.array(self.colour)  # smoothstep


class CornerFill(Intervention):
    """Everything outside the inscribed circle/ellipse becomes the image's own skin colour: the corners carry
    nothing, whatever they held (vignette, ruler, dark skin)."""

    name = "corner_fill"

    def overlay(self, image, mask, rng):
        return (ellipse_radius(image.shape[:2]) > 1).astype(np.float64), skin_colour(image, mask)


def _stroke(shape: tuple[int, int], points: np.ndarray, width: float) -> np.ndarray:
    """An anti-aliased polyline through ``points`` (in [-1, 1] view coordinates), as alpha in [0, 1]."""
    h, w = shape
    canvas = np.zeros(shape, dtype=np.uint8)
    pixels = np.stack([(points[:, 0] + 1) / 2 * w, (points[:, 1] + 1) / 2 * h], axis=1)
    cv2.polylines(canvas, [np.rint(pixels * 16).astype(np.int32)], False, 255, max(1, round(width * max(h, w))),
                  cv2.LINE_AA, shift=4)
    return canvas / 255.0


class InkMarking(Intervention):
    """A gentian-violet skin-marker stroke beside the lesion (Winkler et al. 2019): a slightly curved line in the
    outer ring of the view, at a random angle."""

    name = "ink"
    touches = "border"

    def __init__(self, colour: tuple[int, int, int] = (92, 42, 138), opacity: float = 0.85, seed: int = 0) -> None:
        super().__init__(seed)
        self.colour, self.opacity = colour, opacity

    def overlay(self, image, mask, rng):
        angle = rng.uniform(0, 2 * np.pi)
        t = np.linspace(-0.35, 0.35, 24)  # an arc of the circle of radius ~0.93: a marker line around the lesion
        radius = rng.uniform(0.9, 0.96) + 0.05 * t ** 2
        points = np.stack([radius * np.cos(angle + t), radius * np.sin(angle + t)], axis=1)
        return self.opacity * _stroke(image.shape[:2], points, 0.035), np.array(self.colour)


class Ruler(Intervention):
    """Scale ticks along one edge (which one is drawn), every 1/20 of the side, each fifth one longer: the
    dermoscope's ruler overlay."""

    name = "ruler"
    touches = "border"

    def overlay(self, image, mask, rng):
        h, w = image.shape[:2]
        edge = int(rng.integers(4))
        alpha = np.zeros((h, w))
        along = w if edge < 2 else h
        across = h if edge < 2 else w
        thick = max(1, round(0.012 * along))
        for i, position in enumerate(np.linspace(0.05, 0.95, 19)):
            length = max(2, round((0.09 if i % 5 == 4 else 0.05) * across))
            at = int(position * along)
            if edge == 0:      # top
                alpha[:length, at:at + thick] = 1
            elif edge == 1:    # bottom
                alpha[h - length:, at:at + thick] = 1
            elif edge == 2:    # left
                alpha[at:at + thick, :length] = 1
            else:              # right
                alpha[at:at + thick, w - length:] = 1
        return 0.9 * alpha, np.array((20, 20, 20))


class Hair(Intervention):
    """A few dark hairs: quadratic curves coming in over an edge of the view (kept off the lesion, or in the border
    without a mask)."""

    name = "hair"
    touches = "border"

    def __init__(self, count: tuple[int, int] = (3, 6), seed: int = 0) -> None:
        super().__init__(seed)
        self.count = count

    def overlay(self, image, mask, rng):
        alpha = np.zeros(image.shape[:2])
        t = np.linspace(0, 1, 40)[:, None]
        for _ in range(int(rng.integers(self.count[0], self.count[1] + 1))):
            start, end, bend = rng.uniform(-1.1, 1.1, (3, 2))
            start[rng.integers(2)] = rng.choice([-1.0, 1.0])  # hairs come in over an edge of the view
            points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t ** 2 * end
            alpha = np.maximum(alpha, _stroke(image.shape[:2], points, rng.uniform(0.006, 0.012)))
        return 0.9 * alpha, np.array((35, 25, 20))


# The registry: name → factory(seed). The three vignette strengths run from a faint ring that stays outside the
# inscribed circle to a black one that reaches into it (still never onto a masked lesion).
INTERVENTIONS: dict[str, Callable[[int], Intervention]] = {
    "vignette_light": lambda seed: Vignette(radius=1.0, softness=0.2, darkness=0.6, seed=seed),
    "vignette": lambda seed: Vignette(radius=0.95, softness=0.12, darkness=0.85, seed=seed),
    "vignette_strong": lambda seed: Vignette(radius=0.85, softness=0.1, darkness=1.0, seed=seed),
    "corner_fill": lambda seed: CornerFill(seed=seed),
    "ink": lambda seed: InkMarking(seed=seed),
    "ruler": lambda seed: Ruler(seed=seed),
    "hair": lambda seed: Hair(seed=seed),
}
CORNER_INTERVENTIONS = ("vignette_light", "vignette", "vignette_strong", "corner_fill")
# What the per-image corner-dependence flag (core.audit.stress) and the Predict page's corner check use: the corners
# covered with skin, and a dermoscope ring added.
CORNER_CHECK = ("corner_fill", "vignette")
DEFAULT_MIN_DELTA = 0.2  # |Δp| that counts as dependence without a flip: a fifth of the probability scale


def corner_dependent(p_clean: np.ndarray | float, p_checked: Mapping[str, np.ndarray | float], threshold: float,
                     min_delta: float = DEFAULT_MIN_DELTA) -> np.ndarray:
    """Per image: does any of the :data:`~core.audit.interventions.CORNER_CHECK` interventions flip the decision at
    ``threshold`` or move p by ``min_delta`` or more? One rule for the stress test, the Predictor and the pages."""
    clean = np.asarray(p_clean, dtype=float)
    flags = np.zeros(clean.shape, dtype=bool)
    for name in CORNER_CHECK:
        p = np.asarray(p_checked[name], dtype=float)
        flags |= ((p >= threshold) != (clean >= threshold)) | (np.abs(p - clean) >= min_delta)
    return flags


def corner_delta_p(p_clean: np.ndarray | float, p_checked: Mapping[str, np.ndarray | float]) -> np.ndarray:
    """Per image, the largest |Δp| over the :data:`CORNER_CHECK` interventions."""
    clean = np.asarray(p_clean, dtype=float)
    return np.max([np.abs(np.asarray(p_checked[name], dtype=float) - clean) for name in CORNER_CHECK], axis=0)


def create_intervention(name: str, seed: int = 0) -> Intervention:
    if name not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {name!r}; choose from {', '.join(INTERVENTIONS)}")
    return INTERVENTIONS[name](seed)
