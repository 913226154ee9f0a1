"""Where an image sits among the training images: pooled penultimate features, taken in the prediction's own
forward pass, reduced by PCA and stored with the run as a small index (``index.safetensors``).

Features: the input of each network's classifier (its pooled last feature map), L2-normalised per network, then
concatenated for an ensemble: the members' feature spaces are unrelated, so averaging them would mix coordinates
that mean different things, while concatenating unit vectors keeps each member's geometry and weighs members alike.
With flip TTA the features are averaged over the views, as the probability is.

The index keeps the training split's features projected on their first principal components (fp16), image ids,
diagnoses and labels, and a fingerprint of the weights, the split file and the model's view, so an index built for
another model or split is refused instead of silently answering for it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from core.checkpoint import MODEL_FILE
from core.config import TrainConfig
from core.data import project_path
from core.runs import RunError

INDEX_FILE = "index.safetensors"


def feature_layers(model: nn.Module) -> list[nn.Module]:
    """The classifier of each network (one, or one per ensemble member): its input is the pooled feature vector."""
    members = getattr(model, "members", None)
    networks = list(members) if members is not None else [model]
    return [network.get_classifier() for network in networks]


@contextmanager
def captured_features(model: nn.Module, enabled: bool = True) -> Iterator[list[list[torch.Tensor]]]:
    """While open, every forward of ``model`` appends each network's pooled features to ``captured[member]``."""
    captured: list[list[torch.Tensor]] = [[] for _ in feature_layers(model)] if enabled else []
    hooks = [layer.register_forward_pre_hook(lambda module, args, k=k: captured[k].append(args[0].detach()))
             for k, layer in enumerate(feature_layers(model))] if enabled else []
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def pooled_features(captured: list[list[torch.Tensor]], views: int) -> torch.Tensor:
    """The features of the last forward ``(N, D)``: each member's L2-normalised, concatenated, averaged over the
    ``views`` TTA views stacked in the batch (and emptied from ``captured`` for the next batch)."""
    parts = [F.normalize(member.pop().float().flatten(1), dim=1) for member in captured]
    joined = torch.cat(parts, dim=1)
    return joined.view(views, -1, joined.shape[1]).mean(0).cpu()


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_fingerprint(run_dir: str | Path, cfg: TrainConfig) -> dict:
    """What an index depends on: the weights, the split file (which images are "training") and the view."""
    return {"weights": sha256(Path(run_dir) / MODEL_FILE), "split": sha256(project_path(cfg.split_file)),
            "view": [cfg.input_size, cfg.crop, cfg.mask_corners, cfg.tta_flips, cfg.tta_views]}


@dataclass
class EmbeddingIndex:
    mean: np.ndarray          # (D,) the training features' mean, removed before projecting
    components: np.ndarray    # (d, D) the first d principal axes
    features: np.ndarray      # (N, d) the training split, projected
    image_ids: list[str]
    dx: list[str]
    labels: np.ndarray        # (N,) 0/1
    meta: dict                # fingerprint, the OOD score's method and threshold, what it was built with

    @classmethod
    def fit(cls, features: np.ndarray, frame: pd.DataFrame, dims: int, meta: dict) -> EmbeddingIndex:
        """PCA of the training features (the SVD of the centred matrix; no randomness, so a rebuild agrees)."""
        features = np.asarray(features, dtype=np.float64)
        mean = features.mean(0)
        _, _, axes = np.linalg.svd(features - mean, full_matrices=False)
        components = axes[:dims].astype(np.float32)
        projected = ((features - mean) @ components.T).astype(np.float16)
        return cls(mean.astype(np.float32), components, projected, frame["image_id"].astype(str).tolist(),
                   frame["dx"].astype(str).tolist(), frame["label"].to_numpy().astype(np.int8), dict(meta))

    def project(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, dtype=np.float32) - self.mean) @ self.components.T).astype(np.float32)

    def distances(self, projected: np.ndarray) -> np.ndarray:
        """(M, N) Euclidean distances of projected features to every training image."""
        train = self.features.astype(np.float32)
        squared = (projected ** 2).sum(1)[:, None] + (train ** 2).sum(1)[None, :] - 2 * projected @ train.T
        return np.sqrt(np.clip(squared, 0, None))

    def nearest(self, projected: np.ndarray, k: int = 6) -> list[pd.DataFrame]:
        """Per image, the ``k`` most similar training cases: image_id, dx, label, distance (closest first)."""
        out = []
        for row in self.distances(np.atleast_2d(projected)):
            order = np.argsort(row, kind="stable")[:k]
            out.append(pd.DataFrame({"image_id": [self.image_ids[i] for i in order],
                                     "dx": [self.dx[i] for i in order], "label": self.labels[order].astype(int),
                                     "distance": row[order].astype(float)}))
        return out

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / INDEX_FILE
        tmp = path.with_suffix(".tmp")
        meta = {"meta": json.dumps(self.meta), "image_ids": json.dumps(self.image_ids), "dx": json.dumps(self.dx)}
        save_file({"mean": torch.from_numpy(self.mean), "components": torch.from_numpy(self.components),
                   "features": torch.from_numpy(self.features), "labels": torch.from_numpy(self.labels)},
                  str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> EmbeddingIndex:
        path = Path(run_dir) / INDEX_FILE
        fix = f"run `python train.py index --run {run_dir}` to build it"
        if not path.is_file():
            raise RunError(f"{path} is missing; {fix}")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as store:
                header = store.metadata()
            return cls(tensors["mean"].numpy(), tensors["components"].numpy(), tensors["features"].numpy(),
                       json.loads(header["image_ids"]), json.loads(header["dx"]), tensors["labels"].numpy(),
                       json.loads(header["meta"]))
        except Exception as err:  # a truncated or foreign file: the same fix either way
            raise RunError(f"{path} is not a readable index ({err}); {fix} again") from err

    def check(self, fingerprint: dict, run_dir: str | Path) -> None:
        """Refuse an index built for other weights, another split file or another view of the images."""
        built = self.meta.get("fingerprint", {})
        differ = [key for key in fingerprint if built.get(key) != fingerprint[key]]
        if differ:
            raise RunError(f"{Path(run_dir) / INDEX_FILE} was built for another run ({', '.join(differ)} "
                              f"differ); rebuild it with `python train.py index --run {run_dir}`")
