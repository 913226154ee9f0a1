"""A small ensemble shipped as one run directory: the members' P(malignant) averaged.

Members are trained runs that see the same input (size and normalisation); their heads may differ (a single logit
and a dx head mix freely, because each is read through ``malignant_probability``). The ensemble answers with one
logit, the log-odds of the mean probability, so thresholds, metrics, the predictor and Grad-CAM treat it like any
single-logit model. Layout of the run directory::

    config.yaml           the first member's config, with ``ensemble: [members/<name>, …]`` and ``head: binary``
    model.safetensors     every member's weights in one file (keys ``members.<k>.…``), fp16
    members/<name>/       each member's own config.yaml and history.csv: how it was trained
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from torch import nn

from core import checkpoint
from core.config import TrainConfig
from core.data import project_path
from core.model import malignant_probability

MEMBERS_DIR = "members"
# What `evaluate` / `explain` wrote about a run: removed when --overwrite replaces the run with another ensemble.
STALE_OUTPUTS = ("metrics*.json", "predictions_*.csv", "attention_*.csv", "attention_summary.json", "cams_*.npz",
                 "stress_*.csv", "stress_summary.json", "index.safetensors", "ood_scores.csv", "ood_summary.json")
LOGIT_EPS = 1e-6  # keeps the log-odds of a mean probability of exactly 0 or 1 finite


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1)``: log-odds of the members' mean P(malignant) (averaging probabilities, not logits, so a dx
        head and a single logit weigh alike)."""
        p = torch.stack([malignant_probability(member(x)) for member in self.members]).mean(0)
        return torch.logit(p, eps=LOGIT_EPS).unsqueeze(1)


def member_configs(run_dir: Path, cfg: TrainConfig) -> list[TrainConfig]:
    missing = [member for member in cfg.ensemble if not (run_dir / member / "config.yaml").is_file()]
    if missing:
        raise checkpoint.CheckpointError(f"{run_dir} is an ensemble whose member config(s) are missing: "
                                         + ", ".join(f"{m}/config.yaml" for m in missing))
    return [TrainConfig.from_yaml(run_dir / member / "config.yaml") for member in cfg.ensemble]


def init_weights(model: nn.Module, source: str | Path) -> nn.Module:
    """Fine-tuning's starting point: the best weights of a trained run, or of one member of an ensemble run given
    as ``RUN/members/NAME`` (its part of the ensemble's one weights file)."""
    source = project_path(source)
    if (source / checkpoint.MODEL_FILE).is_file():
        return checkpoint.load_weights(model, source / checkpoint.MODEL_FILE)
    run, name = source.parent.parent, f"{MEMBERS_DIR}/{source.name}"
    members = TrainConfig.from_yaml(run / "config.yaml").ensemble if (run / "config.yaml").is_file() else []
    if source.parent.name != MEMBERS_DIR or name not in members:
        raise checkpoint.CheckpointError(f"--init-from {source}: neither a trained run (no {checkpoint.MODEL_FILE}) "
                                         f"nor a member of an ensemble run (RUN/{MEMBERS_DIR}/NAME)")
    prefix = f"members.{members.index(name)}."
    tensors = checkpoint.read_tensors(run / checkpoint.MODEL_FILE)
    return checkpoint.load_state(model, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                 f"{run / checkpoint.MODEL_FILE} [{name}]")


def check_compatible(configs: list[TrainConfig], names: list[str]) -> None:
    """Members must take the very same input tensor: one preprocessing serves them all."""
    from core.engine import resolve_normalization

    first = configs[0]
    for cfg, name in zip(configs[1:], names[1:]):
        if cfg.ensemble:
            raise ValueError(f"{name} is itself an ensemble; list its members instead")
        for what, mine, theirs in (("input_size", cfg.input_size, first.input_size), ("crop", cfg.crop, first.crop),
                                   ("normalization", resolve_normalization(cfg), resolve_normalization(first)),
                                   ("shades_of_gray", cfg.shades_of_gray, first.shades_of_gray),
                                   ("mask_corners", cfg.mask_corners, first.mask_corners)):
            if mine != theirs:
                raise ValueError(f"ensemble members must share {what}: {names[0]} has {theirs}, {name} has {mine}")
        # Thresholds are chosen on val and the metrics read on test: a member trained on another split may have
        # trained on those very images.
        if project_path(cfg.split_file).resolve() != project_path(first.split_file).resolve():
            raise ValueError(f"ensemble members must be trained on the same split file: {names[0]} used "
                             f"{first.split_file}, {name} used {cfg.split_file} (its val/test images may be in the "
                             "other's training set)")


def create_ensemble(member_runs: list[str | Path], out: str | Path, tta_flips: bool | None = None,
                    tta_views: int | None = None, overwrite: bool = False) -> Path:
    """Build an ensemble run directory from trained runs (``train.py ensemble``); then ``train.py evaluate`` it.
    TTA is the ensemble's own setting (default: the first member's)."""
    from core.engine import load_run

    runs = [Path(r) for r in member_runs]
    out = Path(out)
    names = [r.resolve().name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"ensemble members need distinct directory names, got {names}")
    if (out / checkpoint.MODEL_FILE).exists() and not overwrite:
        raise ValueError(f"{out} already holds a run; use --overwrite or another --out")
    configs = [TrainConfig.from_yaml(r / "config.yaml") if (r / "config.yaml").is_file() else None for r in runs]
    missing = [str(r) for r, c in zip(runs, configs) if c is None]
    if missing:
        raise ValueError(f"not run directories (no config.yaml): {', '.join(missing)}")
    if configs[0].ensemble:
        raise ValueError(f"{runs[0]} is itself an ensemble; list its members instead")
    check_compatible(configs, [str(r) for r in runs])
    models = [load_run(r)[1] for r in runs]
    if overwrite and out.is_dir():  # what described the replaced run would describe the wrong model
        shutil.rmtree(out / MEMBERS_DIR, ignore_errors=True)
        for pattern in STALE_OUTPUTS:
            for path in out.glob(pattern):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for run, name, cfg in zip(runs, names, configs):
        member_dir = out / MEMBERS_DIR / name
        member_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(member_dir / "config.yaml")
        if (run / "history.csv").is_file():
            shutil.copyfile(run / "history.csv", member_dir / "history.csv")
    checkpoint.save_weights(Ensemble(models), out / checkpoint.MODEL_FILE, dtype=torch.float16)
    # A member's own calibration does not carry over: the ensemble's mean is calibrated (or not) by itself.
    top = dataclasses.replace(configs[0], head="binary", ensemble=[f"{MEMBERS_DIR}/{n}" for n in names],
                              calibration=[1.0, 0.0],
                              tta_flips=configs[0].tta_flips if tta_flips is None else tta_flips,
                              tta_views=configs[0].tta_views if tta_views is None else tta_views)
    top.to_yaml(out / "config.yaml")
    return out
