"""CIFAR WideResNet WRN-d-k as the official SAM code (``sam_jax/models/wide_resnet.py``).

Pre-activation blocks; the shortcut of a block that changes width or resolution is the identity,
average-pooled to the new resolution and zero-padded to the new width (no 1x1 convolution), so
WRN-28-10 has fewer parameters than the 36.5 M of Zagoruyko & Komodakis' 1x1-shortcut variant.
No dropout by default; Kaiming-normal fan-out init; BN eps 1e-5, momentum 0.1 (flax's 0.9).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

__all__ = ["WideResNet", "wide_resnet_cifar"]


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1), nn.ReLU(inplace=True))


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class WideResNetBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv, plus the (pooled, zero-padded) input.

    ``activate_before_residual`` (first block of the first group) feeds the activated input to
    the shortcut as well, as the official code does.
    """

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool, dropout: float):
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.init_bn = _bn_relu(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = _bn_relu(cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(cout, cout)
        self.stride = stride
        self.pad_channels = cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
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
    ):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.init_conv = _conv3x3(in_chans, 16)
        blocks, cin = [], 16
        for g, cout in enumerate(widths):
            for i in range(n):
                stride = 2 if (g > 0 and i == 0) else 1
                blocks.append(WideResNetBlock(cin, cout, stride, activate_before_residual=(g == 0 and i == 0), dropout=dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.final_bn = _bn_relu(cin)
        self.fc = nn.Linear(cin, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # official dense_layer_init_fn: U[-1/sqrt(fan_in), 1/sqrt(fan_in)], zero bias
                bound = 1.0 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_bn(self.blocks(self.init_conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _wrn(depth: int, width: int, pretrained: bool = False, **kwargs) -> WideResNet:
    if pretrained:
        raise ValueError("no pretrained weights exist for the CIFAR WideResNets; use pretrained=False")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
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
def wrn16_4(pretrained: bool = False, **kwargs) -> WideResNet:
    return _wrn(16, 4, pretrained, **kwargs)


@register_model
def wrn16_2(pretrained: bool = False, **kwargs) -> WideResNet:
    return _wrn(16, 2, pretrained, **kwargs)


@register_model
def wrn_mini(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-10-1 (78 k parameters): for fast tests."""
    return _wrn(10, 1, pretrained, **kwargs)
