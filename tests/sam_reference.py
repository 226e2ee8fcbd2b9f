"""The float64 reference shared by the SAM test files: the tiny model, its batches, and its loss and
gradient written with plain tensors and a hand-written forward (BN with batch statistics), never
through the code under test."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LR, MOMENTUM, WD, RHO, EPS_BN = 0.1, 0.9, 5e-4, 0.05, 1e-5


def tiny_model() -> nn.Module:
    """Conv -> BN -> ReLU -> pool -> Linear, float64, seeded."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
    ).double()


def weights(model: nn.Module) -> list[torch.Tensor]:
    """The parameters of :func:`tiny_model` in the reference's order."""
    return [model[0].weight, model[1].weight, model[1].bias, model[5].weight, model[5].bias]


def batch(step: int, n: int = 8):
    """Batch ``step`` (n images 3x6x6, 5 classes), the same for every test."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def ref_loss(w: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of :func:`tiny_model` with weights ``w`` (training-mode BN), without the L2 term."""
    conv, gamma, beta, fc_w, fc_b = w
    h = F.conv2d(x, conv, padding=1)
    mean = h.mean(dim=(0, 2, 3), keepdim=True)
    var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    h = (h - mean) / torch.sqrt(var + EPS_BN) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    h = torch.relu(h).mean(dim=(2, 3))
    return F.cross_entropy(h @ fc_w.T + fc_b, y)


def ref_grad(w: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, l2: float = WD) -> list[torch.Tensor]:
    """∇ of ``ref_loss + 0.5·l2·‖w‖²`` at ``w``."""
    w = [t.detach().requires_grad_(True) for t in w]
    loss = ref_loss(w, x, y) + 0.5 * l2 * sum((t * t).sum() for t in w)
    return [g.detach() for g in torch.autograd.grad(loss, w)]
