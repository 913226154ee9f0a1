"""Stand-ins for another clinic's camera, made from images we have: the same lesions re-encoded, recoloured or
resampled, and the run's predictions (and features) of a split under each, cached. ``benchmarks/site_rule.py`` and
``benchmarks/shift_check.py`` draw their site samples from these pools.

    python -m benchmarks.site_shifts --run models/default --split val --cache runs/.site_pools   # fill the cache
"""
from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from core import metrics
from core.images import open_rgb
from core.run import load
from core.transforms import resize_transform


def jpeg(image: Image.Image, quality: int = 40) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


def warmer(image: Image.Image) -> Image.Image:
    """Another white balance and tone curve: red up, blue down, gamma 1.2."""
    pixels = np.asarray(image, dtype=np.float64) / 255 * [1.12, 1.0, 0.85]
    return Image.fromarray((255 * pixels.clip(0, 1) ** 1.2).astype(np.uint8))


def resampled(image: Image.Image) -> Image.Image:
    """Half the resolution, then back: a softer sensor or a smaller original."""
    return image.resize((image.width // 2, image.height // 2), Image.BILINEAR).resize(image.size, Image.BILINEAR)


SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": lambda image: image,
    "jpeg40": jpeg,
    "warmer": warmer,
    "resampled": resampled,
    "camera": lambda image: jpeg(resampled(warmer(image)), 60),  # all three: another camera
}


def pool(run: Path, split: str, shift: str, cache: Path | None = None) -> dict:
    """The run's predictions of ``split`` with ``shift`` applied to every photo: ``frame`` (image_id, lesion_id,
    label, probability) and ``features`` (penultimate, style), from the cache when it has them."""
    path = None if cache is None else cache / f"{run.name}_{split}_{shift}.npz"
    frame_path = None if path is None else path.with_suffix(".csv")
    if path is not None and path.is_file() and frame_path.is_file():
        stored = np.load(path)
        return {"frame": pd.read_csv(frame_path, dtype={"image_id": str, "lesion_id": str}),
                "features": [stored["penultimate"], stored["style"]]}
    loaded = load(run)
    frame = loaded.splits()[split]
    resize = resize_transform(loaded.config.input_size, loaded.config.crop)
    images = torch.stack([resize(SHIFTS[shift](open_rgb(p))).as_subclass(torch.Tensor) for p in frame["path"]])
    start = time.perf_counter()
    predictions = loaded.predict(images, features=True, batch_size=loaded.config.eval_batch_size)
    probability, features = predictions.probability, predictions.features
    print(f"{split} / {shift}: {len(images)} images predicted in {time.perf_counter() - start:.0f} s", flush=True)
    out = frame[["image_id", "lesion_id", "label"]].assign(probability=probability)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, penultimate=features[0], style=features[1])
        out.to_csv(frame_path, index=False)
    return {"frame": out, "features": features}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--cache", type=Path, default=Path("runs/.site_pools"))
    args = parser.parse_args(argv)
    for shift in args.shifts:
        frame = pool(args.run, args.split, shift, args.cache)["frame"]
        print(f"{shift}: AUROC {metrics.auroc(frame['label'], frame['probability']):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
