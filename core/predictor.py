"""The Python API the dashboard and ``train.py predict`` use: ``Predictor.load(run_dir).predict(image)``."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from core.audit.acquisition import EDITS, create_edits, retaken_view
from core.audit.corners import dark_corner_score
from core.audit.interventions import CORNER_CHECK, corner_dependent, create_intervention
from core.audit.ood import OODGuard
from core.data import DataError
from core.images import open_rgb
from core.run import load
from core.transforms import resize_transform

ImageInput = str | os.PathLike | bytes | Image.Image
# Views per forward pass for a folder on the CPU: 4–8 views (2–4 images × 2 flip views) ran fastest on 2 cores (33–37
# img/s against 18 at the evaluation batch of 128, whose activations outgrow the caches; benchmarks/RESULTS.md).
FOLDER_CPU_BATCH = 8
FILES_PER_CHUNK = 256  # decoded at a time by predict_files: 256 × 3 × 160 × 160 bytes = 20 MB
PREDICTION_COLUMNS = ["image", "probability", "ood_score", "style_score", "out_of_distribution", "unlike_in_content"]


@dataclass
class Prediction:
    probability: float                     # P(malignant)
    model_input: np.ndarray                # the image as the model sees it: uint8 (H, W, 3) after crop + resize
                                           # (and the run's corner mask)
    thresholds: dict[str, float] = field(default_factory=dict)  # chosen on val: "0.5", "youden", "sens95"
    cam: np.ndarray | None = None          # with explain=True: Grad-CAM (H, W) in [0, 1], aligned with model_input
    attention: dict = field(default_factory=dict)  # with explain=True: corner/border fractions, flag, dark corners
    # With corner_check=True: P(malignant) with the corners covered / a vignette added (core.audit.interventions), those
    # images as the model saw them, and whether the decision depends on the corners (core.audit.interventions rule).
    corner_probabilities: dict[str, float] = field(default_factory=dict)
    corner_views: dict[str, np.ndarray] = field(default_factory=dict)
    corner_dependent: bool | None = None
    # With the run's embedding index (``train.py index``; None without one): the distance to the training data,
    # whether it is beyond the val-calibrated threshold (then the probability is not to be trusted and the decision
    # is withheld), and the most similar training cases (image_id, dx, label, distance).
    ood_score: float | None = None
    style_score: float | None = None       # the distance of its style statistics (NaN: an index without them)
    out_of_distribution: bool | None = None  # unlike the training data in content or in style
    unlike_in_content: bool | None = None  # … by the penultimate features: not what the model learned to judge
    similar: pd.DataFrame | None = None

    def is_malignant(self, threshold: float) -> bool:
        return self.probability >= threshold

    def decision(self, threshold: float, site: bool = False) -> str:
        """"malignant", "benign", or "withheld" for an image unlike the training data (:func:`decisions`)."""
        return str(decisions(np.array([self.probability]), np.array([bool(self.out_of_distribution)]),
                             np.array([bool(self.unlike_in_content)]), threshold, site)[0])


def decisions(probability: np.ndarray, out_of_distribution: np.ndarray, unlike_in_content: np.ndarray,
              threshold: float, site: bool = False) -> np.ndarray:
    """"malignant" / "benign" at ``threshold``, or "withheld" for an image unlike the training data. At a ``site``'s
    operating point only an image unlike it in content is withheld: that threshold was chosen on the site's own
    images, whose style (camera, compression) may be unlike ours."""
    withheld = np.asarray(unlike_in_content if site else out_of_distribution, dtype=bool)
    return np.where(withheld, "withheld", np.where(np.asarray(probability) >= threshold, "malignant", "benign"))


@dataclass
class BatchPrediction:
    frame: pd.DataFrame                    # per readable image: image, probability, ood_score, style_score,
                                           # out_of_distribution
    features: list[np.ndarray] | None      # with an index: their penultimate and style features (the shift check)
    failed: list[str]                      # why each unreadable file was skipped


class Predictor:
    """A trained run, loaded once, predicting one image at a time on the CPU (or a GPU if asked)."""

    def __init__(self, run_dir: str | Path, device: str = "cpu") -> None:
        self.run_dir = Path(run_dir)
        self.run = load(self.run_dir, device)
        self.device, self.config, self.model, self.preprocess = (self.run.device, self.run.config, self.run.model,
                                                                 self.run.preprocess)
        self.resize = resize_transform(self.config.input_size, self.config.crop)
        # An index built for other weights or another split is refused here (RunError), never used silently.
        self.ood = OODGuard.load_if_built(self.run_dir, self.config)
        self.thresholds = self.run.thresholds
        # Grad-CAM hooks live on the shared model and record every forward that runs while they are attached:
        # one call at a time, or concurrent callers (dashboard sessions are threads) would feed each other's CAMs.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> Predictor:
        return cls(run_dir, device)

    def model_input(self, image: ImageInput) -> torch.Tensor:
        """uint8 ``(3, H, W)``: cropped (the run's ``crop``) and resized — exactly what evaluation preloads."""
        return self.resize(open_rgb(image)).as_subclass(torch.Tensor)

    def predict(self, image: ImageInput, explain: bool = False, method: str = "gradcam",
                threshold: float | None = None, corner_check: bool = False) -> Prediction:
        """P(malignant) for one image; with ``explain`` also its CAM (``method`` from
        ``core.audit.explain.CAM_METHODS``) and attention scores; with ``corner_check`` also p with the corners covered
        and with a vignette added, sent through the network in the same batch. The CAM and the corner check judge the
        decision at ``threshold`` (default: Youden on val)."""
        return self.predict_view(self.model_input(image), explain, method, threshold, corner_check)

    def camera_check(self, image: ImageInput) -> dict[str, float]:
        """P(malignant) of the photo as if taken by another camera: each acquisition edit that needs no source
        (``core.audit.acquisition``: JPEG qualities, resolution, focus, white balance, tone curve, and the neutral edits
        that set the floor) applied to the file's own pixels, then cropped and resized as usual. Edit name → p."""
        original = np.asarray(open_rgb(image))
        edits = create_edits(list(EDITS))
        views = torch.stack([retaken_view(original, edit, None, self.resize) for edit in edits])
        with self._lock:
            p = self.run.predict(views, batch_size=self._batch_size()).probability
        return {edit.name: float(value) for edit, value in zip(edits, p)}

    def _batch_size(self) -> int:
        return self.config.eval_batch_size if self.device.type == "cuda" else FOLDER_CPU_BATCH

    def predict_files(self, paths: list[Path], batch_size: int | None = None,
                      chunk: int = FILES_PER_CHUNK) -> BatchPrediction:
        """P(malignant) and the OOD guard's verdict for many image files, decoded in parallel and sent through the
        network in batches (one image at a time costs a forward pass each), ``chunk`` files at a time so that memory
        does not grow with the folder; unreadable files are skipped and named."""
        if batch_size is None:
            batch_size = self._batch_size()
        frames, parts, failed = [], [], []
        for start in range(0, len(paths), chunk):
            frame, features, errors = self._predict_chunk(list(paths[start:start + chunk]), batch_size)
            frames.append(frame)
            failed += errors
            parts += [features] if features is not None else []
        features = [np.concatenate(arrays) for arrays in zip(*parts)] if parts else None
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PREDICTION_COLUMNS)
        return BatchPrediction(frame, features, failed)

    def _predict_chunk(self, paths: list[Path], batch_size: int):
        def decode(path: Path) -> torch.Tensor | str:
            try:
                return self.model_input(path)
            except DataError as err:
                return str(err)

        with ThreadPoolExecutor(4) as pool:
            decoded = list(pool.map(decode, paths))
        images = {k: item for k, item in enumerate(decoded) if not isinstance(item, str)}
        kept = list(images)
        failed = [item for item in decoded if isinstance(item, str)]
        if not kept:
            return pd.DataFrame(columns=PREDICTION_COLUMNS), None, failed
        frame = pd.DataFrame({"image": [Path(paths[k]).name for k in kept]})
        with self._lock:
            predictions = self.run.predict(torch.stack(list(images.values())), features=self.ood is not None,
                                           batch_size=batch_size)
        frame["probability"] = predictions.probability
        if self.ood is None:
            return frame.assign(ood_score=np.nan, style_score=np.nan, out_of_distribution=False,
                                unlike_in_content=False), None, failed
        return pd.concat([frame, self.ood.assess(predictions.features)], axis=1), predictions.features, failed

    def predict_view(self, pixels: torch.Tensor, explain: bool = False, method: str = "gradcam",
                     threshold: float | None = None, corner_check: bool = False) -> Prediction:
        """As :meth:`predict`, for an image already in the model's view (uint8 ``(3, H, W)``, e.g. an intervened
        copy of a test image), so it is not cropped and resized again."""
        if threshold is None:
            threshold = self.thresholds.get("youden", 0.5)
        with self._lock:
            return self._predict(pixels, explain, method, threshold, corner_check)

    def _predict(self, pixels: torch.Tensor, explain: bool, method: str, threshold: float,
                 corner_check: bool) -> Prediction:
        batch = pixels.unsqueeze(0)
        versions = [batch] + ([create_intervention(name)(batch) for name in CORNER_CHECK] if corner_check else [])
        predictions = self.run.predict(torch.cat(versions), features=self.ood is not None)
        probabilities = predictions.probability
        view = self.preprocess.view(pixels).permute(1, 2, 0).numpy().copy()
        result = Prediction(float(probabilities[0]), view, dict(self.thresholds))
        if self.ood is not None:  # the features came with the prediction's own forward pass
            features = predictions.features
            verdict = self.ood.assess([part[:1] for part in features]).iloc[0]
            result.ood_score, result.style_score = float(verdict["ood_score"]), float(verdict["style_score"])
            result.out_of_distribution = bool(verdict["out_of_distribution"])
            result.unlike_in_content = bool(verdict["unlike_in_content"])
            result.similar = self.ood.similar(features[0])
        if corner_check:
            result.corner_probabilities = {name: float(p) for name, p in zip(CORNER_CHECK, probabilities[1:])}
            result.corner_views = {name: self.preprocess.view(v[0]).permute(1, 2, 0).numpy()
                                   for name, v in zip(CORNER_CHECK, versions[1:])}
            result.corner_dependent = bool(corner_dependent(result.probability, result.corner_probabilities,
                                                            threshold))
        if explain:
            from core.audit import explain as xai
            decided = int(result.probability >= threshold)  # explain what was decided
            result.cam = xai.compute_cam(self.model, self.preprocess(batch.to(self.device)), method, [decided])[0]
            result.attention = {**xai.attention_scores(result.cam), "dark_corner_score": dark_corner_score(view)}
        return result
