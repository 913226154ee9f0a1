"""``fit``: a training run from a config into a run directory, resumable after any stop.

The run is a few named steps (load the data, build the parts, restore a stopped run, then per epoch train, validate
and commit), each a plain function in the style of torchvision's ``references/classification/train.py``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

from core import checkpoint, metrics, runs
from core.calibration import IDENTITY
from core.config import RunConfig
from core.data import DataError, project_path
from core.ensemble import init_weights
from core.evaluation import evaluate_run
from core.inference import (
    Preprocess,
    device_description,
    load_splits,
    predict_probabilities,
    preload_images,
    resolve_device,
)
from core.io import remove_stale_temp_files
from core.train.adversary import SourceAdversary, create_adversary
from core.train.augment import BatchAugment
from core.train.distributed import Distributed, check_ranks_agree, setup_distributed
from core.train.losses import create_loss
from core.train.sampler import BalancedSampler
from core.train.training import (
    TrainingError,
    create_training_parts,
    set_backbone_trainable,
    train_one_epoch,
    training_targets,
)
from core.transforms import view_shape


class Interrupted(KeyboardInterrupt):
    """SIGTERM during :func:`fit`, raised the way Ctrl-C raises ``KeyboardInterrupt`` so both stop alike."""


@dataclass
class TrainingData:
    train_images: torch.Tensor    # uint8 (N, 3, H, W) on the training device
    train_targets: torch.Tensor
    train_labels: np.ndarray      # 0/1, what the balanced sampler balances
    train_sources: np.ndarray | None  # each training image's source, for source-balanced sampling and the adversary
    train_dx: np.ndarray | None       # each training image's diagnosis, when the data has one (the adversary's given)
    val_images: torch.Tensor
    val_labels: np.ndarray
    load_seconds: float


@dataclass
class TrainingParts:
    model: nn.Module              # what the optimiser updates (DDP-wrapped under torchrun)
    train_model: nn.Module        # what the step runs (``torch.compile``d with --compile)
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: BalancedSampler | None
    loss_fn: nn.Module
    augment: BatchAugment
    preprocess: Preprocess
    val_loss_fn: nn.Module
    adversary: SourceAdversary | None = None  # the adversarial source head, trained beside the model


@dataclass
class Progress:
    start_epoch: int = 0
    best_auroc: float = -1.0
    since_best: int = 0
    history: list[dict] = field(default_factory=list)

    def record(self, row: dict) -> bool:
        """Add an epoch's row; True if its val AUROC is the best so far."""
        self.history.append(row)
        improved = row["val_auroc"] > self.best_auroc
        self.best_auroc, self.since_best = (row["val_auroc"], 0) if improved else (self.best_auroc,
                                                                                   self.since_best + 1)
        return improved


def fit(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> Path:
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


def _fit(cfg: RunConfig, run_dir: Path, resume: bool) -> Path:
    dist_info = setup_distributed(cfg.device)
    if cfg.source_adversary > 0 and dist_info.world_size > 1:
        raise ValueError("--source-adversary runs on one process: it reads the features beside DDP's forward")
    device = resolve_device(cfg.device, dist_info.local_rank)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: let cuDNN pick the fastest kernels
    if dist_info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            runs.clear_for_training(run_dir)
        runs.write_config(cfg, run_dir)
        if not resume and cfg.init_from:
            runs.inherit_lineage(run_dir, project_path(cfg.init_from))
    torch.manual_seed(cfg.seed)
    data = load_training_data(cfg, device)
    parts = build_training_parts(cfg, device, dist_info, data, init=not resume)
    progress = restore(run_dir, parts, dist_info) if resume else Progress()
    if dist_info.main:
        height, width = view_shape(cfg.input_size, cfg.crop)
        print(f"{cfg.model} @ {height}×{width} px ({cfg.crop}) on {device_description(device)}; "
              f"train {len(data.train_images)}, val {len(data.val_images)} images preloaded in "
              f"{data.load_seconds:.1f}s")
        if parts.adversary is not None:
            print(f"source head over {', '.join(parts.adversary.sources)}: guessing the training images' mix "
                  f"scores a cross-entropy of {parts.adversary.guess_loss:.3f}; the history's source_ce is the "
                  "head's, train_loss includes it")
    for epoch in range(progress.start_epoch, cfg.epochs):
        set_backbone_trainable(parts.model, epoch >= cfg.head_warmup_epochs)
        stats = train_one_epoch(model=parts.train_model, images=data.train_images, labels=data.train_targets,
                                sampler=parts.sampler, augment=parts.augment, preprocess=parts.preprocess,
                                loss_fn=parts.loss_fn, optimizer=parts.optimizer, scheduler=parts.scheduler, cfg=cfg,
                                device=device, epoch=epoch, ema=parts.ema, dist_info=dist_info,
                                adversary=parts.adversary)
        val_loss, val_auroc, val_seconds = validate(cfg, parts, data, device, epoch)
        row = {"epoch": epoch + 1, "train_loss": stats["train_loss"], "val_loss": val_loss, "val_auroc": val_auroc,
               "lr": parts.optimizer.param_groups[0]["lr"], "img_per_s": stats["img_per_s"],
               "seconds": stats["train_seconds"] + val_seconds}
        if "source_ce" in stats:
            row["source_ce"] = stats["source_ce"]
        improved = progress.record(row)
        if dist_info.main:
            commit_epoch(run_dir, parts, progress, epoch, improved)
        if cfg.early_stopping and progress.since_best >= cfg.early_stopping:
            if dist_info.main:
                print(f"early stop: no better val AUROC for {progress.since_best} epochs")
            break
    if dist_info.world_size > 1:
        check_ranks_agree(parts.model)
        dist.barrier()
    if dist_info.main:
        del data
        evaluate_run(run_dir)
    return run_dir


def load_training_data(cfg: RunConfig, device: torch.device) -> TrainingData:
    """The train and val images decoded once into memory (on ``device``), with what the loss and sampler need."""
    frames = load_splits(cfg)
    t0 = time.perf_counter()
    train_images = preload_images(frames["train"]["path"].tolist(), cfg.input_size, cfg.crop).to(device)
    val_images = preload_images(frames["val"]["path"].tolist(), cfg.input_size, cfg.crop).to(device)
    train = frames["train"]
    sources = train["source"].fillna("unknown").astype(str).to_numpy() if "source" in train else None
    if cfg.source_balanced and cfg.positive_fraction <= 0:
        raise ValueError("--source-balanced balances the sampler within sources: it needs --positive-fraction > 0")
    for flag, on in (("--source-balanced", cfg.source_balanced), ("--source-adversary", cfg.source_adversary > 0)):
        if on and sources is None:
            raise DataError(f"{flag} needs each image's source: the data has no dataset/source/site column")
    if cfg.source_adversary > 0 and sources is not None and len(set(sources)) < 2:
        raise DataError(f"--source-adversary needs training images from at least two sources; all come from "
                        f"{sources[0]!r}")
    dx = train["dx"].astype(str).to_numpy() if "dx" in train and train["dx"].notna().all() else None
    if cfg.source_adversary_given_dx and dx is None:
        raise DataError("--source-adversary-given-dx needs each training image's diagnosis: the data has no dx "
                        "column, or it has gaps")
    return TrainingData(train_images, training_targets(train, cfg.head), train["label"].to_numpy(), sources, dx,
                        val_images, frames["val"]["label"].to_numpy(), time.perf_counter() - t0)


def build_training_parts(cfg: RunConfig, device: torch.device, dist_info: Distributed, data: TrainingData,
                         init: bool) -> TrainingParts:
    """Model (fine-tuning starts from ``cfg.init_from`` when ``init``; a resumed run restores its own weights),
    EMA, DDP, optimiser, sampler and a cosine schedule over every optimiser step of the run."""
    from timm.utils import ModelEmaV3

    model, loss_fn, augment, preprocess = create_training_parts(cfg, device)
    if cfg.init_from and init:
        init_weights(model, cfg.init_from)
    # Warm-up ramps the decay as (1 + step) / (10 + step): without it a 0.999 EMA stays close to the ImageNet
    # initialisation for the first epochs (benchmarks/experiments.md, EMA runs).
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay > 0 else None
    if dist_info.world_size > 1:
        # Head-only warm-up leaves the frozen backbone without gradients: DDP must be told to expect that.
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=cfg.head_warmup_epochs > 0)
    train_model = cast(nn.Module, torch.compile(model)) if cfg.compile else model
    adversary = None
    if cfg.source_adversary > 0 and data.train_sources is not None:
        adversary = create_adversary(model, data.train_sources, cfg.source_adversary,
                                     data.train_dx if cfg.source_adversary_given_dx else None)
    optimizer = torch.optim.AdamW([*model.parameters(), *(adversary.parameters() if adversary else ())], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    sampler = BalancedSampler(data.train_labels, cfg.positive_fraction, seed=cfg.seed, rank=dist_info.rank,
                              world_size=dist_info.world_size,
                              groups=data.train_sources if cfg.source_balanced else None) \
        if cfg.positive_fraction > 0 else None
    draws = len(sampler) if sampler is not None else len(data.train_images) // dist_info.world_size
    steps_per_epoch = math.ceil(draws // cfg.batch_size / cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs * steps_per_epoch))
    # Validation loss is the binary loss of P(malignant) for either head, so runs with different heads compare.
    val_loss_fn = create_loss(cfg.loss, cfg.focal_alpha, cfg.focal_gamma)
    return TrainingParts(model, train_model, ema, optimizer, scheduler, sampler, loss_fn, augment, preprocess,
                         val_loss_fn, adversary)


def validate(cfg: RunConfig, parts: TrainingParts, data: TrainingData, device: torch.device,
             epoch: int) -> tuple[float, float, float]:
    """Val loss, AUROC and seconds of the weights that would be saved (the EMA's, if on); non-finite predictions
    stop the run."""
    start = time.perf_counter()
    val_probs = predict_probabilities(evaluated_model(parts), data.val_images, parts.preprocess, device,
                                      cfg.eval_batch_size, amp=cfg.amp)
    if not np.isfinite(val_probs).all():  # weights gone NaN in the epoch's last step: never save them
        raise TrainingError(f"the model's val predictions are not finite after epoch {epoch + 1}; stopping. The "
                            "last good checkpoint is kept: lower --lr, or check the data")
    val_loss = float(parts.val_loss_fn(torch.logit(torch.tensor(val_probs).clamp(1e-6, 1 - 1e-6)),
                                       torch.tensor(data.val_labels, dtype=torch.float32)))
    return val_loss, metrics.auroc(data.val_labels, val_probs), time.perf_counter() - start


def evaluated_model(parts: TrainingParts) -> nn.Module:
    return parts.ema.module if parts.ema is not None else checkpoint._unwrap(parts.model)


def commit_epoch(run_dir: Path, parts: TrainingParts, progress: Progress, epoch: int, improved: bool) -> None:
    """Best weights (if improved), history, then the training state, which commits the epoch. Order matters: a
    stop before the last write leaves the previous epoch committed; its extra history row (and best weights) are
    redone identically on resume."""
    row = progress.history[-1]
    if improved:
        checkpoint.save_weights(evaluated_model(parts), run_dir / runs.MODEL_FILE, dtype=torch.float16,
                                metadata={"epoch": str(epoch + 1), "val_auroc": f"{row['val_auroc']:.6f}"})
    runs.write_history(progress.history, run_dir / runs.HISTORY_FILE)
    tensors = {f"model.{k}": v for k, v in checkpoint._unwrap(parts.model).state_dict().items()}
    if parts.ema is not None:
        tensors |= {f"ema.{k}": v for k, v in parts.ema.module.state_dict().items()}
    if parts.adversary is not None:
        tensors |= {f"adversary.{k}": v for k, v in parts.adversary.state_dict().items()}
    optim_tensors, optim_meta = checkpoint.optimizer_to_tensors(parts.optimizer)
    checkpoint.save_training_state(run_dir / runs.STATE_FILE, tensors | optim_tensors,
                                   optim_meta | {"epoch": epoch, "best_auroc": progress.best_auroc,
                                                 "since_best": progress.since_best,
                                                 "scheduler": parts.scheduler.state_dict()}
                                   | ({"adversary_sources": parts.adversary.sources} if parts.adversary else {}))
    print(f"epoch {epoch + 1:3d}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
          f"val AUROC {row['val_auroc']:.4f}{' *' if improved else ''}  "
          + (f"source CE {row['source_ce']:.3f}  " if "source_ce" in row else "") + f"{row['img_per_s']:.0f} img/s  "
          f"{row['seconds']:.1f}s", flush=True)


def restore(run_dir: Path, parts: TrainingParts, dist_info: Distributed) -> Progress:
    """A resumed run: the last committed epoch's state loaded, and where to go on from."""
    meta = restore_state(run_dir, parts.model, parts.ema, parts.optimizer, parts.scheduler, parts.adversary)
    start = meta["epoch"] + 1
    progress = Progress(start, meta["best_auroc"], meta["since_best"], runs.committed_history(run_dir, start))
    if dist_info.main:
        remove_stale_temp_files(run_dir, (runs.MODEL_FILE, runs.STATE_FILE, runs.STATE_META, runs.HISTORY_FILE))
        print(f"resuming {run_dir} after epoch {start} (best val AUROC so far {progress.best_auroc:.4f})")
    return progress


def restore_state(run_dir: Path, model: nn.Module, ema: ModelEmaV3 | None, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, adversary: SourceAdversary | None = None) -> dict:
    """Load the last committed epoch into model, EMA, source adversary, optimiser and scheduler; returns its
    counters."""
    path = run_dir / runs.STATE_FILE
    tensors, meta = checkpoint.load_training_state(path)
    try:
        checkpoint._unwrap(model).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if ema is not None:
            ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        if adversary is not None:
            saved = meta.get("adversary_sources")
            if saved != adversary.sources:
                raise ValueError(f"the source head was trained on the sources {saved}, the data now gives "
                                 f"{adversary.sources}")
            adversary.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("adversary.")})
        checkpoint.optimizer_from_tensors(optimizer, tensors, meta)
        scheduler.load_state_dict(meta["scheduler"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise checkpoint.CheckpointError(f"{path} does not fit the model and optimiser that "
                                         f"{run_dir / runs.CONFIG_FILE} describes: {str(err)[:300]}") from err
    return meta


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
        done = checkpoint.load_training_meta(run_dir / runs.STATE_FILE)["epoch"] + 1
    except checkpoint.CheckpointError:
        print(f"interrupted before the first epoch finished: nothing in {run_dir} to resume", file=sys.stderr)
        return
    print(f"interrupted: {run_dir} holds epoch {done} whole (checkpoint and history); continue with "
          f"`python train.py fit --resume {run_dir}`", file=sys.stderr)
