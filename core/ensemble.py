"""A small ensemble shipped as one run directory: the members' P(malignant) averaged.

Members are trained runs that see the same input (size and normalisation); their heads may differ (a single logit
and a dx head mix freely, because each is read through ``malignant_probability``). Their corner masks may differ
too: the ensemble's shared view then has none (its config says ``mask_corners: false``), and a masked member paints
its own mask onto its copy of the normalised input, so each member sees exactly what it was trained on. A member
that never sees the corners then halves what a painted corner can move. The ensemble answers with one
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
from typing import Literal

import torch
from torch import nn
from torchvision import tv_tensors

from core import checkpoint
from core.config import RunConfig
from core.data import project_path
from core.model import malignant_probability, model_from_config, resolve_normalization
from core.runs import (
    CONFIG_FILE,
    HISTORY_FILE,
    LINEAGE_FILE,
    MEMBERS_DIR,
    MODEL_FILE,
    RunError,
    is_run_dir,
    member_configs,
    read_config,
    remove_derived_outputs,
    write_config,
)
from core.transforms import CORNER_FILL, CornerMask, normalize_transform

LOGIT_EPS = 1e-6  # keeps the log-odds of a mean probability of exactly 0 or 1 finite


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module], input_masks: list[CornerMask | None] | None = None) -> None:
        """``input_masks``: per member, the corner mask it applies to its own copy of the normalised input (None:
        it takes the shared input as it is); see :func:`member_input_masks`."""
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.input_masks = list(input_masks) if input_masks is not None else [None] * len(members)
        if len(self.input_masks) != len(members):
            raise ValueError(f"{len(members)} members but {len(self.input_masks)} input masks")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1)``: log-odds of the members' mean P(malignant) (averaging probabilities, not logits, so a dx
        head and a single logit weigh alike)."""
        p = torch.stack([malignant_probability(member(x if mask is None else mask(x)))
                         for member, mask in zip(self.members, self.input_masks)]).mean(0)
        return torch.logit(p, eps=LOGIT_EPS).unsqueeze(1)


def shared_corner_mask(configs: list[RunConfig]) -> float | None:
    """The corner mask the ensemble's shared view carries: the members' own when they all have the same one, none
    when they differ (an unmasked member must see the corners)."""
    masks = {cfg.corner_mask for cfg in configs}
    return masks.pop() if len(masks) == 1 else None


def member_input_masks(configs: list[RunConfig], shared: float | None) -> list[CornerMask | None]:
    """Per member, the mask it must add to the shared view (``shared``: that view's radius, or None): its own, in
    normalised units (:data:`CORNER_FILL` through the normalisation, exact because check_compatible allows
    differing masks only with a fixed per-channel normalisation), or None where the shared view already is its own."""
    out: list[CornerMask | None] = []
    for cfg in configs:
        if cfg.corner_mask == shared:
            out.append(None)
            continue
        fill = torch.tensor(CORNER_FILL, dtype=torch.uint8).view(3, 1, 1)
        normalised = normalize_transform(resolve_normalization(cfg))(tv_tensors.Image(fill))
        assert cfg.corner_mask is not None  # a masked member beside an unmasked shared view (else it equals shared)
        out.append(CornerMask(cfg.corner_mask, normalised.as_subclass(torch.Tensor).view(3)))
    return out


def model_for_run(run_dir: str | Path, cfg: RunConfig) -> nn.Module:
    """The network a run's weights file fits: one model, or an :class:`Ensemble` of its members' networks."""
    if cfg.ensemble:
        configs = member_configs(run_dir, cfg)
        return Ensemble([model_from_config(member) for member in configs],
                        member_input_masks(configs, cfg.corner_mask))
    return model_from_config(cfg)


def init_weights(model: nn.Module, source: str | Path) -> nn.Module:
    """Fine-tuning's starting point: the best weights of a trained run, or of one member of an ensemble run given
    as ``RUN/members/NAME`` (its part of the ensemble's one weights file)."""
    source = project_path(source)
    if (source / MODEL_FILE).is_file():
        return checkpoint.load_weights(model, source / MODEL_FILE)
    run, name = source.parent.parent, f"{MEMBERS_DIR}/{source.name}"
    members = read_config(run).ensemble if (run / CONFIG_FILE).is_file() else []
    if source.parent.name != MEMBERS_DIR or name not in members:
        raise checkpoint.CheckpointError(f"--init-from {source}: neither a trained run (no {MODEL_FILE}) "
                                         f"nor a member of an ensemble run (RUN/{MEMBERS_DIR}/NAME)")
    prefix = f"members.{members.index(name)}."
    tensors = checkpoint.read_tensors(run / MODEL_FILE)
    return checkpoint.load_state(model, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                 f"{run / MODEL_FILE} [{name}]")


def check_compatible(configs: list[RunConfig], names: list[str]) -> None:
    """Members must take the very same input tensor: one preprocessing serves them all (up to each member's own
    corner mask, which it can add to the normalised tensor when the normalisation does not look at the pixels)."""
    first = configs[0]
    for cfg, name in zip(configs[1:], names[1:]):
        if cfg.ensemble:
            raise ValueError(f"{name} is itself an ensemble; list its members instead")
        for what, mine, theirs in (("input_size", cfg.input_size, first.input_size), ("crop", cfg.crop, first.crop),
                                   ("normalization", resolve_normalization(cfg), resolve_normalization(first)),
                                   ("shades_of_gray", cfg.shades_of_gray, first.shades_of_gray)):
            if mine != theirs:
                raise ValueError(f"ensemble members must share {what}: {names[0]} has {theirs}, {name} has {mine}")
        if cfg.corner_mask != first.corner_mask and (first.shades_of_gray or first.normalization == "per_image"):
            # Both statistics are taken over the whole view, corners included: masking after them is not masking
            # before them, so a member could not rebuild its own input from an unmasked shared one.
            raise ValueError(f"ensemble members with different corner masks ({names[0]}: {first.corner_mask}, "
                             f"{name}: {cfg.corner_mask}) need a fixed per-channel normalisation without "
                             f"Shades-of-Gray; these use normalization {first.normalization!r}, shades_of_gray "
                             f"{first.shades_of_gray}")
        # Thresholds are chosen on val and the metrics read on test: a member trained on another split may have
        # trained on those very images.
        if project_path(cfg.split_file).resolve() != project_path(first.split_file).resolve():
            raise ValueError(f"ensemble members must be trained on the same split file: {names[0]} used "
                             f"{first.split_file}, {name} used {cfg.split_file} (its val/test images may be in the "
                             "other's training set)")


def create_ensemble(member_runs: list[str | Path], out: str | Path, tta_views: Literal[1, 2, 3, 4] | None = None,
                    overwrite: bool = False) -> Path:
    """Build an ensemble run directory from trained runs (``train.py ensemble``); then ``train.py evaluate`` it.
    TTA is the ensemble's own setting (default: the first member's)."""
    runs = [Path(r) for r in member_runs]
    out = Path(out)
    names = [r.resolve().name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"ensemble members need distinct directory names, got {names}")
    if (out / MODEL_FILE).exists() and not overwrite:
        raise ValueError(f"{out} already holds a run; use --overwrite or another --out")
    not_runs = [str(r) for r in runs if not is_run_dir(r)]
    if not_runs:
        raise RunError(f"not run directories (no {CONFIG_FILE} and {MODEL_FILE}): {', '.join(not_runs)}")
    configs = [read_config(r) for r in runs]
    if configs[0].ensemble:
        raise ValueError(f"{runs[0]} is itself an ensemble; list its members instead")
    check_compatible(configs, [str(r) for r in runs])
    models = [checkpoint.load_weights(model_from_config(cfg), r / MODEL_FILE) for r, cfg in zip(runs, configs)]
    if overwrite and out.is_dir():  # what described the replaced run would describe the wrong model
        shutil.rmtree(out / MEMBERS_DIR, ignore_errors=True)
        remove_derived_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    for run, name, cfg in zip(runs, names, configs):
        member_dir = out / MEMBERS_DIR / name
        member_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, member_dir)
        for kept in (HISTORY_FILE, LINEAGE_FILE):
            if (run / kept).is_file():
                shutil.copyfile(run / kept, member_dir / kept)
    checkpoint.save_weights(Ensemble(models), out / MODEL_FILE, dtype=torch.float16)
    # A member's own calibration does not carry over: the ensemble's mean is calibrated (or not) by itself.
    shared = shared_corner_mask(configs)
    top = dataclasses.replace(configs[0], head="binary", ensemble=[f"{MEMBERS_DIR}/{n}" for n in names],
                              mask_corners=shared is not None, mask_radius=shared or 1.0,
                              calibration=[1.0, 0.0],
                              tta_views=configs[0].tta_views if tta_views is None else tta_views)
    write_config(top, out)
    return out
