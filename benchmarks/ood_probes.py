"""Images an OOD guard must not answer confidently on, made here (no download, no licensed data copied):

* ``photos``: scikit-image's sample pictures (astronaut, coffee, a cat, a rocket, a retina, a stained tissue, …);
* ``noise``, ``flat``: uniform noise and flat colours (skin tones among them);
* ``text``: rendered text screenshots;
* ``ham_altered`` (from given HAM images): heavy blur plus a colour shift, a dermoscopy photo made not-dermoscopic.
  Reported, never tuned to: it is unclear what the right answer for it is.

Every probe is an RGB ``PIL.Image``, the form the Predictor takes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "retina", "immunohistochemistry", "hubble_deep_field",
          "colorwheel", "camera", "coins", "horse", "page", "moon", "brick", "grass", "gravel", "clock", "text")
SKIN_TONES = ((224, 172, 150), (198, 134, 110), (141, 85, 60), (90, 56, 40))
TEXT = ("Patient notes: lesion on the left shoulder, 6 mm, follow-up in three months.",
        "def predict(image):\n    return model(image)", "ERROR 404 — page not found", "Lorem ipsum dolor sit amet")


def photos() -> dict[str, Image.Image]:
    from skimage import data

    out = {}
    for name in PHOTOS:
        array = getattr(data, name)()
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        out[name] = Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8))
    return out


def noise(n: int = 12, seed: int = 0) -> dict[str, Image.Image]:
    rng = np.random.default_rng(seed)
    return {f"noise_{k}": Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)) for k in range(n)}


def flat(seed: int = 0) -> dict[str, Image.Image]:
    rng = np.random.default_rng(seed)
    colours = [*SKIN_TONES, (0, 0, 0), (255, 255, 255), (128, 128, 128), *map(tuple, rng.integers(0, 256, (5, 3)))]
    return {f"flat_{k}": Image.new("RGB", (200, 150), tuple(int(c) for c in colour))
            for k, colour in enumerate(colours)}


def text() -> dict[str, Image.Image]:
    font = ImageFont.load_default()
    out = {}
    for k, line in enumerate(TEXT):
        image = Image.new("RGB", (400, 300), (250, 250, 250) if k % 2 == 0 else (30, 30, 40))
        draw = ImageDraw.Draw(image)
        for row in range(0, 300, 18):
            draw.text((10, row), line, fill=(20, 20, 20) if k % 2 == 0 else (220, 220, 220), font=font)
        out[f"text_{k}"] = image
    return out


def ham_altered(images: Sequence[Image.Image], names: Sequence[str]) -> dict[str, Image.Image]:
    """Gaussian blur of radius 8 and the colour channels rotated (R→G→B→R): no dermoscopic structure left."""
    out = {}
    for name, image in zip(names, images):
        array = np.asarray(image.convert("RGB").filter(ImageFilter.GaussianBlur(8)))
        out[f"altered_{name}"] = Image.fromarray(np.ascontiguousarray(array[..., [2, 0, 1]]))
    return out


def non_dermoscopic() -> dict[str, dict[str, Image.Image]]:
    """The probe sets that are unambiguously not dermoscopy, by kind."""
    return {"photos": photos(), "noise": noise(), "flat": flat(), "text": text()}
