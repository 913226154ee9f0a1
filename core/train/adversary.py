"""An adversarial source head (DANN, Ganin et al. 2016): a small classifier learns to tell an image's source (clinic,
camera) from the backbone's pooled features, while a gradient reversal layer makes the backbone work against it.
The features are pushed to hold as little of the source as the task allows, so a model cannot lean on the camera.

The head lives beside the network, never in its weights: a trained run's ``model.safetensors`` is the same network
with or without it, and predicting never sees it.
"""
from __future__ import annotations

from typing import cast

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
    learns at full rate, the backbone gets ``−weight`` times its gradient.

    It knows every training image's source (``sources``, one name per image) and, when ``given`` holds one label per
    image (the diagnosis), sees that label beside the features: the features then need to hide only what the
    source says *beyond* the label. HAM10000's sources differ in their mix of diagnoses, not only in their cameras
    (MoleMax's benign images are 95 % follow-up nevi, Rosendahl's a third keratoses), and an unconditional head makes
    the backbone hide that mix too. The loss reads a batch's rows by their training-image index."""

    def __init__(self, num_features: int, sources: np.ndarray, weight: float,
                 given: np.ndarray | None = None) -> None:
        super().__init__()
        names, index = np.unique(np.asarray(sources).astype(str), return_inverse=True)
        if len(names) < 2:
            raise ValueError(f"an adversarial source head needs at least two sources in training, got "
                             f"{names.tolist()}")
        self.sources, self.weight = names.tolist(), weight
        given_one_hot = None
        if given is not None:
            given_index = np.unique(np.asarray(given).astype(str), return_inverse=True)[1]
            given_one_hot = F.one_hot(torch.from_numpy(given_index.astype(np.int64))).float()
        # Per-image tables: buffers, so they follow .to(device), but not persistent: never in a saved state.
        self.register_buffer("source_index", torch.from_numpy(index.astype(np.int64)), persistent=False)
        self.register_buffer("given", given_one_hot, persistent=False)
        # The epoch's summed cross-entropy, kept on the device (no sync a step) and read once an epoch.
        self.register_buffer("loss_sum", torch.zeros(()), persistent=False)
        self.seen = 0
        shares = np.bincount(index) / len(index)
        self.guess_loss = float(-(shares * np.log(shares)).sum())  # the loss of always answering the source mix
        conditions = 0 if given_one_hot is None else given_one_hot.shape[1]
        self.net = nn.Sequential(nn.Linear(num_features + conditions, ADVERSARY_HIDDEN), nn.ReLU(),
                                 nn.Linear(ADVERSARY_HIDDEN, len(names)))

    def forward(self, features: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        x = GradientReversal.apply(features.float(), self.weight)
        given = cast(torch.Tensor | None, self.given)
        if given is not None:
            x = torch.cat([x, given[image_index]], dim=1)
        return self.net(x)

    def loss(self, features: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the source prediction for the training images ``image_index``: what the head minimises
        and, reversed, the backbone maximises."""
        loss = F.cross_entropy(self(features, image_index), cast(torch.Tensor, self.source_index)[image_index])
        cast(torch.Tensor, self.loss_sum).add_(loss.detach() * len(image_index))
        self.seen += len(image_index)
        return loss

    def take_mean_loss(self) -> float:
        """The mean cross-entropy since the last call (one epoch), then start again: how well the source could still
        be read from the features, to set beside :attr:`guess_loss`."""
        loss_sum = cast(torch.Tensor, self.loss_sum)
        mean = loss_sum.item() / max(self.seen, 1)
        loss_sum.zero_()
        self.seen = 0
        return mean


def create_adversary(model: nn.Module, sources: np.ndarray, weight: float,
                     given: np.ndarray | None = None) -> SourceAdversary:
    """A source head sized to the network's pooled features, on the network's device."""
    head = classifier(model)
    device = next(model.parameters()).device
    return SourceAdversary(int(getattr(head, "in_features")), sources, weight, given).to(device)  # noqa: B009


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's logits and the pooled features they come from, in one pass (timm's ``forward_features`` then
    ``forward_head(pre_logits=True)``: the features after dropout, as the classifier sees them)."""
    features = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
    return classifier(model)(features), features
