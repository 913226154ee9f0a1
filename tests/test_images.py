"""The one image loader (``core.images.open_rgb``): every format and colour mode to upright RGB, every hostile input
rejected as ``InvalidImage`` with its reason, and a fuzz test over mutated JPEG/PNG bytes."""
from __future__ import annotations

import contextlib
import io
import re
import resource
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, PngImagePlugin

from core.data import PROJECT_ROOT
from core.images import MAX_IMAGE_PIXELS, InvalidImage, open_mask, open_rgb

W, H = 64, 48
LEFT, RIGHT = (200, 30, 40), (20, 120, 220)
WHITE = (255, 255, 255)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def halves(mode: str, left, right) -> Image.Image:
    """A W×H image of ``mode``: one value on the left half, another on the right."""
    image = Image.new(mode, (W, H), left)
    image.paste(right, (W // 2, 0, W, H))
    return image


def palette(transparent: bool) -> Image.Image:
    image = halves("P", 0, 1)
    image.putpalette([*LEFT, *RIGHT])
    if transparent:
        image.info["transparency"] = 1
    return image


# mode → (the image, expected RGB of its left and right halves)
MODES: dict[str, tuple[Callable[[], Image.Image], tuple, tuple]] = {
    "RGB": (lambda: halves("RGB", LEFT, RIGHT), LEFT, RIGHT),
    "L": (lambda: halves("L", 60, 200), (60,) * 3, (200,) * 3),
    "P": (lambda: palette(False), LEFT, RIGHT),
    "P+tRNS": (lambda: palette(True), LEFT, WHITE),  # the transparent palette entry becomes white
    "RGBA": (lambda: halves("RGBA", (*LEFT, 255), (0, 0, 0, 0)), LEFT, WHITE),
    "LA": (lambda: halves("LA", (60, 255), (0, 0)), (60,) * 3, WHITE),
    "CMYK": (lambda: halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 0)), (255, 0, 0), WHITE),
    # 16-bit: 0x4000 is a quarter of full scale, so dark grey; Pillow's own conversion would clip it to white
    "I;16": (lambda: halves("I;16", 0x4000, 0xFFFF), (64,) * 3, WHITE),
}
# Combinations a format stores in that very mode (so the conversion, not the encoder, is what is tested).
CASES = [("JPEG", "RGB"), ("PNG", "RGB"), ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB"),
         ("JPEG", "L"), ("PNG", "L"), ("BMP", "L"), ("TIFF", "L"),
         ("PNG", "P"), ("BMP", "P"), ("TIFF", "P"), ("PNG", "P+tRNS"),
         ("PNG", "RGBA"), ("TIFF", "RGBA"), ("WEBP", "RGBA"), ("PNG", "LA"), ("TIFF", "LA"),
         ("JPEG", "CMYK"), ("TIFF", "CMYK"), ("PNG", "I;16"), ("TIFF", "I;16")]


def half_means(rgb: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of the inner part of each half (away from the seam, where JPEG rings)."""
    pixels = np.asarray(rgb, dtype=np.float64)
    return pixels[8:-8, 4:W // 2 - 8].mean((0, 1)), pixels[8:-8, W // 2 + 8:-4].mean((0, 1))


@pytest.mark.parametrize("fmt, mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_formats_and_modes_become_rgb(fmt: str, mode: str, tmp_path: Path) -> None:
    make, left, right = MODES[mode]
    data = encode(make(), fmt)
    stored = Image.open(io.BytesIO(data))
    assert (stored.format, stored.mode) == (fmt, mode.split("+")[0])  # the file really holds that mode
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    for source in (path, data, Image.open(io.BytesIO(data))):
        rgb = open_rgb(source)
        assert rgb.mode == "RGB" and rgb.size == (W, H)
        tolerance = 8 if fmt in ("JPEG", "WEBP") else 1
        got_left, got_right = half_means(rgb)
        np.testing.assert_allclose(got_left, left, atol=tolerance)
        np.testing.assert_allclose(got_right, right, atol=tolerance)


def exif_rotated_jpeg() -> bytes:
    """Stored 64×48 landscape, left half red; EXIF orientation 6 says: show it turned 90° clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(halves("RGB", LEFT, RIGHT), "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_applied() -> None:
    data = exif_rotated_jpeg()
    for source in (data, Image.open(io.BytesIO(data))):
        upright = open_rgb(source)
        assert upright.size == (H, W)  # width and height swap
        pixels = np.asarray(upright, dtype=np.float64)
        np.testing.assert_allclose(pixels[4:W // 2 - 8, 8:-8].mean((0, 1)), LEFT, atol=8)  # the left half is on top
        np.testing.assert_allclose(pixels[W // 2 + 8:-4, 8:-8].mean((0, 1)), RIGHT, atol=8)


# --- rejections -----------------------------------------------------------------------------------------------------

def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR (with a correct CRC) claims ``width``×``height``: a decompression bomb's header."""
    png = encode(Image.new("L", (W, H)), "PNG")
    return png[:8] + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + png[33:]


def sparse_file(path: Path, size: int) -> Path:
    """A file of ``size`` bytes starting like a PNG, without writing them all."""
    with path.open("wb") as f:
        f.write(encode(Image.new("L", (W, H)), "PNG"))
        f.truncate(size)
    return path


def half(data: bytes) -> bytes:
    return data[:len(data) // 2]


def with_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    """``png`` with one more (well-framed) chunk right after IHDR."""
    return png[:33] + png_chunk(kind, body) + png[33:]


def put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


REJECTIONS: dict[str, tuple[Callable[[Path], object], str]] = {
    "text bytes": (lambda d: b"just some text, not an image at all" * 4, r"^uploaded bytes: .*not an image"),
    "text file": (lambda d: put(d / "notes.jpg", b"hello"), r"notes\.jpg: .*not an image"),
    "gif": (lambda d: encode(Image.new("RGB", (W, H)), "GIF"), r"not an image in a supported format \(JPEG, PNG"),
    "truncated jpeg": (lambda d: half(encode(halves("RGB", LEFT, RIGHT), "JPEG")), "truncated image data"),
    "truncated png": (lambda d: half(encode(Image.fromarray(np.random.default_rng(0).integers(
        0, 255, (H, W, 3), dtype=np.uint8)), "PNG")), "truncated image data"),
    "empty bytes": (lambda d: b"", r"empty file \(0 bytes\)"),
    "empty file": (lambda d: put(d / "empty.png", b""), r"empty\.png: .*empty file"),
    "missing file": (lambda d: d / "nowhere.jpg", r"nowhere\.jpg: .*No such file"),
    "folder": (lambda d: d, "not a file"),
    "too narrow": (lambda d: encode(Image.new("RGB", (31, 400)), "PNG"), r"31×400 px is too small \(at least 32"),
    "too small PIL image": (lambda d: Image.new("RGB", (100, 20)), r"PIL image: .*100×20 px is too small"),
    "file over 25 MB": (lambda d: sparse_file(d / "huge.png", 26 * 2**20), r"huge\.png: .*26\.0 MB, over the 25 MB"),
    "bytes over 25 MB": (lambda d: bytes(25 * 2**20 + 1), r"25\.0 MB, over the 25 MB limit"),
    "bomb header": (lambda d: png_claiming(20_000, 20_000), "decompression bomb"),
    # found by the fuzz test: Pillow raises SyntaxError from EXIF parsing, which used to escape
    "corrupt png exif": (lambda d: with_chunk(encode(halves("RGB", LEFT, RIGHT), "PNG"), b"eXIf", b"not TIFF"),
                         r"corrupt image data \(SyntaxError: not a TIFF file"),
}


@pytest.mark.parametrize("case", REJECTIONS)
def test_rejections_say_why(case: str, tmp_path: Path) -> None:
    make, message = REJECTIONS[case]
    start = time.perf_counter()
    with pytest.raises(InvalidImage, match=message):
        open_rgb(make(tmp_path))
    assert time.perf_counter() - start < 1


def test_truncation_is_never_silently_padded() -> None:
    import train  # noqa: F401 — everything the project imports must leave Pillow strict about truncation
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("pillow_limit", ["default", "switched off"])
def test_decompression_bomb_is_refused_without_decoding(pillow_limit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused from the header, whatever Pillow's own (global, changeable) limit says; nothing is decoded."""
    if pillow_limit == "switched off":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real_load(self))
    for width, height in ((20_000, 20_000), (10_000, 9_000)):  # far above, and just above, the limit
        assert width * height > MAX_IMAGE_PIXELS
        # Just above, Pillow itself only warns (and would go on to decode); the header check refuses.
        warns = pillow_limit == "default" and width * height <= 2 * MAX_IMAGE_PIXELS
        start = time.perf_counter()
        with pytest.raises(InvalidImage, match="decompression bomb"), \
                pytest.warns(Image.DecompressionBombWarning) if warns else contextlib.nullcontext():
            open_rgb(png_claiming(width, height))
        assert time.perf_counter() - start < 0.5
    assert not decoded


def test_unreadable_mask_is_named(tmp_path: Path) -> None:
    (tmp_path / "m_segmentation.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(InvalidImage, match=r"m_segmentation\.png: cannot read mask"):
        open_mask(tmp_path / "m_segmentation.png")


def test_every_photo_reader_goes_through_open_rgb() -> None:
    """One loader for CLI, training, Predictor and dashboard: nothing else may call ``Image.open`` on a photo."""
    sources = [PROJECT_ROOT / "train.py", *PROJECT_ROOT.glob("core/*.py"), *PROJECT_ROOT.glob("dashboard/*.py"),
               *PROJECT_ROOT.glob("pages/*.py")]
    offenders = [f"{path.relative_to(PROJECT_ROOT)}:{n}" for path in sources if path.name != "images.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"Image\.open\(", line)]
    assert not offenders, f"use core.images.open_rgb instead of Image.open in {offenders}"


# --- fuzzing --------------------------------------------------------------------------------------------------------

def seed_jpeg() -> bytes:
    return exif_rotated_jpeg()


def seed_png() -> bytes:
    """Small and compressible, so most mutations hit structure rather than pixel data: RGBA with text, EXIF, and a
    text chunk after the pixel data (read only when decoding finishes)."""
    ramp = np.linspace(0, 255, W * H * 4).astype(np.uint8).reshape(H, W, 4)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "fuzz seed")
    exif = Image.Exif()
    exif[0x0112] = 3
    png = encode(Image.fromarray(ramp, "RGBA"), "PNG", pnginfo=info, exif=exif.tobytes())
    end = png.rindex(b"IEND") - 4
    return png[:end] + png_chunk(b"tEXt", b"After\x00the pixels") + png[end:]


PNG_CHUNKS = [b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"eXIf", b"tRNS", b"PLTE", b"IDAT", b"IHDR", b"sRGB", b"gAMA",
              b"acTL", b"fcTL", b"IEND", b"abcD"]
JPEG_MARKERS = [0xE0, 0xE1, 0xE2, 0xEE, 0xFE, 0xDB, 0xC4, 0xDD, 0xC0, 0xC2, 0xDA]
EXIF_STARTS = [b"", b"Exif\x00\x00II*\x00\x08\x00\x00\x00", b"Exif\x00\x00MM\x00*\x00\x00\x00\x08"]


@st.composite
def chunk_for(draw: st.DrawFn, fmt: str) -> tuple[int, bytes]:
    """A well-framed chunk with hostile content, and where it goes: after PNG's IHDR / right after JPEG's SOI."""
    body = draw(st.sampled_from(EXIF_STARTS)) + draw(st.binary(max_size=300))
    if fmt == "PNG":
        return 33, png_chunk(draw(st.sampled_from(PNG_CHUNKS)), body)
    return 2, jpeg_segment(draw(st.sampled_from(JPEG_MARKERS)), body[:65_000])


@st.composite
def mutated(draw: st.DrawFn, fmt: str, seed: bytes) -> bytes:
    """Seed bytes under 1–4 mutations: bit flips, truncation, inserted or overwritten bytes, inserted chunks."""
    data = bytearray(seed)
    for op in draw(st.lists(st.sampled_from(["flip", "truncate", "insert", "overwrite", "chunk"]),
                            min_size=1, max_size=4)):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "overwrite":
            blob = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(blob)] = blob
        else:
            where, chunk = draw(chunk_for(fmt))
            data[where:where] = chunk
    return bytes(data)


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data", "ignore:Tag data larger than file", "ignore:Invalid APNG")
@pytest.mark.parametrize("fmt, seed", [("JPEG", seed_jpeg()), ("PNG", seed_png())], ids=["JPEG", "PNG"])
def test_fuzzed_bytes_only_ever_raise_invalid_image(fmt: str, seed: bytes) -> None:
    """200 mutated files each: ``InvalidImage`` or an RGB image, under 2 s a call, memory bounded and not leaking."""
    open_rgb(seed)  # the seed itself is fine (and first-use costs are paid before measuring)
    outcomes = {"decoded": 0, "rejected": 0}

    @settings(max_examples=200, deadline=2000, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mutated(fmt, seed))
    def one(data: bytes) -> None:
        start = time.perf_counter()
        try:
            assert open_rgb(data).mode == "RGB"
            outcomes["decoded"] += 1
        except InvalidImage:
            outcomes["rejected"] += 1
        assert time.perf_counter() - start < 2

    peak_before, rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_bytes()
    one()
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    # One decode may hold at most MAX_IMAGE_PIXELS RGBA pixels; nothing may accumulate across calls.
    assert peak_growth < MAX_IMAGE_PIXELS * 4 + 100 * 2**20
    assert rss_bytes() - rss_before < 64 * 2**20
    assert outcomes["rejected"] > 0 and outcomes["decoded"] > 0  # the mutations reach both outcomes
