"""Training augmentation for a whole batch at once, on whatever device the batch is on.

The per-image torchvision pipeline (``core.transforms.create_transform(train=True)``) runs in Python per image on
the CPU, which caps what a GPU can be fed (experiments.md, "Lab notes"). This module draws *per-sample* parameters
for the same recipe — random resized crop (scale 0.9–1.0), zoom up to 1.1×, flips, rotation ±15°, colour jitter
0.1 — and applies them as one ``affine_grid``/``grid_sample`` and a few tensor ops, so augmentation stays a small
fraction of a training step.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.transforms import ellipse_radius

Twin = Literal["corner", "camera"]  # the edits a consistency twin can carry


class BatchAugment(nn.Module):
    """``float`` images ``(N, 3, H, W)`` in [0, 1] → augmented images, same shape. Every sample gets its own draw.

    Randomness comes only from ``generator`` so a run is reproducible (and resumable) from its seed.
    """

    def __init__(self, rotation: float = 15.0, jitter: float = 0.1, crop_scale: Sequence[float] = (0.9, 1.0),
                 zoom: Sequence[float] = (1.0, 1.1), corner_artifacts: float = 0.0,
                 ring_start: Sequence[float] = (0.75, 1.05), fill_share: float = 0.25, camera: float = 0.0) -> None:
        super().__init__()
        self.rotation, self.jitter, self.crop_scale, self.zoom = rotation, jitter, crop_scale, zoom
        self.corner_artifacts, self.ring_start, self.fill_share = corner_artifacts, ring_start, fill_share
        self.camera = camera

    def _uniform(self, n: int, low: float, high: float, generator: torch.Generator | None, device) -> torch.Tensor:
        return torch.empty(n, device=device).uniform_(low, high, generator=generator)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                twins: Sequence[Twin] = ()) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """With ``twins``, also one copy of the augmented images per twin kind, each with the same crop, flips,
        rotation and colour jitter and one edit on every image: ``"corner"`` a random corner artifact, ``"camera"``
        a random camera re-take. Returns (clean, *twins): the pairs a consistency loss compares."""
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
        if self.camera > 0:  # drawn only when on, so runs without it keep their random stream
            out = camera_edits(out, self.camera, u)
        if self.corner_artifacts > 0:
            out = corner_artifacts(out, self.corner_artifacts, u, self.ring_start, self.fill_share)
        if not twins:
            return self.color_jitter(out, u)
        copies = [corner_artifacts(out, 1.0, u, self.ring_start, self.fill_share) if kind == "corner"
                  else camera_edits(out, 1.0, u) for kind in twins]
        jittered = self.color_jitter(torch.cat([out, *copies]), lambda low, high: u(low, high).repeat(len(twins) + 1))
        return tuple(jittered.chunk(len(twins) + 1))

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


def corner_artifacts(images: torch.Tensor, p: float, u, ring_start: Sequence[float] = (0.75, 1.05),
                     fill_share: float = 0.25) -> torch.Tensor:
    """With probability ``p`` per image, whatever its class, a random dermoscope ring or a corner fill, so that dark
    or covered corners carry no information about the label. The stress test's ``vignette`` and ``corner_fill``
    (``core.audit.interventions``) with their parameters drawn at random instead of fixed:

    * ring (1 − ``fill_share`` of the artifacts): darkness ramping up from a radius drawn in ``ring_start``
      (1 = the inscribed circle/ellipse) over 0.05–0.3 to 0.5–1, in a dark colour of random tint;
    * fill (``fill_share``): everything outside the inscribed circle/ellipse in the image's own skin colour (the
      median of the ring between 0.7 and 1 of the radius). Under the fixed corner mask a fill changes nothing the
      model sees, so masked runs can spend every artifact on rings.

    ``u(low, high)`` draws one value per image from the caller's generator. Works on float ``(N, 3, H, W)`` in
    [0, 1], on any device, in a few tensor operations.
    """
    n, _, h, w = images.shape
    shape = (-1, 1, 1, 1)
    radius = ellipse_radius(h, w, images.device).to(images.dtype)
    apply, fill = u(0, 1) < p, u(0, 1) < fill_share
    start, softness, darkness = u(*ring_start).view(shape), u(0.05, 0.3).view(shape), u(0.5, 1.0).view(shape)
    tint = torch.stack([u(0.0, 0.12) for _ in range(3)], 1).view(n, 3, 1, 1)
    ramp = ((radius - start) / softness).clamp(0, 1)
    ring = darkness * ramp * ramp * (3 - 2 * ramp)
    skin = images.flatten(2)[:, :, skin_band(h, w, images.device)].median(dim=-1).values.view(n, 3, 1, 1)
    outside = (radius > 1).to(images.dtype).expand(n, 1, h, w)
    alpha = torch.where(fill.view(shape), outside, ring) * apply.view(shape).to(images.dtype)
    colour = torch.where(fill.view(shape), skin, tint)
    return images * (1 - alpha) + colour * alpha


@functools.lru_cache(maxsize=8)
def skin_band(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat indices of the pixels between 0.7 and 1 of the inscribed radius, where a fill takes its skin colour.
    Found on the CPU once per size and device: a boolean mask on the device has a data-dependent size, which a GPU
    must read back (a sync each step) and the meta device of the placement tests cannot compute at all."""
    radius = ellipse_radius(height, width).flatten()
    return torch.nonzero((radius > 0.7) & (radius <= 1)).flatten().to(device)



RESAMPLE_LADDER = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # sides a camera re-take is resampled to
MAX_BLUR_SIGMA = 1.2  # px


def camera_edits(images: torch.Tensor, p: float, u) -> torch.Tensor:
    """A share ``p`` of the images re-taken as another camera might, on the training device: the acquisition stress
    test's kinds of edit (``core.audit.acquisition``) at random strengths, drawn per image: a tone curve (γ in
    0.75–1.33), a white balance (red and blue gains 0.88–1.12 in linear light), a lower resolution (area down to one of
    ``RESAMPLE_LADDER``'s sides, then back up, bilinear) and a Gaussian blur (σ 0–1.2 px). Every draw stays on the
    device (no host read-back, so no sync a step); JPEG is left to the stress test: it has no batched form there."""
    n, _, h, w = images.shape
    shape = (-1, 1, 1, 1)
    chosen = (u(0, 1) < p).view(shape)
    gamma = torch.exp(u(math.log(0.75), math.log(1 / 0.75))).view(shape)
    gains = torch.stack([u(0.88, 1.12), torch.ones(n, device=images.device), u(0.88, 1.12)], 1).view(n, 3, 1, 1)
    linear = images.clamp(0, 1) ** 2.2 * gains  # sRGB's curve, close enough for a white-balance shift
    edited = (linear.clamp(0, 1) ** (1 / 2.2)) ** gamma
    rung = (u(0, 1) * len(RESAMPLE_LADDER)).long().clamp(max=len(RESAMPLE_LADDER) - 1).view(shape)
    resampled = torch.zeros_like(edited)
    for i, factor in enumerate(RESAMPLE_LADDER):
        small = F.interpolate(edited, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="area")
        resampled = torch.where(rung == i, F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False),
                                resampled)
    return torch.where(chosen, gaussian_blur(resampled, u(0.0, MAX_BLUR_SIGMA)).clamp(0, 1), images)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred with its own σ (px; σ near 0 leaves it as it is): one separable grouped convolution."""
    n, c, h, w = images.shape
    radius = math.ceil(3 * MAX_BLUR_SIGMA)
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-x ** 2 / (2 * sigma.clamp(min=1e-3).view(-1, 1).to(images.dtype) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n·c, taps)
    flat = images.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)
