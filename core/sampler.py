"""Class-balanced sampling: draw malignant images at a set share of every epoch (reference: 60/40 benign/malignant)."""
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
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        labels = np.asarray(labels).astype(bool)
        if not 0 < positive_fraction < 1:
            raise ValueError(f"positive_fraction must be in (0, 1), got {positive_fraction}")
        if labels.all() or not labels.any():
            raise ValueError("balanced sampling needs both classes in the training data")
        weights = np.where(labels, positive_fraction / labels.sum(), (1 - positive_fraction) / (~labels).sum())
        self.probabilities = weights / weights.sum()
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
