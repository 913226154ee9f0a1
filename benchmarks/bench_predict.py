"""CPU latency of ``Predictor.predict`` on one 600×450 JPEG (the original HAM10000 resolution), median of N calls;
with ``--explain`` of ``predict(image, explain=True)`` (probability + Grad-CAM + attention scores); with
``--corner-check`` the corners-covered and vignette copies go through the network in the same batch; with
``--compile`` the model runs through ``torch.compile`` (Inductor), whose one-off compile time is reported apart.
A run with an embedding index (``train.py index``) also scores every image against it (OOD score, the 6 most
similar training cases), from the same forward pass; ``--no-ood`` leaves that out, to see what it costs.

    python benchmarks/bench_predict.py --run models/default [--explain] [--corner-check] [--no-ood] [--compile]
        [--threads 2] [--repeats 50]
"""
from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from core.data import read_ham10000
from core.predictor import Predictor
from core.runs import model_label


def original_size_jpeg() -> bytes:
    """A HAM10000 image brought back to the originals' 600×450, as JPEG bytes (decode cost included)."""
    path = read_ham10000()["path"].iloc[0]
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").resize((600, 450), Image.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--corner-check", action="store_true", help="also p with the corners covered / a vignette "
                                                                    "(what the Predict page shows)")
    parser.add_argument("--no-ood", action="store_true", help="skip the run's embedding index (OOD score, similar "
                                                               "cases)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (not with --explain: "
                                                               "Grad-CAM hooks need the eager modules)")
    args = parser.parse_args(argv)
    if args.compile and args.explain:
        parser.error("--compile and --explain do not go together: Grad-CAM hooks need the eager modules")
    torch.set_num_threads(args.threads)
    predictor = Predictor.load(args.run)
    if args.no_ood:
        predictor.ood = None
    jpeg = original_size_jpeg()
    if args.compile:
        predictor.model = torch.compile(predictor.model)
        start = time.perf_counter()
        predictor.predict(jpeg)
        print(f"torch.compile: first call {time.perf_counter() - start:.1f} s")
    for _ in range(5):
        predictor.predict(jpeg, explain=args.explain, corner_check=args.corner_check)  # warm-up: first calls allocate
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        predictor.predict(jpeg, explain=args.explain, corner_check=args.corner_check)
        times.append(1000 * (time.perf_counter() - start))
    cfg = predictor.config
    model = model_label(cfg)
    tta = f"{cfg.tta_views} flip views" if cfg.tta_views > 1 else "no TTA"
    compiled = ", torch.compile" if args.compile else ""
    ood = "with" if predictor.ood is not None else "without"
    print(f"Predictor.predict(explain={args.explain}, corner_check={args.corner_check}{compiled}), {ood} OOD index, "
          f"600x450 JPEG, {model} @ {cfg.input_size}px, {tta}, "
          f"{args.threads} threads: median {statistics.median(times):.1f} ms, "
          f"p90 {sorted(times)[int(0.9 * len(times))]:.1f} ms over {args.repeats} calls")


if __name__ == "__main__":
    main()
