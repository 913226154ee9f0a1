"""Backbones: the offline EfficientNet-Lite weights really are ImageNet weights (a cat photo comes out a cat), land
where they belong, are refused when they do not fit, and other architectures fail fast and clearly offline."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage.data import astronaut, chelsea, coffee, rocket
from timm.data import create_transform, resolve_model_data_config

import core.model
from core.model import (
    PretrainedWeightsUnavailable,
    WeightMappingError,
    create_model,
    lite_weights_path,
    pretrained_config,
)

CAT_CLASSES = [281, 282, 285]  # ImageNet tabby, tiger cat, Egyptian cat
LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def preprocessed(cfg: dict, *images: Callable[[], np.ndarray]) -> torch.Tensor:
    transform = create_transform(**cfg)
    return torch.stack([transform(Image.fromarray(image())) for image in images])


@pytest.fixture(scope="module")
def lite0_weights() -> dict[str, torch.Tensor]:
    return torch.load(lite_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", list(LITE_SIZES))
def test_lite_weights_recognise_a_cat(name: str) -> None:
    cfg = pretrained_config(name)
    assert cfg["input_size"] == (3, LITE_SIZES[name], LITE_SIZES[name])
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)  # TF EfficientNet-Lite scaling, not ImageNet mean/std
    model = create_model(name, num_outputs=1000).eval()
    assert resolve_model_data_config(model) == cfg
    with torch.no_grad():
        probs = model(preprocessed(cfg, chelsea)).softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[CAT_CLASSES].sum()) > 0.5


def test_lite_normalisation_matches_the_weights_batchnorm_statistics() -> None:
    """The stem BatchNorm's running variance records the input scale the weights were trained on: over a few photos,
    the configured mean/std put the stem's output variance near it (~0.8x), ImageNet mean/std ~4x above it."""
    model = create_model("efficientnet_lite0", num_outputs=1000).eval()
    cfg = pretrained_config("efficientnet_lite0")
    bn = model.bn1
    live = bn.running_var > 1e-3  # a few stem channels are dead (zero variance)

    def variance_ratio(mean: tuple, std: tuple) -> float:
        with torch.no_grad():
            out = model.conv_stem(preprocessed({**cfg, "mean": mean, "std": std}, chelsea, coffee, rocket, astronaut))
        return float((out.var((0, 2, 3))[live] / bn.running_var[live]).log().mean().exp())

    assert 0.5 < variance_ratio(cfg["mean"], cfg["std"]) < 2
    assert variance_ratio((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) > 3


def test_binary_head_is_fresh_and_backbone_is_the_packages(lite0_weights: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_outputs=1)
    torch.manual_seed(0)
    random = create_model("efficientnet_lite0", pretrained=False, num_outputs=1)
    assert torch.equal(model.conv_stem.weight, lite0_weights["_conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, lite0_weights["_bn1.running_var"])  # the last backbone tensor
    assert torch.equal(model.classifier.weight, random.classifier.weight)  # the same fresh init
    assert model.classifier.weight.std() < 0.02 and not model.classifier.bias.any()
    assert torch.equal(model.classifier.bias, random.classifier.bias)
    assert model.eval()(torch.zeros(2, 3, 224, 224)).shape == (2, 1)


def corrupt(weights: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    items = list(weights.items())
    if how == "shape":
        return {k: v[:, :-1] if k == "_blocks.3._project_conv.weight" else v for k, v in items}
    if how == "count":
        return {k: v for k, v in items if k != "_blocks.3._project_conv.weight"}
    if how == "order":  # running_mean and running_var swapped: same shapes, scrambled meaning
        i = next(i for i, (k, _) in enumerate(items) if k == "_bn0.running_mean")
        items[i], items[i + 1] = items[i + 1], items[i]
        return dict(items)
    return {k: v for k, v in items if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize(("how", "message"), [
    ("shape", r"package '_blocks\.3\._project_conv\.weight' \(40, 143, 1, 1\) does not fit timm "
              r"'blocks\.2\.0\.conv_pwl\.weight' \(40, 144, 1, 1\)"),
    ("count", r"the package has 244 tensors to load, timm's model 245"),
    ("order", r"package '_bn0\.running_var' \(32,\) does not fit timm 'bn1\.running_mean' \(32,\)"),
], ids=["shape", "count", "order"])
def test_mismatched_package_weights_are_refused(lite0_weights: dict[str, torch.Tensor], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, how: str, message: str) -> None:
    torch.save(corrupt(lite0_weights, how), tmp_path / "w.pth")
    monkeypatch.setattr(core.model, "lite_weights_path", lambda name: str(tmp_path / "w.pth"))
    with pytest.raises(WeightMappingError, match=message):
        create_model("efficientnet_lite0")


def test_package_weights_without_batch_counters_still_load(lite0_weights: dict[str, torch.Tensor], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save(corrupt(lite0_weights, "no counters"), tmp_path / "w.pth")
    monkeypatch.setattr(core.model, "lite_weights_path", lambda name: str(tmp_path / "w.pth"))
    assert torch.equal(create_model("efficientnet_lite0").conv_stem.weight, lite0_weights["_conv_stem.weight"])


@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_tiny"])
def test_other_architectures_build_without_weights(name: str) -> None:
    model = create_model(name, pretrained=False).eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 1)
    assert pretrained_config(name) == resolve_model_data_config(timm.create_model(name))


def test_unreachable_hub_fails_fast_and_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    if core.model._reachable("huggingface.co"):
        pytest.skip("huggingface.co is reachable here: efficientnet_b0 would download")
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable, match=r"'efficientnet_b0' offline: huggingface\.co is "
                                                           r"unreachable \(pass pretrained=False.*efficientnet_lite0"):
        create_model("efficientnet_b0")
    assert time.monotonic() - start < 15


def test_unreachable_host_is_refused_before_any_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(core.model, "_reachable", lambda host: False)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(PretrainedWeightsUnavailable, match="convnext_tiny"):
        create_model("convnext_tiny")


def test_offline_mode_tries_only_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(core.model, "_reachable", lambda host: pytest.fail("probed the network"))
    with pytest.raises(PretrainedWeightsUnavailable, match="could not get pretrained weights for 'efficientnet_b0'"):
        create_model("efficientnet_b0")
