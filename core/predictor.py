"""The Python API the dashboard and ``train.py predict`` use: ``Predictor.load(run_dir).predict(image)``."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.data import open_rgb
from core.engine import Preprocess, load_run, predict_probabilities
from core.transforms import resize_transform

ImageInput = str | os.PathLike | bytes | Image.Image


@dataclass
class Prediction:
    probability: float                     # P(malignant)
    model_input: np.ndarray                # the image as the model sees it: uint8 (H, W, 3) after crop + resize
    thresholds: dict[str, float] = field(default_factory=dict)  # chosen on val: "0.5", "youden", "sens95"
    cam: np.ndarray | None = None          # with explain=True: Grad-CAM (H, W) in [0, 1], aligned with model_input
    attention: dict = field(default_factory=dict)  # with explain=True: corner/border fractions, flag, dark corners

    def is_malignant(self, threshold: float) -> bool:
        return self.probability >= threshold


class Predictor:
    """A trained run, loaded once, predicting one image at a time on the CPU (or a GPU if asked)."""

    def __init__(self, run_dir: str | Path, device: str = "cpu") -> None:
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.config, self.model = load_run(self.run_dir, self.device)
        self.resize = resize_transform(self.config.input_size, self.config.crop)
        self.preprocess = Preprocess(self.config)
        metrics_path = self.run_dir / "metrics.json"
        self.thresholds: dict[str, float] = (json.loads(metrics_path.read_text()).get("thresholds", {})
                                             if metrics_path.is_file() else {})
        # Grad-CAM hooks live on the shared model and record every forward that runs while they are attached:
        # one call at a time, or concurrent callers (dashboard sessions are threads) would feed each other's CAMs.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> Predictor:
        return cls(run_dir, device)

    def model_input(self, image: ImageInput) -> torch.Tensor:
        """uint8 ``(3, H, W)``: cropped (the run's ``crop``) and resized — exactly what evaluation feeds the model."""
        return self.resize(open_rgb(image)).as_subclass(torch.Tensor)

    def predict(self, image: ImageInput, explain: bool = False, method: str = "gradcam",
                threshold: float | None = None) -> Prediction:
        """P(malignant) for one image; with ``explain`` also its CAM (``method`` from ``core.explain.CAM_METHODS``)
        and attention scores. The CAM explains the class decided at ``threshold`` (default: Youden on val)."""
        pixels = self.model_input(image)
        with self._lock:
            return self._predict(pixels, explain, method, threshold)

    def _predict(self, pixels: torch.Tensor, explain: bool, method: str, threshold: float | None) -> Prediction:
        batch = pixels.unsqueeze(0)
        probability = predict_probabilities(self.model, batch, self.preprocess, self.device,
                                            tta_flips=self.config.tta_flips, amp=self.config.amp,
                                            tta_views=self.config.tta_views,
                                            calibration=self.config.calibration)[0]
        view = pixels.permute(1, 2, 0).numpy().copy()
        result = Prediction(float(probability), view, dict(self.thresholds))
        if explain:
            from core import explain as xai
            if threshold is None:
                threshold = self.thresholds.get("youden", 0.5)
            decided = int(result.probability >= threshold)  # explain what was decided
            result.cam = xai.compute_cam(self.model, self.preprocess(batch.to(self.device)), method, [decided])[0]
            result.attention = {**xai.attention_scores(result.cam), "dark_corner_score": xai.dark_corner_score(view)}
        return result
