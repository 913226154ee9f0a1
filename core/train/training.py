"""One training step and one epoch: the parts a step runs (model, loss, batch augmentation, preprocessing), built
in one place, and the loop over a sampler's draws. Every random draw of epoch ``e`` is seeded by ``(seed, e)``, so a
resumed run continues exactly where it stopped."""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3
from tqdm import tqdm

from core import checkpoint
from core.config import RunConfig
from core.inference import Preprocess, autocast
from core.model import DX_CLASSES, classifier, create_model, head_outputs
from core.train.adversary import SourceAdversary, logits_and_features
from core.train.augment import BatchAugment, Twin
from core.train.distributed import SINGLE_PROCESS, Distributed
from core.train.losses import create_loss, jensen_shannon
from core.train.sampler import BalancedSampler

LOSS_CHECK_STEPS = 20  # on a GPU, how often the running loss is read back (and checked for NaN)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, out of memory); the message says what to change."""


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
    head = {id(p) for p in classifier(plain).parameters()}
    for p in plain.parameters():
        p.requires_grad_(trainable or id(p) in head)


def create_training_parts(cfg: RunConfig, device: torch.device) -> tuple[nn.Module, nn.Module, BatchAugment,
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
                           cfg.corner_artifacts, tuple(cfg.corner_ring_start), cfg.corner_fill_share,
                           cfg.camera_augment).to(device)
    return model, loss_fn, augment, Preprocess(cfg).to(device)


def consistency_weights(cfg: RunConfig) -> dict[Twin, float]:
    """Each consistency twin's weight λ, from the config (0 = off)."""
    return {"corner": cfg.corner_consistency, "camera": cfg.camera_consistency}


def training_loss(model: nn.Module, loss_fn: nn.Module, augment: BatchAugment, preprocess: Preprocess,
                  images: torch.Tensor, targets: torch.Tensor, amp: bool, generator: torch.Generator | None = None,
                  mixup_lam: float | None = None, consistency: Mapping[Twin, float] | None = None,
                  adversary: SourceAdversary | None = None, image_index: torch.Tensor | None = None) -> torch.Tensor:
    """One batch's loss: uint8 images → augment → normalise → (mixup with ``mixup_lam``) → model → loss.

    ``consistency`` maps a twin kind to its weight λ (``consistency_weights``). For each kind with λ > 0 every image
    also goes through the model as a twin, in the same batch (``"corner"``: with a random corner artifact;
    ``"camera"``: re-taken as another camera might), and the loss adds λ × the Jensen–Shannon divergence between
    the clean and the twin's prediction: the edit is then trained to change nothing, not only to say nothing about
    the label on average.

    With an ``adversary`` the loss adds its cross-entropy of the clean images' sources (the batch's rows are the
    training images ``image_index``); its gradient reversal turns that into a penalty on how well the features tell
    the source."""
    twins = {kind: weight for kind, weight in (consistency or {}).items() if weight > 0}
    if (twins or adversary is not None) and mixup_lam is not None:
        raise ValueError("a consistency term or a source adversary cannot be combined with mixup: a blended image "
                         "has no unedited twin and no one source")
    if adversary is not None and image_index is None:
        raise ValueError("a source adversary needs the batch's training-image indices, to look up their sources")
    raw = images.float().div_(255)
    views = cast(tuple[torch.Tensor, ...], augment(raw, generator, twins=tuple(twins))) if twins \
        else (cast(torch.Tensor, augment(raw, generator)),)
    x = preprocess(torch.cat(views) if twins else views[0])
    if mixup_lam is not None:
        perm = torch.randperm(len(x), generator=generator, device=x.device)
        x, targets = mixup_lam * x + (1 - mixup_lam) * x[perm], mixup_lam * targets + (1 - mixup_lam) * targets[perm]
    with autocast(x.device, amp):
        x = x.contiguous(memory_format=torch.channels_last)
        logits, features = logits_and_features(model, x) if adversary is not None else (model(x), None)
    clean_logits, *twin_logits = logits.chunk(len(twins) + 1)
    loss = loss_fn(clean_logits, targets) + sum(
        weight * jensen_shannon(clean_logits, twin) for weight, twin in zip(twins.values(), twin_logits))
    if adversary is not None:
        assert features is not None and image_index is not None
        loss = loss + adversary.loss(features[:len(clean_logits)], image_index)
    return loss


def train_one_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, sampler: BalancedSampler | None,
                    augment: BatchAugment, preprocess: Preprocess, loss_fn: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    cfg: RunConfig, device: torch.device, epoch: int, ema: ModelEmaV3 | None = None,
                    dist_info: Distributed = SINGLE_PROCESS,
                    adversary: SourceAdversary | None = None) -> dict[str, float]:
    """One pass over ``len(sampler)`` draws (or a shuffle). Returns mean loss and throughput, and with an
    ``adversary`` its mean cross-entropy (``source_ce``, a part of the loss)."""
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
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=None if dist_info.main else True, dynamic_ncols=True)
    for step in bar:
        index = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        mixup_lam = float(np.random.default_rng([cfg.seed, epoch, step]).beta(cfg.mixup, cfg.mixup)) \
            if cfg.mixup > 0 else None
        try:
            loss = training_loss(model, loss_fn, augment, preprocess, images[index].to(device, non_blocking=True),
                                 labels[index].to(device, non_blocking=True), cfg.amp, generator, mixup_lam,
                                 consistency_weights(cfg), adversary,
                                 None if adversary is None else index.to(device, non_blocking=True))
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
    stats = {"train_loss": loss_sum.item() / max(seen, 1), "img_per_s": seen * dist_info.world_size / seconds,
             "train_seconds": seconds}
    return stats | ({"source_ce": adversary.take_mean_loss()} if adversary is not None else {})


def out_of_memory_advice(cfg: RunConfig) -> str:
    """Halve the batch and double gradient accumulation: the optimiser sees (about) the same effective batch."""
    if cfg.batch_size == 1:
        return "out of GPU memory at batch size 1: try a smaller --input-size or --model"
    batch, accum = (cfg.batch_size + 1) // 2, cfg.grad_accum * 2
    return (f"out of GPU memory at batch size {cfg.batch_size}: try --batch-size {batch} --grad-accum {accum} "
            f"(effective batch {batch * accum}, as now {cfg.batch_size * cfg.grad_accum}, with gradient accumulation)")
