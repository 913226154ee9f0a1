"""Where an image sits among the training images: pooled penultimate features, taken in the prediction's own
forward pass, reduced by PCA and stored with the run as a small index (``index.safetensors``).

Features: the input of each network's classifier (its pooled last feature map), L2-normalised per network, then
concatenated for an ensemble: the members' feature spaces are unrelated, so averaging them would mix coordinates
that mean different things, while concatenating unit vectors keeps each member's geometry and weighs members alike.
With flip TTA the features are averaged over the views, as the probability is.

The index keeps the training split's features projected on their first principal components (fp16) with the norm
of what the projection leaves out (the residual), image ids, diagnoses and labels, and a fingerprint of the
weights, the split file and the model's view, so an index built for another model or split is refused instead of
silently answering for it.
"""
from __future__ import annotations

import dataclasses
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

from core.config import RunConfig
from core.data import project_path
from core.io import atomic_write
from core.model import classifier
from core.runs import INDEX_FILE, MODEL_FILE, RunError


def feature_layers(model: nn.Module) -> list[nn.Module]:
    """The classifier of each network (one, or one per ensemble member): its input is the pooled feature vector."""
    members = getattr(model, "members", None)
    networks = list(members) if members is not None else [model]
    return [classifier(network) for network in networks]


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


# Earlier stages whose channel statistics describe how an image *looks* (colour, texture, sharpness: its style, as
# in style transfer's AdaIN) rather than what it shows: a clinical close-up or a phone photo differs from dermoscopy
# there even where the penultimate features, trained to ignore such things, place it among the lesions.
STYLE_REDUCTIONS = (4, 8, 16)


def style_layers(model: nn.Module) -> list[nn.Module]:
    """Per network (one, or one per ensemble member), its last module at each of :data:`STYLE_REDUCTIONS` (timm's
    ``feature_info``); none for a model without it."""
    members = getattr(model, "members", None)
    layers = []
    for network in list(members) if members is not None else [model]:
        info = getattr(network, "feature_info", None) or []
        for reduction in STYLE_REDUCTIONS:
            names = [stage["module"] for stage in info if stage["reduction"] == reduction]
            layers += [network.get_submodule(names[-1])] if names else []
    return layers


@contextmanager
def captured_style(model: nn.Module, enabled: bool = True) -> Iterator[list[list[torch.Tensor]]]:
    """While open, every forward of ``model`` appends each style layer's channel means and standard deviations
    ``(B, 2C)`` to ``captured[layer]``."""
    def statistics(output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 4:  # not a convolutional map (a transformer's tokens): no channel statistics
            return output.new_zeros((len(output), 0), dtype=torch.float32)
        flat = output.detach().float().flatten(2)
        return torch.cat([flat.mean(2), flat.std(2)], dim=1)

    layers = style_layers(model) if enabled else []
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_hook(lambda module, args, output, k=k: captured[k].append(statistics(output)))
             for k, layer in enumerate(layers)]
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


def run_fingerprint(run_dir: str | Path, cfg: RunConfig) -> dict:
    """What an index depends on: the weights, the split file (which images are "training") and the view."""
    return {"weights": sha256(Path(run_dir) / MODEL_FILE), "split": sha256(project_path(cfg.split_file)),
            # the mask: False without one (as in indexes built before its radius was a setting), else its radius
            "view": [cfg.input_size, cfg.crop, cfg.corner_mask or False, cfg.tta_views]}


@dataclass
class EmbeddingIndex:
    mean: np.ndarray          # (D,) the training features' mean, removed before projecting
    components: np.ndarray    # (d, D) the first d principal axes (stored in fp16)
    features: np.ndarray      # (N, d) the training split, projected
    residuals: np.ndarray     # (N,) the norm of each training feature's part outside the d axes
    image_ids: list[str]
    dx: list[str]
    labels: np.ndarray        # (N,) 0/1
    meta: dict                # fingerprint, the OOD score's method and threshold, what it was built with
    # The val split as [coords, residual] (M, d + 1): the reference of the set-level shift check (core.audit.shift);
    # None in indexes built before it.
    reference: np.ndarray | None = None

    def __post_init__(self) -> None:
        # Converted once, as torch tensors: the search runs on PyTorch's thread pool. numpy's BLAS would start its
        # own threads, whose spin-waiting after each call slows the next network pass (experiments.md, "Lab notes").
        self._train = torch.from_numpy(self.features.astype(np.float32))
        self._residuals = torch.from_numpy(self.residuals.astype(np.float32))
        self._train_sq = (self._train ** 2).sum(1) + self._residuals ** 2
        self._mean, self._components = torch.from_numpy(self.mean), torch.from_numpy(self.components)

    @classmethod
    def fit(cls, features: np.ndarray, frame: pd.DataFrame, dims: int, meta: dict) -> EmbeddingIndex:
        """PCA of the training features (the SVD of the centred matrix; no randomness, so a rebuild agrees)."""
        features = np.asarray(features, dtype=np.float64)
        mean = features.mean(0)
        _, _, axes = np.linalg.svd(features - mean, full_matrices=False)
        return cls.from_axes(features, mean, axes[:dims], frame, meta)

    @classmethod
    def from_axes(cls, features: np.ndarray, mean: np.ndarray, axes: np.ndarray, frame: pd.DataFrame,
                  meta: dict) -> EmbeddingIndex:
        """The index of ``features`` on given principal ``axes`` ``(d, D)`` (the first rows of one SVD serve every
        d, which is how the benchmark compares dimensions)."""
        # Rounded to fp16 as stored, so the index scores the same built as loaded.
        dims, components = len(axes), np.asarray(axes, dtype=np.float16).astype(np.float32)
        index = cls(mean.astype(np.float32), components, np.zeros((len(features), dims), np.float16),
                    np.zeros(len(features), np.float32), frame["image_id"].astype(str).tolist(),
                    frame["dx"].astype(str).tolist(), frame["label"].to_numpy().astype(np.int8), dict(meta))
        projected, residuals = index.project(features)
        return dataclasses.replace(index, features=projected.astype(np.float16), residuals=residuals)

    def project(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates on the d axes ``(M, d)`` and the norm of the rest ``(M,)``."""
        centred = torch.from_numpy(np.atleast_2d(np.asarray(features, dtype=np.float32))) - self._mean
        coords = centred @ self._components.T
        residuals = ((centred ** 2).sum(1) - (coords ** 2).sum(1)).clamp_min(0).sqrt()
        return coords.numpy(), residuals.numpy()

    def distances(self, coords: np.ndarray, residuals: np.ndarray) -> np.ndarray:
        """(M, N) distances to every training image: on the d axes, plus the difference of the residual norms, i.e.
        the Euclidean distance of ``[coords, residual]``. It never exceeds the full-feature distance and is 0 for an
        image and itself. Non-dermoscopic images differ mostly *outside* the axes that spread the training images,
        so dropping the residual would hide them (``benchmarks/ood_scores.py``)."""
        points, rest = torch.from_numpy(np.atleast_2d(coords)), torch.from_numpy(np.atleast_1d(residuals))
        squared = ((points ** 2).sum(1) + rest ** 2)[:, None] + self._train_sq[None, :] \
            - 2 * (points @ self._train.T + rest[:, None] * self._residuals[None, :])
        return squared.clamp_min(0).sqrt().numpy()

    def points(self, features: np.ndarray) -> np.ndarray:
        """Raw features as points of the space the distances are taken in: ``[coords, residual]`` ``(M, d + 1)``."""
        coords, residuals = self.project(features)
        return np.column_stack([coords, residuals])

    def nearest(self, coords: np.ndarray, residuals: np.ndarray, k: int = 6) -> list[pd.DataFrame]:
        """Per image, the ``k`` most similar training cases: image_id, dx, label, distance (closest first)."""
        return [self.cases(row, k) for row in self.distances(coords, residuals)]

    def cases(self, distances: np.ndarray, k: int) -> pd.DataFrame:
        """The ``k`` training cases closest by one image's ``distances`` (a row of :meth:`distances`)."""
        candidates = np.argpartition(distances, k - 1)[:k]
        order = candidates[np.argsort(distances[candidates], kind="stable")]
        return pd.DataFrame({"image_id": [self.image_ids[i] for i in order], "dx": [self.dx[i] for i in order],
                             "label": self.labels[order].astype(int), "distance": distances[order].astype(float)})

    def save(self, run_dir: str | Path, file: str = INDEX_FILE) -> Path:
        header = {"meta": json.dumps(self.meta), "image_ids": json.dumps(self.image_ids), "dx": json.dumps(self.dx)}
        tensors = {"mean": torch.from_numpy(self.mean),
                   "components": torch.from_numpy(self.components.astype(np.float16)),  # half the file; ~1e-3
                   "features": torch.from_numpy(self.features), "residuals": torch.from_numpy(self.residuals),
                   "labels": torch.from_numpy(self.labels)}
        if self.reference is not None:
            tensors["reference"] = torch.from_numpy(self.reference.astype(np.float16))
        return atomic_write(Path(run_dir) / file, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, run_dir: str | Path, file: str = INDEX_FILE) -> EmbeddingIndex:
        path = Path(run_dir) / file
        fix = f"run `python train.py index --run {run_dir}` to build it"
        if not path.is_file():
            raise RunError(f"{path} is missing; {fix}")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as store:
                header = store.metadata()
            return cls(tensors["mean"].numpy(), tensors["components"].float().numpy(), tensors["features"].numpy(),
                       tensors["residuals"].numpy(), json.loads(header["image_ids"]), json.loads(header["dx"]),
                       tensors["labels"].numpy(), json.loads(header["meta"]),
                       tensors["reference"].float().numpy() if "reference" in tensors else None)
        except Exception as err:  # a truncated or foreign file: the same fix either way
            raise RunError(f"{path} is not a readable index ({err}); {fix} again") from err

    def check(self, fingerprint: dict, run_dir: str | Path, file: str = INDEX_FILE) -> None:
        """Refuse an index built for other weights, another split file or another view of the images."""
        built = self.meta.get("fingerprint", {})
        differ = [key for key in fingerprint if built.get(key) != fingerprint[key]]
        if differ:
            raise RunError(f"{Path(run_dir) / file} was built for another run ({', '.join(differ)} "
                           f"differ); rebuild it with `python train.py index --run {run_dir}`")
