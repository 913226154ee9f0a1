"""THE image loader: every format and colour mode to upright 8-bit RGB, and every hostile input (not an image,
truncated, a decompression bomb, too small) refused with a message naming it, before any pixel is decoded."""
from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.data import DataError

MAX_IMAGE_BYTES = 25 * 2**20           # 25 MB: dermoscopy photos are a few MB; bigger is not a photo we can use
# Pillow's own default (~90 MP): its bomb warning then never fires for an image we accept. Checked here as well,
# since Pillow's limit is a global anyone may raise or switch off.
MAX_IMAGE_PIXELS = 89_478_485
MIN_IMAGE_SIDE = 32                    # smaller holds no lesion detail (models see 160–224 px)
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")  # what Pillow may even try: no EPS/PSD/… parsers reached


class InvalidImage(DataError):
    """An input that is not a usable photo: not an image, truncated, empty, too small, or too large to decode safely.
    The message names the input and says which."""


def open_rgb(image: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """THE image loader (CLI, Predictor, dashboard, training): a path, bytes or PIL image → upright 8-bit RGB.

    Accepts JPEG, PNG, BMP, TIFF and WebP; applies the EXIF orientation. Size limits are checked before any pixel
    is decoded (file size, then the dimensions in the header), so a decompression bomb costs nothing.
    Colour modes become RGB by :func:`_to_rgb`. Every rejection is an :class:`InvalidImage` naming the input.
    """
    if isinstance(image, Image.Image):
        _check_dimensions(image.size, "PIL image")
        return _to_rgb(_decoded(lambda: ImageOps.exif_transpose(image), "PIL image", "image"), "PIL image")
    name = "uploaded bytes" if isinstance(image, bytes) else str(image)
    with _open_checked(image, name, "image") as opened:
        _check_dimensions(opened.size, name)
        upright = _decoded(lambda: ImageOps.exif_transpose(opened), name, "image")
    return _to_rgb(upright, name)


def open_mask(path: str | os.PathLike) -> np.ndarray:
    """A lesion mask as a boolean array (nonzero = lesion), under the same file-size and pixel limits as photos."""
    with _open_checked(path, str(path), "mask") as opened:
        _check_dimensions(opened.size, str(path), "mask", min_side=1)
        return np.asarray(_decoded(lambda: opened.convert("L"), str(path), "mask")) > 127


def _open_checked(source: str | os.PathLike | bytes, name: str, what: str) -> Image.Image:
    """Pillow's lazy open (header only) after the file-size check; nothing is decoded yet."""
    if isinstance(source, bytes):
        size = len(source)
    else:
        try:
            size = os.stat(source).st_size
        except OSError as err:
            raise InvalidImage(f"{name}: cannot read {what}: {err.strerror or err}") from err
        if not Path(source).is_file():
            raise InvalidImage(f"{name}: cannot read {what}: not a file")
    if size == 0:
        raise InvalidImage(f"{name}: cannot read {what}: empty file (0 bytes)")
    if size > MAX_IMAGE_BYTES:
        raise InvalidImage(f"{name}: cannot read {what}: file is {size / 2**20:.1f} MB, over the "
                           f"{MAX_IMAGE_BYTES // 2**20} MB limit")
    return _decoded(lambda: Image.open(io.BytesIO(source) if isinstance(source, bytes) else source,
                                       formats=IMAGE_FORMATS), name, what)


def _check_dimensions(size: tuple[int, int], name: str, what: str = "image", min_side: int = MIN_IMAGE_SIDE) -> None:
    """Header dimensions against the limits, before decoding."""
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidImage(f"{name}: cannot read {what}: {width}×{height} px is {width * height / 1e6:.0f} megapixels, "
                           f"over the {MAX_IMAGE_PIXELS / 1e6:.0f} MP limit (a decompression bomb?); not decoded")
    if min(width, height) < min_side:
        raise InvalidImage(f"{name}: cannot read {what}: {width}×{height} px is too small "
                           f"(at least {min_side} px a side)")


def _decoded(step: Callable[[], Image.Image], name: str, what: str) -> Image.Image:
    """Run one Pillow step on untrusted bytes. Decoders answer hostile input with a zoo of exception types
    (OSError, SyntaxError, struct.error, IndexError, …), so any of them means: this is not a usable image."""
    try:
        return step()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InvalidImage(f"{name}: cannot read {what}: too many pixels, a decompression bomb? ({err}); "
                           "not decoded") from err
    except UnidentifiedImageError as err:
        raise InvalidImage(f"{name}: cannot read {what}: not an image in a supported format "
                           f"({', '.join(IMAGE_FORMATS)})") from err
    except MemoryError as err:
        raise InvalidImage(f"{name}: cannot read {what}: not enough memory to decode it") from err
    except Exception as err:  # any type at all: see the docstring
        kind = "truncated" if "truncated" in str(err).lower() or isinstance(err, EOFError) else "corrupt"
        raise InvalidImage(f"{name}: cannot read {what}: {kind} image data ({type(err).__name__}: {err})") from err


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """8-bit RGB from any mode Pillow decodes.

    16-bit grayscale (``I;16*``, or ``I`` holding 16-bit values) is scaled by 1/257, so 65535 is white; Pillow's
    own conversion clips at 255 and turns most of such an image white. Transparent pixels (RGBA, LA, PA, or a
    palette/tRNS transparent colour) are composited onto white: the colour stored under alpha 0 is arbitrary,
    often black, and black borders are exactly the dermatoscope vignette the model must not key on. CMYK, palette,
    1-bit and grayscale go through Pillow's conversions.
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float64) / 257
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
    try:
        if image.has_transparency_data:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            white.alpha_composite(image.convert("RGBA"))
            image = white
        return image.convert("RGB")
    except ValueError as err:  # a mode Pillow decodes but cannot convert (e.g. LAB)
        raise InvalidImage(f"{name}: cannot read image: colour mode {image.mode} is not supported ({err})") from err
