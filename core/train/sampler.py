"""Class-balanced sampling: draw malignant images at a set share of every epoch (reference: 60/40 benign/malignant);
optionally at that share *within every source*, so that which camera took an image says nothing about its label."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class BalancedSampler(torch.utils.data.Sampler[int]):
    """With replacement, each draw is malignant with probability ``positive_fraction``.

    The draw for an epoch depends only on ``(seed, epoch)``, so every DDP rank computes the same global order and
    takes its own ``rank::world_size`` shard, and a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, labels: np.ndarray, positive_fraction: float = 0.4, num_samples: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, groups: np.ndarray | None = None) -> None:
        labels = np.asarray(labels).astype(bool)
        if not 0 < positive_fraction < 1:
            raise ValueError(f"positive_fraction must be in (0, 1), got {positive_fraction}")
        if labels.all() or not labels.any():
            raise ValueError("balanced sampling needs both classes in the training data")
        self.probabilities = balanced_probabilities(labels, positive_fraction, groups)
        self.num_samples = (num_samples or len(labels)) // world_size * world_size
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.choice(len(self.probabilities), self.num_samples, replace=True, p=self.probabilities)
        return iter(order[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples // self.world_size


def balanced_probabilities(labels: np.ndarray, positive_fraction: float,
                           groups: np.ndarray | None = None) -> np.ndarray:
    """Per image, its chance of each draw. Without ``groups``: the malignant images share ``positive_fraction`` of
    the draws. With ``groups`` (e.g. each image's source): every group keeps its share of the data, and within it the
    malignant images get ``positive_fraction`` of the group's draws, so the label's share no longer differs between
    groups (HAM10000's sources: 0.7 % to 41 %); a group with one class only keeps its share on that class."""
    groups = np.zeros(len(labels), dtype=int) if groups is None else np.asarray(groups)
    if len(groups) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    weights = np.zeros(len(labels))
    for group in np.unique(groups):
        mine = groups == group
        share = mine.mean()
        positive, negative = mine & labels, mine & ~labels
        if positive.any() and negative.any():
            weights[positive] = share * positive_fraction / positive.sum()
            weights[negative] = share * (1 - positive_fraction) / negative.sum()
        else:
            weights[mine] = share / mine.sum()
    return weights / weights.sum()
