"""An adversarial source head (DANN, Ganin et al. 2016): a small classifier learns to tell an image's source (clinic,
camera) from the backbone's pooled features, while a gradient reversal layer makes the backbone work against it.
The features are pushed to hold as little of the source as the task allows, so a model cannot lean on the camera.

The head lives beside the network, never in its weights: a trained run's ``model.safetensors`` is the same network
with or without it, and predicting never sees it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.model import classifier

ADVERSARY_HIDDEN = 256  # a hidden layer: a linear probe is too weak an adversary to push the features far


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``−weight`` backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad, None  # type: ignore[attr-defined]


class SourceAdversary(nn.Module):
    """Source logits from pooled features, through a gradient reversal of strength ``weight``: the head itself
    learns at full rate, the backbone gets ``−weight`` times its gradient."""

    def __init__(self, num_features: int, sources: list[str], weight: float) -> None:
        super().__init__()
        if len(sources) < 2:
            raise ValueError(f"an adversarial source head needs at least two sources in training, got {sources}")
        self.sources, self.weight = list(sources), weight
        self.net = nn.Sequential(nn.Linear(num_features, ADVERSARY_HIDDEN), nn.ReLU(),
                                 nn.Linear(ADVERSARY_HIDDEN, len(sources)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(GradientReversal.apply(features.float(), self.weight))

    def loss(self, features: torch.Tensor, source_targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the source prediction: what the head minimises and, reversed, the backbone maximises."""
        return F.cross_entropy(self.forward(features), source_targets)


def source_targets(sources: np.ndarray) -> tuple[torch.Tensor, list[str]]:
    """Each image's source as an index into the sorted list of sources."""
    names, index = np.unique(sources.astype(str), return_inverse=True)
    return torch.from_numpy(index.astype(np.int64)), names.tolist()


def create_adversary(model: nn.Module, sources: list[str], weight: float) -> SourceAdversary:
    """A source head sized to the network's pooled features, on the network's device."""
    head = classifier(model)
    device = next(model.parameters()).device
    return SourceAdversary(int(getattr(head, "in_features")), sources, weight).to(device)  # noqa: B009


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's logits and the pooled features they come from, in one pass (timm's ``forward_features`` then
    ``forward_head(pre_logits=True)``: the features after dropout, as the classifier sees them)."""
    features = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
    return classifier(model)(features), features
