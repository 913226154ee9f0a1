"""CPU time of the artifact stress test (``core.audit.stress.intervened_probabilities``: paint, then predict the clean
and every intervened copy with the run's TTA and calibration) on N test images, median of R repeats, and what that
makes for the whole 1,500-image test split. Decoding the images and masks is timed apart (done once per split).
``--suite acquisition`` times the acquisition stress test the same way (``core.audit.stress.edited_probabilities``:
every edit of ``train.py stress --suite acquisition`` on the file's pixels, then crop, resize and predict) and projects
it for its default sample of 500 images.

    python benchmarks/bench_stress.py --run models/default [--images 150] [--repeats 3] [--threads 2]
        [--interventions vignette vignette_strong corner_fill ink ruler] [--suite acquisition]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from core.audit.acquisition import create_edits, default_edits
from core.audit.interventions import INTERVENTIONS, image_key
from core.audit.stress import (
    ACQUISITION_LIMIT,
    edited_probabilities,
    intervened_probabilities,
    load_originals,
    run_scorer,
    training_colours,
)
from core.inference import model_view_masks
from core.run import load
from core.runs import model_label

TEST_IMAGES = 1500


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--interventions", nargs="+", choices=list(INTERVENTIONS),
                        default=["vignette", "vignette_strong", "corner_fill", "ink", "ruler"])
    parser.add_argument("--suite", choices=["artifacts", "acquisition"], default="artifacts")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.suite == "acquisition":
        return acquisition(args)
    run = load(args.run, "cpu")
    score, cfg = run_scorer(run), run.config
    frame = run.splits()["test"].head(args.images)
    start = time.perf_counter()
    images = run.load_images(frame["path"].tolist())
    masks = model_view_masks(frame["mask_path"].tolist(), cfg.input_size, cfg.crop)
    decode = time.perf_counter() - start
    keys = [image_key(i) for i in frame["image_id"]]
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        intervened_probabilities(score, images, masks, keys, args.interventions)
        times.append(time.perf_counter() - start)
    per_image = statistics.median(times) / len(frame)
    print(f"stress test, {model_label(cfg)} @ {cfg.input_size}px, {len(args.interventions)} interventions "
          f"({', '.join(args.interventions)}) + clean, {args.threads} threads, {len(frame)} images: median "
          f"{statistics.median(times):.1f} s over {args.repeats} repeats ({1000 * per_image:.0f} ms per image); "
          f"decoding images and masks {decode:.1f} s")
    print(f"projected for the {TEST_IMAGES:,} test images: {per_image * TEST_IMAGES / 60:.1f} min "
          f"+ {decode / len(frame) * TEST_IMAGES:.0f} s decoding")


def acquisition(args: argparse.Namespace) -> None:
    run = load(args.run, "cpu")
    frames = run.splits()
    colours = training_colours(frames["train"])
    edits = create_edits(default_edits(list(colours)), colours)
    frame = frames["test"].head(args.images)
    start = time.perf_counter()
    originals = load_originals(frame["path"].tolist())
    decode = time.perf_counter() - start
    sources = frame["source"].astype(str).tolist()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        edited_probabilities(run_scorer(run), originals, sources, edits, run.config)
        times.append(time.perf_counter() - start)
    per_image = statistics.median(times) / len(frame)
    print(f"acquisition stress test, {model_label(run.config)} @ {run.config.input_size}px, {len(edits)} edits + "
          f"clean, {args.threads} threads, {len(frame)} images: median {statistics.median(times):.1f} s over "
          f"{args.repeats} repeats ({1000 * per_image:.0f} ms per image); decoding {decode:.1f} s")
    print(f"projected for its {ACQUISITION_LIMIT} images: {per_image * ACQUISITION_LIMIT / 60:.1f} min "
          f"+ {decode / len(frame) * ACQUISITION_LIMIT:.0f} s decoding")


if __name__ == "__main__":
    main()
