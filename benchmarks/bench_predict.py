"""CPU latency of ``Predictor.predict`` on one 600×450 JPEG (the original HAM10000 resolution), median of N calls;
with ``--explain`` of ``predict(image, explain=True)`` (probability + Grad-CAM + attention scores).

    python benchmarks/bench_predict.py --run models/default [--explain] [--threads 2] [--repeats 50]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--explain", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictor = Predictor.load(args.run)
    jpeg = original_size_jpeg()
    for _ in range(5):
        predictor.predict(jpeg, explain=args.explain)  # warm-up: first calls allocate
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        predictor.predict(jpeg, explain=args.explain)
        times.append(1000 * (time.perf_counter() - start))
    cfg = predictor.config
    model = model_label(cfg)
    tta = f"{cfg.tta_views} flip views" if cfg.tta_flips else "no TTA"
    print(f"Predictor.predict(explain={args.explain}), 600x450 JPEG, {model} @ {cfg.input_size}px, {tta}, "
          f"{args.threads} threads: median {statistics.median(times):.1f} ms, "
          f"p90 {sorted(times)[int(0.9 * len(times))]:.1f} ms over {args.repeats} calls")


if __name__ == "__main__":
    main()
