"""Inference, all the dashboard and the audits need: the device, the decoded images, the preprocessing a run was
trained with, batched P(malignant) with flip TTA, and a run's weights loaded for prediction.

Speed comes from keeping the decoded, centre-cropped, resized images in memory as one uint8 tensor (on the GPU when
there is one): no DataLoader workers, no per-image Python.
"""
from __future__ import annotations

import platform
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision import tv_tensors

from core import checkpoint, embedding
from core.calibration import IDENTITY, apply_platt
from core.config import RunConfig
from core.data import project_path, read_dataset
from core.ensemble import model_for_run
from core.images import open_mask, open_rgb
from core.model import malignant_probability, resolve_normalization
from core.runs import MODEL_FILE, read_config
from core.split import apply_split, read_split
from core.transforms import CornerMask, Crop, normalize_transform, resize_transform, view_shape


class DeviceError(RuntimeError):
    """The device asked for is not there; the message says what to use instead."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' asked for, but no CUDA GPU is visible; use --device cpu")
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


def model_view_masks(paths: list[str | None], size: int, crop: Crop = "square") -> list[np.ndarray | None]:
    """Lesion masks through the same crop + resize as their images (nearest-neighbour)."""
    resize = resize_transform(size, crop)
    out: list[np.ndarray | None] = []
    for path in paths:
        if path is None or (isinstance(path, float) and np.isnan(path)):
            out.append(None)
            continue
        mask = tv_tensors.Mask(torch.from_numpy(open_mask(path)).unsqueeze(0).to(torch.uint8))
        out.append(resize(mask)[0].numpy().astype(bool))
    return out


def load_splits(cfg: RunConfig) -> dict[str, pd.DataFrame]:
    """train/val/test frames from the configured data folder and split file."""
    split_path = project_path(cfg.split_file)
    data = apply_split(read_dataset(cfg.data_dir), read_split(split_path), str(split_path))
    frames = {name: data[data["split"] == name].reset_index(drop=True) for name in ("train", "val", "test")}
    if cfg.train_limit:
        frames["train"] = frames["train"].sample(n=min(cfg.train_limit, len(frames["train"])),
                                                 random_state=cfg.seed).reset_index(drop=True)
    return frames


class Preprocess(nn.Module):
    """uint8 batch (or float in [0, 1], augmented) → normalised float batch, as the model was trained (per the
    run's config). The one place the corner mask is applied: training (after augmentation), evaluation, the stress
    test (after the intervention), the Predictor and Grad-CAM all go through here."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.corner_mask = None if cfg.corner_mask is None else CornerMask(cfg.corner_mask)
        self.normalize = normalize_transform(resolve_normalization(cfg), cfg.shades_of_gray)

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """The pixels the network gets, before normalisation: ``images`` with the corner mask if the run has one."""
        return images if self.corner_mask is None else self.corner_mask(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(tv_tensors.Image(self.view(images))).as_subclass(torch.Tensor)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA only (on the CPU it is slower here); elsewhere no context at all, since autocast
    refuses device types it does not know (the ``meta`` device of the placement tests)."""
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


FLIP_DIMS = [(), (-1,), (-2,), (-1, -2)]  # TTA views in order: identity, horizontal, vertical, both


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: torch.Tensor, preprocess: Preprocess, device: torch.device,
                          batch_size: int = 128, tta_views: int = 1, amp: bool = True,
                          calibration: Sequence[float] = IDENTITY,
                          features: list[np.ndarray] | None = None) -> np.ndarray:
    """P(malignant) for uint8 images ``(N, 3, S, S)``: the mean over the first ``tta_views`` of the four flips
    (1: the image alone; 2: identity + horizontal, half the cost of all four), then the run's Platt scaling.
    Given a list as ``features``, the same forward passes also append two arrays: each image's pooled penultimate
    features (``core.embedding``: per member L2-normalised and concatenated, averaged over the views), then its style
    statistics (the channel means and deviations of earlier stages, ``core.embedding.captured_style``), alike."""
    if not 1 <= tta_views <= len(FLIP_DIMS):
        raise ValueError(f"tta_views must be 1 to {len(FLIP_DIMS)}, got {tta_views}")
    model.eval()
    flips = FLIP_DIMS[:tta_views]
    # The views go through the network as one batch: one pass over k·n images costs far less than k passes over n
    # (benchmarks/experiments.md, "Lab notes").
    step = max(1, batch_size // len(flips))
    probabilities, pooled, styles = [], [], []
    wanted = features is not None
    with embedding.captured_features(model, enabled=wanted) as captured, \
            embedding.captured_style(model, enabled=wanted) as captured_style:
        for start in range(0, len(images), step):
            batch = preprocess(images[start:start + step].to(device, non_blocking=True))
            views = torch.cat([batch.flip(dims) if dims else batch for dims in flips])
            with autocast(device, amp):
                p = malignant_probability(model(views.contiguous(memory_format=torch.channels_last)))
            probabilities.append(p.float().view(len(flips), -1).mean(0).cpu())
            if wanted:
                pooled.append(embedding.pooled_features(captured, len(flips)))
                styles.append(embedding.pooled_features(captured_style, len(flips)) if captured_style
                              else torch.zeros((len(batch), 0)))  # a model without stages to read
    if features is not None:
        features += [torch.cat(pooled).numpy(), torch.cat(styles).numpy()]
    return apply_platt(torch.cat(probabilities).double(), tuple(calibration)).numpy()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_run(run_dir: str | Path, device: torch.device | None = None) -> tuple[RunConfig, nn.Module]:
    """A run's config and best weights, ready for inference."""
    cfg = read_config(run_dir)
    model = checkpoint.load_weights(model_for_run(run_dir, cfg), Path(run_dir) / MODEL_FILE)
    model = model.to(device or torch.device("cpu")).to(memory_format=torch.channels_last).eval()
    return cfg, model


