"""Binary focal loss (Lin et al. 2017) on logits, as in the reference recipe (α = 0.6, γ = 2)."""
from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from core.model import DX_CLASSES, MALIGNANT_OUTPUTS


class BinaryFocalLoss(nn.Module):
    """``−α_t (1 − p_t)^γ log p_t``, averaged. ``α`` weighs positives (malignant), ``1 − α`` negatives; ``γ``
    down-weights easy examples so the rare, hard malignant cases drive the gradient.

    Targets may be soft (mixup): ``p_t`` and ``α_t`` are then interpolated between the two classes.
    """

    def __init__(self, alpha: float = 0.6, gamma: float = 2.0) -> None:
        super().__init__()
        if not 0 <= alpha <= 1 or gamma < 0:
            raise ValueError(f"focal loss needs 0 ≤ alpha ≤ 1 and gamma ≥ 0, got alpha={alpha}, gamma={gamma}")
        self.alpha, self.gamma = alpha, gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float().view(-1), targets.float().view(-1)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # −log p_t, stable
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        alpha_t = self.alpha * targets + (1 - self.alpha) * (1 - targets)
        return (alpha_t * (1 - p_t).pow(self.gamma) * bce).mean()


class BinaryCrossEntropy(nn.BCEWithLogitsLoss):
    """Plain BCE on the single logit, taking ``(N, 1)`` logits against ``(N,)`` targets as the focal loss does."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.float().view(-1), targets.float().view(-1))


class SoftmaxFocalLoss(nn.Module):
    """The dx head's focal loss: ``−Σ_c w_c t_c (1 − p_c)^γ log p_c`` over softmax outputs, averaged, with
    ``w_c = α`` for the malignant diagnoses and ``1 − α`` for the others, so α means what it does in the binary
    recipe. Targets are probability vectors ``(N, C)`` (one-hot, or mixed by mixup)."""

    def __init__(self, positive_classes: list[int], num_classes: int, alpha: float = 0.6, gamma: float = 2.0) -> None:
        super().__init__()
        if not 0 <= alpha <= 1 or gamma < 0:
            raise ValueError(f"focal loss needs 0 ≤ alpha ≤ 1 and gamma ≥ 0, got alpha={alpha}, gamma={gamma}")
        weight = torch.full((num_classes,), 1 - alpha)
        weight[positive_classes] = alpha
        self.register_buffer("weight", weight)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        focal = (1 - log_p.exp()).pow(self.gamma)
        weight = cast(torch.Tensor, self.weight)  # a registered buffer
        return -(weight * targets.float() * focal * log_p).sum(-1).mean()


def output_distribution(logits: torch.Tensor) -> torch.Tensor:
    """The head's predicted distribution: ``(N, 2)`` [benign, malignant] for one logit, the softmax for the dx
    head."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=-1)
    return F.softmax(logits, dim=-1)


def jensen_shannon(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Mean Jensen–Shannon divergence between two batches of predictions (AugMix's consistency loss, Hendrycks et
    al. 2020): symmetric and bounded by log 2, so a pair the model already tells apart cannot blow up the loss."""
    p, q = output_distribution(logits_a), output_distribution(logits_b)
    log_m = ((p + q) / 2).clamp_min(1e-7).log()
    kl = lambda d: (d * (d.clamp_min(1e-7).log() - log_m)).sum(-1)  # noqa: E731
    return ((kl(p) + kl(q)) / 2).mean()


def create_loss(name: str = "focal", alpha: float = 0.6, gamma: float = 2.0, head: str = "binary") -> nn.Module:
    """The training loss for a head: focal (the recipe) or plain ("bce": binary cross-entropy on the single logit,
    cross-entropy on the dx head)."""
    if name not in ("focal", "bce"):
        raise ValueError(f"unknown loss {name!r}; choose 'focal' or 'bce'")
    if head == "binary":
        return BinaryFocalLoss(alpha, gamma) if name == "focal" else BinaryCrossEntropy()
    if name == "focal":
        return SoftmaxFocalLoss(MALIGNANT_OUTPUTS, len(DX_CLASSES), alpha, gamma)
    return nn.CrossEntropyLoss()
