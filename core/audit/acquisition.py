"""Acquisition edits: the same lesion as another camera, another compression or another light would have recorded it.

HAM10000's four sources differ sixty-fold in malignant share and also in camera, JPEG quality and colour, so a model
can learn to read the camera. The artifact interventions (``core.audit.interventions``) paint *things* beside the
lesion; these edits change *how the whole image was taken*, lesion included, as a clinic's camera does. Each edit is a
deterministic callable on one RGB uint8 image ``(H, W, 3)`` at its file's own resolution, applied before the run's
crop and resize: a camera acts at capture, before our pipeline ever sees the file.

Two kinds, read against each other (``train.py stress --suite acquisition``):

* ``neutral``: edits that change nothing a clinician would see (JPEG re-encoding at quality 90, a 2-pixel shift,
  brightness × 1.03). Their flip rate is the **floor**: decisions that flip under them were on a knife's edge.
* ``camera``: JPEG at lower qualities, down-then-up resampling, blur, warmer and cooler white balance, gamma, and the
  colour statistics of each HAM10000 source (:class:`ColourMatch`).
"""
from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from core import transforms
from core.images import open_rgb


class AcquisitionEdit:
    """Skeleton: ``apply`` edits one float RGB image in [0, 255]; ``__call__`` checks the input and returns uint8 of
    the same shape (rounded and clipped)."""

    name = "edit"
    kind = "camera"   # "neutral" (the floor) or "camera"
    what = ""         # one line for tables: what the edit does

    def apply(self, image: np.ndarray, source: str | None) -> np.ndarray:
        raise NotImplementedError

    def applies_to(self, source: str | None) -> bool:
        """Whether the edit changes an image of ``source`` (a source's own colours do not)."""
        return True

    def __call__(self, image: np.ndarray, source: str | None = None) -> np.ndarray:
        """``image`` edited; ``source`` is the image's own source (only a colour match needs it)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"acquisition edits take one uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
        out = self.apply(image, source)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8) if out.dtype != np.uint8 else out

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class Jpeg(AcquisitionEdit):
    """Re-encoded as JPEG (Pillow, 4:2:0 chroma subsampling as cameras do) at ``quality``."""

    def __init__(self, quality: int) -> None:
        self.quality = quality

    def apply(self, image, source):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=self.quality)
        return np.asarray(open_rgb(buffer.getvalue()))


class Resample(AcquisitionEdit):
    """A lower-resolution sensor: down by ``factor`` (area averaging), then back up (bilinear)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def apply(self, image, source):
        h, w = image.shape[:2]
        small = cv2.resize(image, (max(1, round(w * self.factor)), max(1, round(h * self.factor))),
                           interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


class Blur(AcquisitionEdit):
    """Slight defocus: a Gaussian of ``sigma`` pixels of the file."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def apply(self, image, source):
        return cv2.GaussianBlur(image, (0, 0), self.sigma, borderType=cv2.BORDER_REFLECT)


class Shift(AcquisitionEdit):
    """The frame moved by ``pixels`` right and down (edges replicated): the same photo, framed a hair differently."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels

    def apply(self, image, source):
        h, w = image.shape[:2]
        move = np.float32([[1, 0, self.pixels], [0, 1, self.pixels]])
        return cv2.warpAffine(image, move, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)


def _linear(image: np.ndarray) -> np.ndarray:
    """sRGB uint8 → linear light in [0, 1] (the sRGB transfer curve)."""
    x = image / 255.0
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _srgb(linear: np.ndarray) -> np.ndarray:
    x = np.clip(linear, 0, 1)
    return 255 * np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


class Exposure(AcquisitionEdit):
    """Per-channel gains in linear light (a von Kries white balance): equal gains change exposure, unequal ones the
    colour temperature."""

    def __init__(self, gains: tuple[float, float, float]) -> None:
        self.gains = gains

    def apply(self, image, source):
        return _srgb(_linear(image) * np.asarray(self.gains))


class Gamma(AcquisitionEdit):
    """Another tone curve: ``255 · (x / 255) ** gamma`` (< 1 brighter mid-tones, > 1 darker)."""

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma

    def apply(self, image, source):
        return 255 * (image / 255.0) ** self.gamma


@dataclass(frozen=True)
class ColourStats:
    """A source's typical colour: the medians over its images of each image's CIELAB mean and standard deviation
    inside the inscribed ellipse (the dermoscope's dark ring, where there is one, left out)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _lab(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)


def _inside(shape: tuple[int, ...]) -> np.ndarray:
    return (transforms.ellipse_radius(shape[0], shape[1]) <= 1).numpy()


def image_colour(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One image's CIELAB mean and standard deviation inside the inscribed ellipse."""
    pixels = _lab(image)[_inside(image.shape)]
    return pixels.mean(axis=0), pixels.std(axis=0)


def source_colours(images: Sequence[np.ndarray], sources: Sequence[str]) -> dict[str, ColourStats]:
    """:class:`ColourStats` of each source from its images (uint8 RGB, any size)."""
    per_image = [image_colour(image) for image in images]
    out = {}
    for source in sorted(set(sources)):
        mine = [stats for stats, s in zip(per_image, sources) if s == source]
        mean, std = (np.median([stats[i] for stats in mine], axis=0) for i in (0, 1))
        out[source] = ColourStats((float(mean[0]), float(mean[1]), float(mean[2])),
                                  (float(std[0]), float(std[1]), float(std[2])))
    return out


class ColourMatch(AcquisitionEdit):
    """The camera of another source: each CIELAB channel mapped from the image's own source's typical colour to the
    ``target`` source's, ``target.mean + (x − own.mean) · target.std / own.std`` (Reinhard et al. 2001, at the level
    of sources). What makes this image unlike its source's others (skin, light, the lesion) is kept; what its source
    shares is swapped. An image's own source leaves it as it is, so it is not scored (:meth:`applies_to`)."""

    def __init__(self, target: str, colours: Mapping[str, ColourStats]) -> None:
        if target not in colours:
            raise ValueError(f"no colour statistics for source {target!r} (have: {', '.join(colours) or 'none'})")
        self.target, self.colours = target, dict(colours)

    def applies_to(self, source):
        return source in self.colours and source != self.target  # an unknown source: nothing to map from

    def apply(self, image, source):
        if source not in self.colours:
            raise ValueError(f"a colour match needs the image's own source; {source!r} is not one of "
                             f"{', '.join(self.colours)}")
        own, target = self.colours[source], self.colours[self.target]
        lab = _lab(image)
        scale = np.asarray(target.std) / np.maximum(np.asarray(own.std), 1e-3)
        moved = (lab - np.asarray(own.mean)) * scale + np.asarray(target.mean)
        moved[..., 0] = np.clip(moved[..., 0], 0, 100)
        return 255 * cv2.cvtColor(moved.astype(np.float32), cv2.COLOR_Lab2RGB)

    def __repr__(self) -> str:
        return f"ColourMatch(target={self.target!r})"


def _edit(factory: Callable[[], AcquisitionEdit], name: str, kind: str, what: str) -> Callable[[], AcquisitionEdit]:
    def make() -> AcquisitionEdit:
        edit = factory()
        edit.name, edit.kind, edit.what = name, kind, what
        return edit
    return make


# The registry: name → factory. Neutral edits first: the floor every camera edit is read against.
EDITS: dict[str, Callable[[], AcquisitionEdit]] = {
    "jpeg_90": _edit(lambda: Jpeg(90), "jpeg_90", "neutral", "JPEG re-encoded at quality 90"),
    "shift_2px": _edit(lambda: Shift(2), "shift_2px", "neutral", "frame shifted 2 px right and down"),
    "brighter_3pct": _edit(lambda: Exposure((1.03, 1.03, 1.03)), "brighter_3pct", "neutral",
                           "exposure × 1.03 (linear light)"),
    "jpeg_50": _edit(lambda: Jpeg(50), "jpeg_50", "camera", "JPEG re-encoded at quality 50"),
    "jpeg_30": _edit(lambda: Jpeg(30), "jpeg_30", "camera", "JPEG re-encoded at quality 30"),
    "resample_half": _edit(lambda: Resample(0.5), "resample_half", "camera",
                           "half the resolution (area down, bilinear up)"),
    "blur": _edit(lambda: Blur(1.0), "blur", "camera", "Gaussian blur, σ = 1 px of the file"),
    "warmer": _edit(lambda: Exposure((1.12, 1.0, 0.88)), "warmer", "camera",
                    "warmer white balance (R × 1.12, B × 0.88, linear light)"),
    "cooler": _edit(lambda: Exposure((0.88, 1.0, 1.12)), "cooler", "camera",
                    "cooler white balance (R × 0.88, B × 1.12, linear light)"),
    "gamma_080": _edit(lambda: Gamma(0.8), "gamma_080", "camera", "tone curve γ = 0.8 (brighter mid-tones)"),
    "gamma_125": _edit(lambda: Gamma(1.25), "gamma_125", "camera", "tone curve γ = 1.25 (darker mid-tones)"),
}
NEUTRAL_EDITS = tuple(name for name, make in EDITS.items() if make().kind == "neutral")
COLOUR_PREFIX = "colour_"  # colour_<source>: one ColourMatch per source of the training split
FLOOR_FACTOR = 1.5  # a camera edit "holds" when it flips at most this many times the floor (issue #31's rule)


def create_edits(names: Sequence[str], colours: Mapping[str, ColourStats] | None = None) -> list[AcquisitionEdit]:
    """The edits ``names`` (registry names, or ``colour_<source>`` for a source in ``colours``); unknown names are
    refused with the choices."""
    colours = colours or {}
    out = []
    for name in names:
        if name in EDITS:
            out.append(EDITS[name]())
        elif name.startswith(COLOUR_PREFIX) and name[len(COLOUR_PREFIX):] in colours:
            source = name[len(COLOUR_PREFIX):]
            edit = ColourMatch(source, colours)
            edit.name, edit.what = name, f"colours of {source}'s camera (CIELAB mean/std of the source)"
            out.append(edit)
        else:
            choices = [*EDITS, *(COLOUR_PREFIX + s for s in colours)]
            raise ValueError(f"unknown acquisition edit {name!r}; choose from {', '.join(choices)}")
    return out


def default_edits(sources: Sequence[str]) -> list[str]:
    """Every registered edit, then one colour match per source."""
    return [*EDITS, *(COLOUR_PREFIX + s for s in sorted(set(sources)))]


def retaken_view(original: np.ndarray, edit: AcquisitionEdit | None, source: str | None,
                 resize: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """The photo re-taken with ``edit`` (None: as it is), then cropped and resized by the run's ``resize``
    (``core.transforms.resize_transform``): uint8 ``(3, H, W)``, the model's view. The one road from a file's
    pixels to a re-taken view, for the stress test, the Predictor's camera check and the dashboard."""
    pixels = original if edit is None else edit(original, source)
    return resize(Image.fromarray(pixels)).as_subclass(torch.Tensor)
