"""Where the classifier looks: class-activation maps (pytorch-grad-cam) and scores that turn a map into an audit.

HAM10000 dermoscopy photos often carry a dark vignette ring in their corners, and a model can learn that ring
instead of the lesion. The scores here measure how much CAM mass falls in the corners, the outer frame and outside
the lesion mask; :func:`deletion_change` checks whether the attended pixels actually drive the probability.

Every CAM is at input resolution and aligned with the model's view of the image (centre square or whole frame,
resized), never with the original 200×150 photo.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.base_cam import BaseCAM
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet

from core.audit.corners import border_region, corner_region
from core.ensemble import Ensemble
from core.model import malignant_log_odds, malignant_probability

CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM, "layercam": LayerCAM,
}
TARGET_STRIDE = 16    # CAM layer's downsampling: 10×10 cells at 160 px, 14×14 at 224 px
SUPPORTED_ARCHITECTURES = (EfficientNet, ConvNeXt)


def target_layer(model: torch.nn.Module, stride: int = TARGET_STRIDE) -> torch.nn.Module:
    """The layer whose activations the CAM weighs: the last stage at stride 16 (``stride`` picks another one, e.g.
    8 for a finer, shallower map).

    The usual choice, the last stage (stride 32), gives 5×5 cells at 160 px and 7×7 at 224 px: a ¼-side corner
    square is 1.25–1.75 cells, so a corner cannot be told from an edge. One stage earlier the map is 10×10 / 14×14
    while the features are still high-level.

    * timm EfficientNet / EfficientNet-Lite (b0, lite0/1/2): ``blocks[4]`` (112 channels for lite0/b0), the stage
      after which only the stride-32 stages remain. Note ``blocks[-2]`` is *already* stride 32 (the seven stages
      run at strides 2, 4, 8, 16, 16, 32, 32), so the stride-16 stage is ``blocks[-3]``.
    * timm ConvNeXt (tiny): ``stages[2]`` (stride 16, 9 or 27 blocks deep, most of the network's depth).

    Both are picked from timm's ``feature_info`` (the stage whose reduction is 16), not by a hard-coded index.
    Other architectures raise ``ValueError``: their CAM layer needs choosing (and checking) by hand.
    """
    if not isinstance(model, SUPPORTED_ARCHITECTURES):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_ARCHITECTURES)
        raise ValueError(f"no CAM target layer known for {type(model).__name__}; supported: timm {names}")
    stages = [info["module"] for info in model.feature_info if info["reduction"] == stride]
    if not stages:
        raise ValueError(f"{type(model).__name__} has no stride-{stride} stage in its feature_info")
    return model.get_submodule(str(stages[-1]))


def target_layers(model: torch.nn.Module, stride: int = TARGET_STRIDE) -> list[torch.nn.Module]:
    """:func:`target_layer` of the model, or of each member of an :class:`~core.ensemble.Ensemble`. With several
    layers pytorch-grad-cam min–max scales each member's map and averages them; each member's map is its own
    Grad-CAM, because the ensemble's log-odds moves with every member's log-odds in the same direction."""
    if isinstance(model, Ensemble):
        return [target_layer(member, stride) for member in model.members]
    return [target_layer(model, stride)]


@contextlib.contextmanager
def _gradients_to_input_only(model: torch.nn.Module) -> Iterator[None]:
    """Freeze the weights (and restore train/eval mode and ``requires_grad`` afterwards).

    The CAM needs gradients of the activations only. With trainable weights every call would leave ``.grad`` on all
    parameters (megabytes kept alive in a long-lived dashboard model, or stale gradients in a training loop) and pay
    for the weight gradients in backward. The input is made to require grad instead, so the graph still exists.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class MalignantTarget:
    """pytorch-grad-cam target: the log-odds of malignancy (category 1) or of benignity (0) of one image's output.
    For the single logit this is the logit (as the library's ``BinaryClassifierOutputTarget``); for the dx head it
    is log P(mel ∪ bcc ∪ akiec) − log P(the rest), so both heads are explained by the same decision."""

    def __init__(self, category: int) -> None:
        self.sign = 1.0 if category == 1 else -1.0

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return self.sign * malignant_log_odds(output.unsqueeze(0))[0]


def compute_cam(model: torch.nn.Module, inputs: torch.Tensor, method: str = "gradcam",
                categories: list[int] | None = None, stride: int = TARGET_STRIDE) -> np.ndarray:
    """CAMs ``(N, H, W)`` float32 in [0, 1], aligned with ``inputs`` (the normalised float batch ``(N, 3, H, W)``
    the model takes). ``categories`` says per image which decision to explain: 1 the malignant direction of the
    single logit or of the dx head's malignant mass (the default), 0 the benign one (:class:`MalignantTarget`) —
    pass the predicted class to explain what the model decided.

    The model runs in eval mode (deterministic: no dropout, BatchNorm running statistics); hooks are released when
    the call ends, even on error. Each map is min–max scaled per image by the library, so it says *where*, not how
    strongly; an all-zero map (e.g. every gradient negative) stays all zero. ``stride`` picks the layer
    (:func:`target_layer`).
    """
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    if inputs.ndim != 4:
        raise ValueError(f"inputs must be a batch (N, 3, H, W), got shape {tuple(inputs.shape)}")
    layers = target_layers(model, stride)
    device = next(model.parameters()).device
    x = inputs.detach().to(device, torch.float32).clone().requires_grad_(True)
    categories = [1] * len(x) if categories is None else [int(c) for c in categories]
    if len(categories) != len(x):
        raise ValueError(f"{len(categories)} categories for {len(x)} images")
    targets = [MalignantTarget(c) for c in categories]
    cams = None
    with _gradients_to_input_only(model), torch.enable_grad():
        # The library's __exit__ swallows IndexError, hence ``cams`` is checked below rather than returned here.
        with CAM_METHODS[method](model=model, target_layers=layers) as cam:
            cams = cam(input_tensor=x, targets=targets)
    if cams is None:
        raise RuntimeError(f"{method} failed inside pytorch-grad-cam (an IndexError it reported and swallowed)")
    return np.clip(np.nan_to_num(cams.astype(np.float32), nan=0.0), 0.0, 1.0)


def attention_scores(cam: np.ndarray, mask: np.ndarray | None = None, corner_threshold: float = 0.5) -> dict:
    """Where one CAM ``(H, W)`` puts its mass.

    * ``corner_fraction``: share of the CAM sum in the four ¼-side corner squares (uniform map: 0.25).
    * ``border_fraction``: share in the outer frame ⅛ of the side wide (uniform map: 0.4375).
    * ``outside_lesion_fraction``: share outside the lesion ``mask`` (bool ``(H, W)``, in the model's view).
    * ``background_lesion_ratio``: mean CAM outside ÷ mean CAM inside the lesion, the measure of Tschandl et al.
      (Nat. Med. 2020); ``inf`` when the lesion gets nothing and the background something.
    * ``flag``: *corner-focused attention*, ``corner_fraction >= corner_threshold``. The default 0.5 is twice the
      uniform share: at least half of the attention sits in the quarter of the image that the corners cover.

    Both mask scores are NaN without a mask, or with an empty or full one (there is no inside or no outside); they
    are always present so tables keep their columns. A CAM with no mass gives NaN fractions and ``flag`` False.
    """
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2:
        raise ValueError(f"attention_scores takes one CAM (H, W), got shape {cam.shape}")
    total = cam.sum()
    nan = float("nan")
    scores = {"corner_fraction": nan, "border_fraction": nan, "outside_lesion_fraction": nan,
              "background_lesion_ratio": nan, "flag": False}
    if not np.isfinite(total) or total <= 0:
        return scores
    scores["corner_fraction"] = float(cam[corner_region(cam.shape)].sum() / total)
    scores["border_fraction"] = float(cam[border_region(cam.shape)].sum() / total)
    scores["flag"] = bool(scores["corner_fraction"] >= corner_threshold)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != cam.shape:
            raise ValueError(f"mask shape {mask.shape} differs from CAM shape {cam.shape}: resize it to the model view")
        if mask.any() and not mask.all():
            outside, inside = cam[~mask], cam[mask]
            scores["outside_lesion_fraction"] = float(outside.sum() / total)
            scores["background_lesion_ratio"] = (float(outside.mean() / inside.mean()) if inside.mean() > 0
                                                 else float("inf"))
    return scores


def _probabilities(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return malignant_probability(model(inputs))


@torch.no_grad()
def deletion_change(model: torch.nn.Module, inputs: torch.Tensor, cams: np.ndarray, fraction: float = 0.2,
                    mode: Literal["blur", "remove"] = "blur") -> np.ndarray:
    """``p_after − p_before`` per image when the top-``fraction`` CAM pixels are replaced: with a strong Gaussian
    blur of the image (σ = a tenth of the side; keeps colour, removes structure) or with its mean colour ("remove").

    If a flagged CAM's corners really drive the score, erasing them moves it; a near-zero change means the map
    points at pixels the decision does not depend on. Works on the normalised ``inputs``: blur and mean commute with
    the per-channel affine normalisation, so this equals perturbing the uint8 image. (pytorch-grad-cam's metrics
    multiply the image by the map or use ROAD's costly imputation, and score logits, hence this small version.)
    """
    if mode not in ("blur", "remove"):
        raise ValueError(f"unknown deletion mode {mode!r}; choose 'blur' or 'remove'")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = inputs.detach().to(device, torch.float32)
        n, _, h, w = x.shape
        if np.shape(cams) != (n, h, w):
            raise ValueError(f"cams shape {np.shape(cams)} does not match inputs {tuple(x.shape)}")
        if mode == "blur":
            sigma = max(h, w) / 10
            kernel = min(2 * int(np.ceil(3 * sigma)) + 1, 2 * min(h, w) - 1)  # reflect padding must fit the image
            fill = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
        else:
            fill = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        k = int(round(fraction * h * w))
        flat = torch.from_numpy(np.ascontiguousarray(cams, dtype=np.float32)).reshape(n, -1)
        top = torch.argsort(flat, dim=1, descending=True, stable=True)[:, :k]
        chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True).reshape(n, 1, h, w).to(device)
        perturbed = torch.where(chosen, fill, x)
        before = _probabilities(model, x)
        after = _probabilities(model, perturbed)
        return (after - before).cpu().numpy().astype(np.float64)
    finally:
        model.train(was_training)
