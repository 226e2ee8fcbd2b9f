"""Batched augmentation on whatever device holds the images (no per-image Python work).

The official "Basic" CIFAR augmentation is: random horizontal flip, then 4-pixel REFLECT padding,
then a random crop back to the original size. Flip, pad and crop are fused into one index map per
image and applied with two ``gather`` calls on the uint8 batch. Cutout (DeVries & Taylor 2017) runs
after normalisation as a broadcast mask, so no step needs a host sync.
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


def cutout(images: torch.Tensor, size: int, per_image: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a ``size``x``size`` square (clipped at the borders) of normalised (N, C, H, W) images.

    The official code (google-research/sam ``augmentation.cutout``) draws ONE centre per batch, so
    every image of a batch loses the same square; ``per_image=True`` draws a centre per image
    (DeVries & Taylor 2017). Fill 0 after normalisation is the dataset mean. No host sync.
    Rows/cols ``[c - size//2, c - size//2 + size)``: for even sizes (16) exactly the official
    ``[c - L//2, c + L//2)``; an odd size keeps its full length here (the official code drops one).
    """
    n, _, h, w = images.shape
    k = n if per_image else 1
    dev = images.device
    cy = torch.randint(0, h, (k, 1), device=dev, generator=generator)
    cx = torch.randint(0, w, (k, 1), device=dev, generator=generator)
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    lo = size // 2
    in_rows = (rows >= cy - lo) & (rows < cy - lo + size)  # (k, h)
    in_cols = (cols >= cx - lo) & (cols < cx - lo + size)  # (k, w)
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (k, 1, h, w)
    return images.masked_fill(mask, 0.0)
