"""A run's configuration: defaults here, a YAML file over them, command-line flags over that. The resolved
:class:`RunConfig` is saved in the run directory (``config.yaml``) and is what every command and the dashboard read.
It is two parts in one flat file: :class:`TrainConfig`, how the model is trained, and :class:`PredictionSettings`,
how the trained run predicts (TTA views, the evaluation batch, the Platt calibration): of those, training reads only
the batch size of its per-epoch validation.

Each field is declared once, with its help text and flag group as field metadata and ``Literal`` types for its
choices, so ``train.py fit --help`` explains every flag and argparse (or :meth:`RunConfig.from_dict`, for a YAML
file) refuses a bad choice by itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Self, get_args, get_origin, get_type_hints

import yaml

from core.data import DEFAULT_SPLIT_FILE
from core.io import atomic_write_text


def option(default: Any, help: str, group: str) -> Any:
    """A config field: its default, one sentence for ``--help``, and the flag group it is listed under."""
    metadata = {"help": help, "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """How a model is trained: its data, network, loss, sampling, augmentation and optimisation."""
    data_dir: str | None = option(None, "HAM10000 folder; without it $HAM10000_DIR, data/ham10000, then "
                                        "../shared/data/ham10000 are tried", "data")
    split_file: str = option(DEFAULT_SPLIT_FILE, "lesion-wise train/val/test split file (`train.py split` writes "
                                                 "it)", "data")
    train_limit: int | None = option(None, "train on N randomly drawn training images only (CPU smoke runs)",
                                     "data")
    model: str = option("efficientnet_lite0", "timm architecture; efficientnet_lite0/1/2 have ImageNet weights "
                                              "offline", "model")
    pretrained: bool = option(True, "start the backbone from ImageNet weights", "model")
    init_from: str | None = option(None, "start from a trained run's weights (or RUN/members/NAME of an ensemble "
                                         "run): fine-tuning", "model")
    input_size: int = option(224, "model view height in px (and width, with the square crop)", "model")
    crop: Literal["square", "frame"] = option("square", "square: the centre square; frame: the whole 4:3 frame",
                                              "model")
    mask_corners: bool = option(False, "a constant colour outside the inscribed circle/ellipse, in training and "
                                       "at every prediction", "model")
    mask_radius: float = option(1.0, "with mask_corners, the mask's radius (1 = the inscribed circle/ellipse); below "
                                     "1 it also hides the outer ring, where a strong vignette reaches inside", "model")
    normalization: Literal["pretrained", "imagenet", "per_image"] = option(
        "pretrained", "pretrained: the weights' own mean/std; imagenet: ImageNet's; per_image: zero mean and unit "
                      "variance per image", "model")
    shades_of_gray: bool = option(False, "Shades-of-Gray colour constancy before normalising", "model")
    drop_rate: float = option(0.2, "dropout before the classifier", "model")
    head: Literal["binary", "dx"] = option("binary", "binary: one logit; dx: the 7 HAM10000 diagnoses, "
                                                     "P = mel + bcc + akiec", "model")
    ensemble: list[str] = option([], "member run folders (written by `train.py ensemble`); [] = one model",
                                 "model")
    loss: Literal["focal", "bce"] = option("focal", "focal (binary focal loss) or bce", "loss and sampling")
    focal_alpha: float = option(0.6, "focal loss weight of the malignant class", "loss and sampling")
    focal_gamma: float = option(2.0, "focal loss focusing exponent (0 = weighted BCE)", "loss and sampling")
    positive_fraction: float = option(0.4, "share of malignant images the balanced sampler draws; 0 = plain "
                                           "shuffling", "loss and sampling")
    source_balanced: bool = option(False, "draw malignant images at positive_fraction within every source (the "
                                          "image's dataset/source/site), so the source says nothing about the label",
                                   "loss and sampling")
    mixup: float = option(0.0, "Beta(a, a) mixup strength; 0 = off", "loss and sampling")
    corner_consistency: float = option(0.0, "weight of a Jensen–Shannon term between each training image's "
                                            "prediction and its copy's with a random corner artifact; 0 = off",
                                       "loss and sampling")
    camera_consistency: float = option(0.0, "weight of a Jensen–Shannon term between each training image's "
                                            "prediction and its copy's re-taken as another camera might (resolution, "
                                            "blur, tone curve, white balance); 0 = off", "loss and sampling")
    source_adversary: float = option(0.0, "strength λ of an adversarial source head: a small classifier learns each "
                                          "training image's source from the pooled features while a gradient "
                                          "reversal makes the backbone hide it; 0 = off", "loss and sampling")
    source_adversary_given_dx: bool = option(False, "the source head also sees each image's diagnosis, so the "
                                                    "features need to hide only what the source says beyond the "
                                                    "diagnosis mix", "loss and sampling")
    rotation: float = option(15.0, "random rotation up to ± this many degrees", "augmentation")
    jitter: float = option(0.1, "brightness, contrast and saturation jitter (a factor in 1 ± this)",
                           "augmentation")
    crop_scale: list[float] = option([0.9, 1.0], "area range of the random resized crop", "augmentation")
    zoom: list[float] = option([1.0, 1.1], "zoom-in range on top of the crop", "augmentation")
    corner_artifacts: float = option(0.0, "share of training images given a random vignette or corner fill",
                                     "augmentation")
    corner_ring_start: list[float] = option([0.75, 1.05], "range of a random vignette's inner radius (1 = the "
                                                          "inscribed circle)", "augmentation")
    corner_fill_share: float = option(0.25, "share of the corner artifacts that are corner fills, not vignettes",
                                      "augmentation")
    camera_augment: float = option(0.0, "share of training images re-taken as another camera might (resolution, "
                                        "blur, tone curve, white balance at random strengths); 0 = off",
                                   "augmentation")
    epochs: int = option(30, "number of passes over the training split", "optimisation")
    batch_size: int = option(32, "images per training step", "optimisation")
    grad_accum: int = option(1, "steps whose gradients add up before each optimiser step", "optimisation")
    lr: float = option(3e-4, "AdamW peak learning rate (cosine decay over the run)", "optimisation")
    weight_decay: float = option(1e-4, "AdamW's decoupled weight decay", "optimisation")
    head_warmup_epochs: int = option(1, "epochs training the head only (backbone frozen); 0 = full fine-tuning",
                                     "optimisation")
    ema_decay: float = option(0.0, "EMA of the weights, evaluated and saved instead of the raw ones; 0 = off",
                              "optimisation")
    early_stopping: int = option(0, "stop after N epochs without a better val AUROC; 0 = off", "optimisation")
    amp: bool = option(True, "bf16 autocast on CUDA (ignored on the CPU)", "optimisation")
    channels_last: bool = option(True, "channels-last memory format (faster convolutions)", "optimisation")
    compile: bool = option(False, "run the training model through torch.compile", "optimisation")
    seed: int = option(0, "seed of every random draw (sampler, augmentation, dropout, head init)",
                     "seed and device")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: a CUDA GPU if there is one, else the CPU",
                                                    "seed and device")

    def __post_init__(self) -> None:
        for name, choices in field_choices().items():
            if hasattr(self, name) and getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, "
                                 f"got {getattr(self, name)!r}")
        for name, why in (("corner_consistency", "a blended image has no unedited twin"),
                          ("camera_consistency", "a blended image has no unedited twin"),
                          ("source_adversary", "a blended image has no one source")):
            weight = getattr(self, name)
            if weight < 0 or (weight > 0 and self.mixup > 0):
                raise ValueError(f"{name} must be ≥ 0 and cannot be combined with mixup ({why}), got {weight} with "
                                 f"mixup {self.mixup}")
        if self.source_adversary > 0 and self.compile:
            raise ValueError("source_adversary reads the pooled features between the network's parts, which "
                             "torch.compile would bypass: train it without compile")
        if self.source_adversary_given_dx and self.source_adversary <= 0:
            raise ValueError("source_adversary_given_dx conditions the source head: it needs source_adversary > 0")
        if not 0 < self.mask_radius <= math.sqrt(2):
            raise ValueError(f"mask_radius must be in (0, √2] (1 = the inscribed circle/ellipse, √2 = the view's "
                             f"corners), got {self.mask_radius}")

    @property
    def corner_mask(self) -> float | None:
        """The corner mask's radius, or None without one: what the model's view depends on."""
        return self.mask_radius if self.mask_corners else None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        data = read_config_file(Path(path))
        extends = re.search(r"^extends:", Path(path).read_text(), flags=re.M) is not None
        return cls.from_dict(data, source=f"{path}{' (or a file it extends)' if extends else ''}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Self:
        data = _migrate(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config key(s) {', '.join(unknown)}")
        return cls(**data)

    def to_yaml(self, path: str | Path) -> Path:
        return atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))

    def override(self, args: argparse.Namespace) -> Self:
        """Flags the user actually gave (not None) win over the file and the defaults."""
        return dataclasses.replace(self, **given_settings(args))


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The config flags the user actually gave (argparse leaves the others None)."""
    return {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name, None) is not None}


@dataclass
class PredictionSettings:
    """How a trained run predicts (evaluation, ``predict``, the Predictor, the dashboard); ``train.py calibrate`` and
    ``ensemble`` rewrite them without touching the weights. Training reads only ``eval_batch_size`` (validation)."""
    tta_views: Literal[1, 2, 3, 4] = option(1, "flip views averaged at evaluation and prediction: 1 = none, 2 = "
                                               "identity + horizontal flip, 4 = all four", "evaluation")
    eval_batch_size: int = option(128, "images per batch when predicting val, test or other sets",
                                  "evaluation")
    calibration: list[float] = option([1.0, 0.0], "Platt scaling (a, b) of P(malignant), p = σ(a·logit p + b), "
                                                  "written by `train.py calibrate`", "evaluation")

    def check_prediction_settings(self) -> None:
        a_b = self.calibration
        if not (isinstance(a_b, list | tuple) and len(a_b) == 2 and all(math.isfinite(float(v)) for v in a_b)
                and float(a_b[0]) > 0):
            raise ValueError(f"calibration must be two finite numbers [a, b] with a > 0 (p = σ(a·logit p + b)), "
                             f"got {a_b!r}")


@dataclass
class RunConfig(PredictionSettings, TrainConfig):
    """A run's ``config.yaml``: how it was trained and how it predicts, one flat file. What every command and the
    dashboard read; ``fit`` writes it, ``calibrate`` and ``ensemble`` update its prediction settings."""

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        self.check_prediction_settings()


def read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config's settings over those of the file its ``extends:`` names (relative to it), recursively: the
    shipped model's stages (``configs/shipped``) state what each changes and share the base recipe."""
    if not path.is_file():
        named_by = f" (named by `extends:` in {seen[-1]})" if seen else ""
        raise ValueError(f"config file {path} does not exist{named_by}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds `key: value` settings, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = (path.parent / str(parent)).resolve()
    if parent_path in seen or parent_path == path.resolve():
        raise ValueError(f"{path}: `extends: {parent}` loops back to a file that extends it")
    return {**read_config_file(parent_path, (*seen, path.resolve())), **data}


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Configs written before flip TTA became one setting said ``tta_flips: true`` plus ``tta_views`` (default 4)."""
    if "tta_flips" not in data:
        return data
    data = dict(data)
    flips = data.pop("tta_flips")
    data["tta_views"] = data.get("tta_views", 4) if flips else 1
    return data


def literal_choices(hint: Any) -> tuple:
    """The allowed values of a ``Literal[...]`` type (also inside ``X | None``); () for any other type."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    return next((get_args(t) for t in get_args(hint) if get_origin(t) is Literal), ())


@functools.cache
def field_choices() -> dict[str, tuple]:
    """Each ``Literal`` field's allowed values, resolved once: every config built (``dataclasses.replace`` too) is
    checked against them, and resolving the type hints each time cost ~1.5 ms a config."""
    hints = get_type_hints(RunConfig)
    return {f.name: choices for f in fields(RunConfig) if (choices := literal_choices(hints[f.name]))}


NOT_FLAGS = {"ensemble", "calibration"}  # written by `train.py ensemble` / `calibrate`, not training options


def _factory_default(f: dataclasses.Field) -> Any:
    """A field's ``default_factory()`` (a list default), or None for a field without one."""
    factory = f.default_factory
    return factory() if callable(factory) else None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, in its group, with its help sentence; flags default to None so that only the
    given ones override the YAML file."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = get_type_hints(RunConfig)
    for f in fields(RunConfig):
        if f.name in NOT_FLAGS:
            continue
        if f.metadata["group"] not in groups:
            groups[f.metadata["group"]] = parser.add_argument_group(f.metadata["group"])
        group = groups[f.metadata["group"]]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else _factory_default(f)
        help_text = f.metadata["help"] + ("" if default is None else f" (default: {default})")
        choices = field_choices().get(f.name)
        base = next((t for t in get_args(hints[f.name]) if t is not type(None)), hints[f.name])  # X | None → X
        if choices:
            group.add_argument(flag, type=type(choices[0]), choices=choices, default=None, help=help_text)
        elif isinstance(default, list):
            group.add_argument(flag, type=float, nargs=2, default=None, help=help_text)
        else:
            kinds: dict[object, Callable[[str], Any]] = {bool: parse_bool, int: int, float: float}
            kind = kinds.get(base, str)
            group.add_argument(flag, type=kind, default=None, help=help_text)


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
