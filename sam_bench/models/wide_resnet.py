"""CIFAR WideResNet WRN-d-k as the official SAM code (``sam_jax/models/wide_resnet.py``).

Pre-activation blocks. ``shortcut="official"`` (default): the shortcut of a block that changes
width or resolution is the identity, average-pooled to the new resolution and zero-padded to the
new width (no 1x1 convolution), so WRN-28-10 has 36.2 M parameters, fewer than the 36.5 M of
Zagoruyko & Komodakis' 1x1-shortcut network (``shortcut="conv1x1"``, which feeds the activated
input to the 1x1 convolution as their code does). No dropout by default; ``bn=False`` removes
every BatchNorm (the Hessian study trains WRN-40-10 without BN). Kaiming-normal fan-out init,
dense U[-1/√K, 1/√K]; BN eps 1e-5, momentum 0.1 (flax's 0.9).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from sam_bench.models.common import batchnorm, conv1x1, conv3x3, no_pretrained, official_init

__all__ = ["WideResNet", "wide_resnet_cifar"]

SHORTCUTS = ("official", "conv1x1")


def _bn_relu(channels: int, bn: bool = True) -> nn.Sequential:
    """BN then ReLU. The ReLU works in place only after a BN, whose output is a new tensor: without
    BN it would overwrite its input, which a block still adds as its shortcut."""
    return nn.Sequential(batchnorm(channels, bn), nn.ReLU(inplace=bn))


class WideResNetBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv, plus the (pooled, zero-padded or 1x1-projected) input.

    ``activate_before_residual`` (first block of the first group) feeds the activated input to
    the shortcut as well, as the official code does; the conv1x1 shortcut always takes the
    activated input (Zagoruyko & Komodakis).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        activate_before_residual: bool,
        dropout: float,
        shortcut: str = "official",
        bn: bool = True,
    ):
        super().__init__()
        self.init_bn = _bn_relu(cin, bn)
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = _bn_relu(cout, bn)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(cout, cout)
        self.stride = stride
        self.pad_channels = cout - cin
        changes_shape = cin != cout or stride != 1
        self.proj = conv1x1(cin, cout, stride) if (shortcut == "conv1x1" and changes_shape) else None
        self.activate_before_residual = activate_before_residual or self.proj is not None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            return self.proj(x)
        if self.pad_channels == 0 and self.stride == 1:
            return x
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.pad_channels))  # zero channels appended

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.init_bn(x)
        orig = y if self.activate_before_residual else x
        y = self.conv1(y)
        y = self.dropout(self.bn2(y))
        y = self.conv2(y)
        return y + self.shortcut(orig)


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 (or 28x28) inputs: 3 groups of (depth-4)/6 blocks."""

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        in_chans: int = 3,
        dropout: float = 0.0,
        shortcut: str = "official",
        bn: bool = True,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:  # 0 built a model with no channels,
            # which failed only at its first forward pass, with PyTorch's traceback (QA)
            raise ValueError(f"WideResNet width must be a positive integer (1, 2, 4, 8, 10, ...), got {width!r}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"WideResNet shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.init_conv = conv3x3(in_chans, 16)
        blocks, cin = [], 16
        for g, cout in enumerate(widths):
            for i in range(n):
                stride = 2 if (g > 0 and i == 0) else 1
                first = g == 0 and i == 0
                blocks.append(WideResNetBlock(cin, cout, stride, first, dropout, shortcut, bn))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.final_bn = _bn_relu(cin, bn)
        self.fc = nn.Linear(cin, num_classes)
        official_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_bn(self.blocks(self.init_conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _wrn(depth: int, width: int, pretrained: bool = False, **kwargs) -> WideResNet:
    kwargs = no_pretrained(f"WRN-{depth}-{width}", pretrained, kwargs)
    return WideResNet(depth=depth, width=width, **kwargs)


@register_model
def wide_resnet_cifar(pretrained: bool = False, depth: int = 28, width: int = 10, **kwargs) -> WideResNet:
    """Any WRN-depth-width: ``timm.create_model('wide_resnet_cifar', depth=16, width=4)``."""
    return _wrn(depth, width, pretrained, **kwargs)


@register_model
def wrn28_10(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10, the paper's Table 1 model."""
    return _wrn(28, 10, pretrained, **kwargs)


@register_model
def wrn40_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-40-2 (second-order ablation, App. C.4)."""
    return _wrn(40, 2, pretrained, **kwargs)


@register_model
def wrn40_10(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-40-10."""
    return _wrn(40, 10, pretrained, **kwargs)


@register_model
def wrn40_10_nobn(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-40-10 without BatchNorm (Hessian spectra, Fig. 3 left)."""
    kwargs.setdefault("bn", False)
    return _wrn(40, 10, pretrained, **kwargs)


@register_model
def wrn16_4(pretrained: bool = False, **kwargs) -> WideResNet:
    return _wrn(16, 4, pretrained, **kwargs)


@register_model
def wrn16_2(pretrained: bool = False, **kwargs) -> WideResNet:
    return _wrn(16, 2, pretrained, **kwargs)


@register_model
def wrn_mini(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-10-1 (75 k parameters with 10 classes): for fast tests (the official ``WideResnet_mini`` is WRN-16-1: ``wide_resnet_cifar`` with depth=16, width=1)."""
    return _wrn(10, 1, pretrained, **kwargs)


@register_model
def wrn_nobn_mini(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-10-1 without BatchNorm: for fast tests of the no-BN path."""
    kwargs.setdefault("bn", False)
    return _wrn(10, 1, pretrained, **kwargs)
