"""One configuration for a training run: defaults here, a YAML file over them, command-line flags over that.
The resolved config is saved in the run directory (``config.yaml``) and is what evaluation and prediction read."""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from core.io import atomic_write_text
from core.transforms import CROPS


@dataclass
class TrainConfig:
    # data
    data_dir: str | None = None            # HAM10000 folder (None: the resolved default)
    split_file: str = "splits/ham10000.csv"
    train_limit: int | None = None         # use only N training images (CPU smoke runs)
    # model
    model: str = "efficientnet_lite0"
    pretrained: bool = True
    init_from: str | None = None           # start from a trained run's weights (or RUN/members/NAME of an ensemble)
    input_size: int = 224                  # model view height (and width, with the square crop)
    crop: str = "square"                   # "square": centre square | "frame": the whole 4:3 frame (core.transforms)
    mask_corners: bool = False             # a constant colour outside the inscribed circle/ellipse, always
    normalization: str = "pretrained"      # "pretrained" (the weights' own mean/std) | "imagenet" | "per_image"
    shades_of_gray: bool = False
    drop_rate: float = 0.2
    head: str = "binary"                   # "binary": one logit | "dx": 7 HAM10000 diagnoses, P = mel+bcc+akiec
    ensemble: list[str] = field(default_factory=list)  # member run folders (core/ensemble.py); [] = one model
    # loss and sampling
    loss: str = "focal"                    # "focal" | "bce"
    focal_alpha: float = 0.6
    focal_gamma: float = 2.0
    positive_fraction: float = 0.4         # balanced sampler: 60/40 benign/malignant; 0 = plain shuffling
    mixup: float = 0.0                     # Beta(a, a) mixup strength; 0 = off
    # augmentation
    rotation: float = 15.0
    jitter: float = 0.1
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    zoom: list[float] = field(default_factory=lambda: [1.0, 1.1])
    corner_artifacts: float = 0.0          # share of training images given a random vignette or corner fill
    corner_ring_start: list[float] = field(default_factory=lambda: [0.75, 1.05])  # a vignette's inner radius range
    corner_fill_share: float = 0.25        # share of those artifacts that are corner fills, not vignettes
    # optimisation
    epochs: int = 30
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 1e-4
    head_warmup_epochs: int = 1            # epochs training the head only (backbone frozen); 0 = full fine-tuning
    ema_decay: float = 0.0                 # EMA of weights, evaluated and saved instead of the raw ones; 0 = off
    early_stopping: int = 0                # stop after N epochs without a better val AUROC; 0 = off
    amp: bool = True                       # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True
    compile: bool = False
    # evaluation
    tta_flips: bool = False                # average over identity + h/v/hv flips at evaluation and prediction
    tta_views: int = 4                     # with tta_flips: 2 = identity + horizontal flip, 4 = all four
    eval_batch_size: int = 128
    # Platt scaling (a, b) of the final P(malignant), p = σ(a·logit p + b): written by `train.py calibrate`
    calibration: list[float] = field(default_factory=lambda: [1.0, 0.0])
    # run
    seed: int = 0
    device: str = "auto"                   # "auto" | "cpu" | "cuda"

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        a_b = self.calibration
        if not (isinstance(a_b, list | tuple) and len(a_b) == 2 and all(math.isfinite(float(v)) for v in a_b)
                and float(a_b[0]) > 0):
            raise ValueError(f"calibration must be two finite numbers [a, b] with a > 0 (p = σ(a·logit p + b)), "
                             f"got {a_b!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config key(s) {', '.join(unknown)}")
        return cls(**data)

    def to_yaml(self, path: str | Path) -> Path:
        return atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))

    def override(self, args: argparse.Namespace) -> TrainConfig:
        """Flags the user actually gave (not None) win over the file and the defaults."""
        given = {f.name: getattr(args, f.name) for f in fields(self) if getattr(args, f.name, None) is not None}
        return dataclasses.replace(self, **given)


NOT_FLAGS = {"ensemble", "calibration"}  # written by `train.py ensemble` / `calibrate`, not training options


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, in named groups, defaulting to None so only given flags override."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    section = {"data_dir": "data", "model": "model", "loss": "loss and sampling", "rotation": "augmentation",
               "epochs": "optimisation", "tta_flips": "evaluation", "seed": "run"}
    current = "data"
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        current = section.get(f.name, current)
        if f.name in NOT_FLAGS:
            continue
        group = groups.setdefault(current, parser.add_argument_group(current))
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        base = next((t for t in get_args(hints[f.name]) if t is not type(None)), hints[f.name])  # X | None → X
        kind = {bool: parse_bool, int: int, float: float}.get(base, str)
        if isinstance(default, list):
            group.add_argument(flag, type=float, nargs=2, default=None, help=f"(default: {default})")
        else:
            group.add_argument(flag, type=kind, default=None, help=f"(default: {default})")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
