"""Steady-state training throughput (images/s) of the engine's own step — batch augmentation, normalisation,
forward, backward, AdamW — on synthetic in-memory images, plus where the time goes.

    python benchmarks/bench_train.py --model efficientnet_lite0 --input-size 224 --batch-size 256 [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from core.config import RunConfig
from core.inference import autocast, resolve_device
from core.train.training import create_training_parts


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds per call after two warm-up calls (synchronising CUDA around each)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as fit does
    cfg = RunConfig(model=args.model, input_size=args.input_size, batch_size=args.batch_size)
    model, loss_fn, augment, preprocess = create_training_parts(cfg, device)  # what fit builds
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    images = torch.randint(0, 256, (args.batch_size, 3, args.input_size, args.input_size), dtype=torch.uint8,
                           device=device)
    labels = (torch.rand(args.batch_size, device=device) < 0.4).float()
    generator = torch.Generator(device=device).manual_seed(0)

    def prepare() -> torch.Tensor:
        return preprocess(augment(images.float().div(255), generator)).contiguous(memory_format=torch.channels_last)

    batch = prepare()

    def learn() -> None:
        with autocast(device, True):
            loss = loss_fn(step_model(batch), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def full_step() -> None:
        nonlocal batch
        batch = prepare()
        learn()

    model.train()
    t_aug, t_learn, t_step = (timed(f, device, args.repeats) for f in (prepare, learn, full_step))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} @ {args.input_size}px, batch {args.batch_size}, {name}: "
          f"{args.batch_size / t_step:.0f} img/s (median of {args.repeats} steps); per step "
          f"{1000 * t_step:.1f} ms = augment+normalise {1000 * t_aug:.1f} ms + forward/backward/AdamW "
          f"{1000 * t_learn:.1f} ms")


if __name__ == "__main__":
    main()
