"""Batched augmentation on whatever device holds the images (no per-image Python work).

The official "Basic" CIFAR augmentation is: random horizontal flip, then 4-pixel REFLECT padding,
then a random crop back to the original size. Flip, pad and crop are fused into one index map per
image and applied with two ``gather`` calls on the uint8 batch.
"""

from __future__ import annotations

import torch


def reflect_index(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Map indices in [-size+1, 2*size-2] into [0, size) as numpy/torch 'reflect' padding does."""
    idx = idx.abs()
    return torch.where(idx >= size, 2 * (size - 1) - idx, idx)


def flip_pad_crop(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flip + ``pad``-pixel reflect padding + random crop, per image, on a (N, C, H, W) batch."""
    n, c, h, w = images.shape
    dev = images.device
    dy = torch.randint(-pad, pad + 1, (n, 1), device=dev, generator=generator)
    dx = torch.randint(-pad, pad + 1, (n, 1), device=dev, generator=generator)
    flip = torch.rand((n, 1), device=dev, generator=generator) < 0.5
    rows = reflect_index(torch.arange(h, device=dev) + dy, h)  # (n, h)
    cols = reflect_index(torch.arange(w, device=dev) + dx, w)  # (n, w)
    cols = torch.where(flip, (w - 1) - cols, cols)  # flip first, then pad and crop (official order)
    out = images.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x/255 - mean) / std``."""
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (-mean / std).view(1, -1, 1, 1)
    return torch.addcmul(shift, images.float(), scale)
