"""CIFAR ResNets of He et al. 2016 (Sec. 4.2): 3 stages of n basic blocks, widths 16/32/64.

Post-activation blocks (conv-BN-ReLU-conv-BN, add, ReLU). ``shortcut="A"`` (default, the paper's
CIFAR choice, 0.46 M parameters for ResNet-32): identity, subsampled and zero-padded when the
shape changes; ``"B"``: 1x1 conv + BN projection there (the loss-landscape code of Li et al.);
``"none"``: no skip connection at all (ResNet-56-noshort of Li et al. 2018, the paper's Fig. 1).
ResNet-32 is the label-noise model (Table 4); ResNet-56 without skips the loss-landscape figure.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from sam_bench.models.common import batchnorm, conv1x1, conv3x3, no_pretrained

__all__ = ["ResNetCifar", "resnet32", "resnet56_noskip"]

SHORTCUTS = ("A", "B", "none")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), batchnorm(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), batchnorm(cout)
        self.mode = shortcut
        self.stride, self.pad_channels = stride, cout - cin
        changes_shape = stride != 1 or cin != cout
        self.proj = nn.Sequential(conv1x1(cin, cout, stride), batchnorm(cout)) if (shortcut == "B" and changes_shape) else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            return self.proj(x)
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad_channels)) if self.pad_channels else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.mode != "none":
            y = y + self.shortcut(x)
        return F.relu(y)


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs."""

    def __init__(self, depth: int = 32, shortcut: str = "A", num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 20, 32, 44, 56, 110, ...), got {depth}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"CIFAR ResNet shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.stem = nn.Sequential(conv3x3(in_chans, 16), batchnorm(16), nn.ReLU(inplace=True))
        blocks, cin = [], 16
        for g, cout in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (g > 0 and i == 0) else 1, shortcut))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # He et al.: Kaiming-normal convs; BN γ=1, β=0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1))


@register_model
def resnet_cifar(pretrained: bool = False, depth: int = 32, **kwargs) -> ResNetCifar:
    """Any CIFAR ResNet: ``timm.create_model('resnet_cifar', depth=20)``."""
    return ResNetCifar(depth, **no_pretrained("CIFAR ResNet", pretrained, kwargs))


@register_model
def resnet32(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-32, 0.46 M parameters (label-noise experiments, Table 4)."""
    return ResNetCifar(32, **no_pretrained("ResNet-32", pretrained, kwargs))


@register_model
def resnet56_noskip(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-56 without skip connections (loss-landscape figure, Li et al. 2018)."""
    kwargs.setdefault("shortcut", "none")
    return ResNetCifar(56, **no_pretrained("ResNet-56-noshort", pretrained, kwargs))


@register_model
def resnet_cifar_mini(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-8: for fast tests."""
    return ResNetCifar(8, **no_pretrained("ResNet-8", pretrained, kwargs))


@register_model
def resnet_noskip_mini(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-8 without skip connections: for fast tests."""
    kwargs.setdefault("shortcut", "none")
    return ResNetCifar(8, **no_pretrained("ResNet-8-noshort", pretrained, kwargs))
