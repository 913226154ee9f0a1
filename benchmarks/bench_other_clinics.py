"""Wall time of the commands for other clinics on 2 CPU cores: ``train.py predict`` on a folder (one forward pass per
image, as before, against ``Predictor.predict_files``' batches), ``train.py shift`` on 1,000 images and
``train.py site`` on 100 labelled images; medians of ``--repeats`` runs, each command run in this process as the
command line runs it (images decoded from their files every time).

    python -m benchmarks.bench_other_clinics --run models/default [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import train
from core.data import read_ham10000
from core.predictor import Predictor
from core.runs import read_predictions


def folder_of(frame: pd.DataFrame, root: Path) -> Path:
    root.mkdir(parents=True)
    for path in frame["path"]:
        shutil.copy(path, root)
    return root


def timed(repeats: int, call) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("models/default"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--predict-images", type=int, default=300)
    parser.add_argument("--shift-images", type=int, default=1000)
    parser.add_argument("--site-images", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ham = read_ham10000().set_index("image_id")
    test = read_predictions(args.run, "test")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        few = folder_of(ham.loc[test["image_id"].iloc[:args.predict_images]], tmp / "predict")
        files = sorted(few.iterdir())
        predictor = Predictor.load(args.run)
        predictor.predict_files(files[:8])  # warm-up
        one_by_one = timed(args.repeats, lambda: [predictor.predict(path) for path in files])
        batched = timed(args.repeats, lambda: predictor.predict_files(files))
        print(f"predict, {len(files)} images: one forward pass per image {len(files) / one_by_one:.1f} img/s; "
              f"batched (predict_files) {len(files) / batched:.1f} img/s")
        many = folder_of(ham.loc[test["image_id"].sample(min(args.shift_images, len(test)), random_state=0)
                                 .tolist()], tmp / "shift")
        wall = timed(args.repeats, lambda: train.main(["shift", "--run", str(args.run), "--images", str(many),
                                                       "--device", "cpu"]))
        print(f"train.py shift, {args.shift_images} images: {wall:.1f} s")
        sample = test.sample(args.site_images, random_state=1)
        labelled = folder_of(ham.loc[sample["image_id"]], tmp / "site")
        pd.DataFrame({"image": sample["image_id"] + ".jpg", "label": sample["label"]}).to_csv(tmp / "site.csv",
                                                                                             index=False)
        run = shutil.copytree(args.run, tmp / "run", ignore=shutil.ignore_patterns("cams_*", "stress_*"))
        wall = timed(args.repeats, lambda: train.main(["site", "--run", str(run), "--name", "bench", "--data",
                                                       str(tmp / "site.csv"), "--images", str(labelled),
                                                       "--device", "cpu", "--overwrite"]))
        print(f"train.py site, {args.site_images} labelled images: {wall:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
