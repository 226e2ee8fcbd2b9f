"""Pieces shared by the hand-written CIFAR models: the official initialisation and timm glue."""

from __future__ import annotations

import math

import torch.nn as nn
from timm.layers import Conv2dSame

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention; flax's momentum 0.9 in the official code


def batchnorm(channels: int, enabled: bool = True) -> nn.Module:
    """BatchNorm2d as the official code (eps 1e-5), or Identity for the no-BN variants."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM) if enabled else nn.Identity()


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with the official (Flax) code's ``padding='SAME'``: one pixel on each side at
    stride 1, but at stride 2 an even input is padded by one pixel in all, at the bottom and right
    (TF/JAX's rule; timm's ``Conv2dSame``), not one on every side as PyTorch's padding=1 would: the
    sampling grid, and so what the network computes, differs by a pixel."""
    if stride == 1:
        return nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    return Conv2dSame(cin, cout, 3, stride=stride, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def official_init(model: nn.Module) -> None:
    """Official init (``sam_jax/models/utils.py``): convs Kaiming-normal fan-out (gain 2); BN γ=1,
    β=0; the final dense layer U[-1/√K, 1/√K] with K = number of outputs (flax kernel shape[1])
    and zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


def no_pretrained(name: str, pretrained: bool, kwargs: dict) -> dict:
    """Refuse ``pretrained=True`` (no weights exist for these models) and drop timm's bookkeeping
    keyword arguments that ``timm.create_model`` passes to every entrypoint."""
    if pretrained:
        raise ValueError(f"no pretrained weights exist for {name}; use pretrained=False")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return kwargs
