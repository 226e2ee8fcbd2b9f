"""Shake-Shake 26 2x96d as the official SAM code (``WideResnet28x6_ShakeShake`` in
``sam_jax/models/wide_resnet_shakeshake.py``; Gastaldi 2017).

3 groups of 4 blocks, two residual branches per block (ReLU-conv3x3-BN-ReLU-conv3x3-BN) of width
16k/32k/64k (k=6: 96/192/384), mixed by :class:`ShakeShake`. A block that changes the width uses
Gastaldi's shortcut: two 1x1 convolutions of half the width, one on the strided input and one on
the input shifted by one pixel, concatenated and batch-normalised. Stem conv3x3 + BN (no ReLU);
head ReLU, global average pool, dense.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from sam_bench.models.common import batchnorm, conv1x1, conv3x3, no_pretrained, official_init
from sam_bench.models.shakedrop import ShakeShake

__all__ = ["ShakeShakeNet", "shake_shake_26_2x96d"]


class GastaldiShortcut(nn.Module):
    """Strided 1x1 path on x and on x shifted by one pixel (right/down, zero-filled), each to
    cout/2 channels, concatenated, then BN (official ``Shortcut``)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cout % 2:
            raise ValueError(f"Shake-Shake shortcut needs an even width, got {cout}")
        self.stride = stride
        self.conv_h1 = conv1x1(cin, cout // 2)
        self.conv_h2 = conv1x1(cin, cout // 2)
        self.bn = batchnorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        h1 = x[:, :, ::s, ::s]  # flax avg_pool with a 1x1 window and stride s = subsampling
        h2 = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:][:, :, ::s, ::s]
        return self.bn(torch.cat([self.conv_h1(h1), self.conv_h2(h2)], dim=1))


def _branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    # not in-place: x also feeds the other branch and the shortcut
    return nn.Sequential(
        nn.ReLU(), conv3x3(cin, cout, stride), batchnorm(cout), nn.ReLU(inplace=True), conv3x3(cout, cout), batchnorm(cout)
    )


class ShakeShakeBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.branch_a = _branch(cin, cout, stride)
        self.branch_b = _branch(cin, cout, stride)
        self.shake = ShakeShake()
        # the official code projects only when the width changes (it always does with the stride)
        self.shortcut = GastaldiShortcut(cin, cout, stride) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.shake(self.branch_a(x), self.branch_b(x))


class ShakeShakeNet(nn.Module):
    """Shake-Shake (depth 6·blocks_per_group + 2)-2x(16·width)d."""

    def __init__(self, blocks_per_group: int = 4, width: int = 6, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if blocks_per_group < 1 or width < 1:
            raise ValueError(f"Shake-Shake needs blocks_per_group >= 1 and width >= 1, got {blocks_per_group}, {width}")
        self.num_classes = num_classes
        self.stem = nn.Sequential(conv3x3(in_chans, 16), batchnorm(16))
        blocks, cin = [], 16
        for g, cout in enumerate((16 * width, 32 * width, 64 * width)):
            for i in range(blocks_per_group):
                blocks.append(ShakeShakeBlock(cin, cout, 2 if (g > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)
        official_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1))


@register_model
def shake_shake_cifar(pretrained: bool = False, blocks_per_group: int = 4, width: int = 6, **kwargs) -> ShakeShakeNet:
    """Any Shake-Shake: ``timm.create_model('shake_shake_cifar', blocks_per_group=4, width=2)``."""
    return ShakeShakeNet(blocks_per_group, width, **no_pretrained("Shake-Shake", pretrained, kwargs))


@register_model
def shake_shake_26_2x96d(pretrained: bool = False, **kwargs) -> ShakeShakeNet:
    """Shake-Shake 26 2x96d (the official ``WideResnet28x6_ShakeShake``): Table 1 and Table 5."""
    return ShakeShakeNet(4, 6, **no_pretrained("Shake-Shake 26 2x96d", pretrained, kwargs))


@register_model
def shake_shake_mini(pretrained: bool = False, **kwargs) -> ShakeShakeNet:
    """Shake-Shake 14 2x16d (the official ``WideResnet_ShakeShake_mini``): for fast tests."""
    return ShakeShakeNet(2, 1, **no_pretrained("Shake-Shake mini", pretrained, kwargs))
