"""Training augmentation for a whole batch at once, on whatever device the batch is on.

The per-image torchvision pipeline (``core.transforms.create_transform(train=True)``) costs ~1 ms of CPU per image,
which caps a GPU at ~1,000 img/s. This module draws *per-sample* parameters for the same recipe — random resized
crop (scale 0.9–1.0), zoom up to 1.1×, flips, rotation ±15°, colour jitter 0.1 — and applies them as one
``affine_grid``/``grid_sample`` and a few tensor ops, so augmentation stays a small fraction of a training step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BatchAugment(nn.Module):
    """``float`` images ``(N, 3, H, W)`` in [0, 1] → augmented images, same shape. Every sample gets its own draw.

    Randomness comes only from ``generator`` so a run is reproducible (and resumable) from its seed.
    """

    def __init__(self, rotation: float = 15.0, jitter: float = 0.1, crop_scale: tuple[float, float] = (0.9, 1.0),
                 zoom: tuple[float, float] = (1.0, 1.1)) -> None:
        super().__init__()
        self.rotation, self.jitter, self.crop_scale, self.zoom = rotation, jitter, crop_scale, zoom

    def _uniform(self, n: int, low: float, high: float, generator: torch.Generator | None, device) -> torch.Tensor:
        return torch.empty(n, device=device).uniform_(low, high, generator=generator)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, device = images.shape[0], images.device
        u = lambda low, high: self._uniform(n, low, high, generator, device)  # noqa: E731
        # Random resized crop (square): a window of side sqrt(scale) at a random place, then zoom-in on top.
        side = u(*self.crop_scale).sqrt() / u(*self.zoom)
        shift_x, shift_y = (1 - side) * u(-1, 1), (1 - side) * u(-1, 1)
        angle = u(-self.rotation, self.rotation) * math.pi / 180
        flip_x = torch.where(u(0, 1) < 0.5, -1.0, 1.0)
        flip_y = torch.where(u(0, 1) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
        # Output→input map (normalised coords): scale, rotate, flip, then shift the window. Normalised x and y span
        # different pixel lengths on a non-square image, so the rotation's off-diagonal terms carry the aspect
        # ratio; without it a 4:3 frame would be sheared, not rotated.
        aspect = images.shape[-1] / images.shape[-2]
        theta = torch.stack([torch.stack([cos * flip_x, -sin * flip_y / aspect, shift_x], 1),
                             torch.stack([sin * flip_x * aspect, cos * flip_y, shift_y], 1)], 1).to(images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return self.color_jitter(out, u)

    def color_jitter(self, images: torch.Tensor, u) -> torch.Tensor:
        """Brightness, contrast, saturation, each a factor in [1 − jitter, 1 + jitter] (torchvision's definitions)."""
        j = self.jitter
        shape = (-1, 1, 1, 1)
        images = (images * u(1 - j, 1 + j).view(shape)).clamp(0, 1)
        gray = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)
        mean = gray.mean(dim=(2, 3), keepdim=True)
        images = ((images - mean) * u(1 - j, 1 + j).view(shape) + mean).clamp(0, 1)
        gray = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)
        return ((images - gray) * u(1 - j, 1 + j).view(shape) + gray).clamp(0, 1)
