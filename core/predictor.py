"""The Python API the dashboard and ``train.py predict`` use: ``Predictor.load(run_dir).predict(image)``."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from core.data import DataError
from core.engine import Preprocess, load_run, predict_probabilities
from core.transforms import resize_transform

ImageInput = str | os.PathLike | bytes | Image.Image


@dataclass
class Prediction:
    probability: float                     # P(malignant)
    model_input: np.ndarray                # the image as the model sees it: uint8 (S, S, 3) after crop + resize
    thresholds: dict[str, float] = field(default_factory=dict)  # chosen on val: "0.5", "youden", "sens95"

    def is_malignant(self, threshold: float) -> bool:
        return self.probability >= threshold


def to_rgb(image: ImageInput) -> Image.Image:
    """Path, bytes or PIL image → upright RGB PIL image; anything unreadable is a ``DataError`` that says why."""
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert("RGB")
    source = io.BytesIO(image) if isinstance(image, bytes) else image
    name = "uploaded bytes" if isinstance(image, bytes) else str(image)
    try:
        with Image.open(source) as opened:
            return ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{name}: cannot read image ({err})") from err


class Predictor:
    """A trained run, loaded once, predicting one image at a time on the CPU (or a GPU if asked)."""

    def __init__(self, run_dir: str | Path, device: str = "cpu") -> None:
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.config, self.model = load_run(self.run_dir, self.device)
        self.resize = resize_transform(self.config.input_size)
        self.preprocess = Preprocess(self.config)
        metrics_path = self.run_dir / "metrics.json"
        self.thresholds: dict[str, float] = (json.loads(metrics_path.read_text()).get("thresholds", {})
                                             if metrics_path.is_file() else {})

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> Predictor:
        return cls(run_dir, device)

    def model_input(self, image: ImageInput) -> torch.Tensor:
        """uint8 ``(3, S, S)``: centre square, resized — exactly what evaluation feeds the model."""
        return self.resize(to_rgb(image)).as_subclass(torch.Tensor)

    @torch.inference_mode()
    def predict(self, image: ImageInput) -> Prediction:
        pixels = self.model_input(image)
        probability = predict_probabilities(self.model, pixels.unsqueeze(0), self.preprocess, self.device,
                                            tta_flips=self.config.tta_flips, amp=self.config.amp)[0]
        return Prediction(float(probability), pixels.permute(1, 2, 0).numpy().copy(), dict(self.thresholds))
