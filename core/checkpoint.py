"""Checkpoints as safetensors + JSON: weights and training state load without ever unpickling anything."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from core.io import atomic_write, atomic_write_text
from core.runs import STATE_META, RunError


class CheckpointError(RunError):
    """A checkpoint that is missing, corrupt, or does not fit the model its config describes."""


def save_weights(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """The model's state dict (``dtype`` casts floating tensors, e.g. fp16 to ship half the bytes)."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in _unwrap(model).state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights into ``model`` (cast to its dtypes); any missing/extra key or shape mismatch is an error."""
    return load_state(model, _read(path), path)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """:func:`load_weights` for tensors already read from ``path`` (e.g. one member's part of an ensemble file)."""
    target = _unwrap(model).state_dict()
    missing, extra = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in target.items()
             if k in state and state[k].shape != v.shape]
    if missing or extra or wrong:
        details = "; ".join(filter(None, [f"missing {missing[:3]}" if missing else "",
                                          f"unexpected {extra[:3]}" if extra else "",
                                          f"shape mismatch {wrong[:3]}" if wrong else ""]))
        raise CheckpointError(f"{path} does not fit the model in its config ({details})")
    _unwrap(model).load_state_dict({k: state[k].to(v.dtype) for k, v in target.items()})
    return model


def save_training_state(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Resume state in one file: tensors (model, EMA, optimiser moments) in safetensors, everything else (epoch,
    scheduler, best AUROC, …) as JSON in its header. One atomic rename commits an epoch, so a kill at any moment
    leaves the previous epoch's state or this one, never tensors of one epoch with the counters of another.
    ``last.json`` beside it is a readable copy for people and the dashboard; resuming never trusts it.
    """
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"epoch": str(meta["epoch"]), "meta": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    atomic_write_text(path.with_name(STATE_META), json.dumps(meta, indent=1))


def load_training_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = load_training_meta(path)
    return _read(path), meta


def load_training_meta(path: str | Path) -> dict[str, Any]:
    """What :func:`save_training_state` committed beside the tensors (reads the file's header only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no resumable state in {path.parent} ({path.name} missing: no epoch has finished)")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        return json.loads(header["meta"]) if "meta" in header else _meta_of_older_runs(path, header)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable training state ({err})") from err


def _meta_of_older_runs(path: Path, header: dict[str, str]) -> dict[str, Any]:
    """Runs saved before the meta moved into the header kept it only in last.json, written second: trusted only
    when it names the same epoch as the tensors (a kill between the two writes leaves them disagreeing)."""
    meta_path = path.with_name(STATE_META)
    if not meta_path.is_file():
        raise CheckpointError(f"no resumable state in {path.parent} ({STATE_META} missing)")
    meta = json.loads(meta_path.read_text())
    if str(meta.get("epoch")) != header.get("epoch"):
        raise CheckpointError(f"{meta_path} (epoch index {meta.get('epoch')}) and {path} (epoch index "
                              f"{header.get('epoch')}) disagree: the run was stopped while saving and cannot resume")
    return meta


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimiser state dict: per-parameter tensors → ``optim.<index>.<name>``; groups stay JSON."""
    state = optimizer.state_dict()
    tensors = {f"optim.{index}.{name}": value if torch.is_tensor(value) else torch.tensor(value)
               for index, slots in state["state"].items() for name, value in slots.items()}
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or a CheckpointError naming the file."""
    return _read(path)


def _read(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers, so keys never carry 'module.' or '_orig_mod.'."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
