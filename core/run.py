"""One loaded run: its config, its weights on a device, the preprocessing it was trained with and its val thresholds,
and the one way to predict with them (``Run.predict``: the run's TTA views and calibration).

Every reader of a trained run goes through :func:`load`: evaluation, the Grad-CAM audit, the stress tests, the OOD
index, the Predictor and the benchmarks, so a prediction means the same thing everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from core import runs
from core.calibration import IDENTITY
from core.config import RunConfig
from core.inference import Preprocess, load_run, load_splits, predict_probabilities, preload_images, resolve_device

# Views per forward pass on the CPU: on 2 cores a 32-view forward ran ~1.8× faster per image than evaluation's 128,
# whose activations fall out of the caches (benchmarks/RESULTS.md, artifact stress test). A GPU takes the run's
# ``eval_batch_size``.
CPU_BATCH = 32


@dataclass(frozen=True)
class Predictions:
    """What one pass over a batch of images gives."""

    probability: np.ndarray                 # P(malignant): mean over the TTA views, then the run's calibration
    penultimate: np.ndarray | None = None   # with features: pooled penultimate features (core.embedding)
    style: np.ndarray | None = None         # … and the style statistics of earlier stages

    @property
    def features(self) -> list[np.ndarray]:
        """``[penultimate, style]``, as the OOD guard and the shift check take them."""
        if self.penultimate is None or self.style is None:
            raise ValueError("these predictions were made without features; predict(..., features=True)")
        return [self.penultimate, self.style]


class Run:
    """A trained run directory, loaded for prediction."""

    def __init__(self, directory: Path, config: RunConfig, model: nn.Module, device: torch.device) -> None:
        self.directory, self.config, self.model, self.device = directory, config, model, device
        self.preprocess = Preprocess(config)

    @property
    def thresholds(self) -> dict[str, float]:
        """The val-chosen thresholds of ``metrics.json`` ({} before the run is evaluated)."""
        if not (self.directory / runs.METRICS_FILE).is_file():
            return {}
        return dict(runs.read_metrics(self.directory).thresholds)

    def batch_size(self) -> int:
        return self.config.eval_batch_size if self.device.type == "cuda" else CPU_BATCH

    def predict(self, images: torch.Tensor, features: bool = False, batch_size: int | None = None,
                calibrated: bool = True) -> Predictions:
        """P(malignant) of uint8 images ``(N, 3, H, W)`` in the run's view, with the run's TTA views and (unless
        ``calibrated`` is False) its calibration; with ``features`` also the OOD guard's two feature arrays, from
        the same forward passes."""
        found: list[np.ndarray] | None = [] if features else None
        p = predict_probabilities(self.model, images, self.preprocess, self.device, batch_size or self.batch_size(),
                                  self.config.tta_views, self.config.amp,
                                  self.config.calibration if calibrated else IDENTITY, features=found)
        return Predictions(p, *found) if found else Predictions(p)

    def view_probabilities(self, images: torch.Tensor, dims: tuple[int, ...] = (),
                           batch_size: int | None = None) -> np.ndarray:
        """Uncalibrated P(malignant) of one flip view (``dims``, as ``core.inference.FLIP_DIMS``; () the image
        itself), without mixed precision: what the benchmarks that screen views and members one by one need."""
        flipped = images.flip(dims) if dims else images
        return predict_probabilities(self.model, flipped, self.preprocess, self.device,
                                     batch_size or self.batch_size(), amp=False)

    def load_images(self, paths: list[str]) -> torch.Tensor:
        """The files decoded, cropped and resized to the run's view: uint8 ``(N, 3, H, W)``."""
        return preload_images(paths, self.config.input_size, self.config.crop)

    def predict_frame(self, frame: pd.DataFrame, features: bool = False) -> tuple[pd.DataFrame, Predictions]:
        """A data frame's images (``path`` column) predicted: a copy with ``probability``, and the predictions."""
        predictions = self.predict(self.load_images(frame["path"].tolist()), features)
        return frame.assign(probability=predictions.probability), predictions

    def splits(self) -> dict[str, pd.DataFrame]:
        """train/val/test frames of the run's data folder and split file."""
        return load_splits(self.config)


def load(directory: str | Path, device: str | torch.device = "cpu") -> Run:
    """A run's config and best weights on ``device`` (``"auto"``: a GPU when there is one)."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    config, model = load_run(directory, device)
    return Run(Path(directory), config, model, device)
