"""PyramidNet (Han et al. 2017) with optional ShakeDrop, as the official SAM code
(``Pyramid_ShakeDrop`` in ``sam_jax/models/pyramidnet.py``) and Han's PyTorch reference.

Additive widening: the branch width grows by α/N per block (N blocks in total) and is
**rounded** (``int(round(.))``, Python's round-half-to-even as both reference codes), not
truncated as in the PyramidNet paper: PyramidNet-272 α200 has ~0.2 M more parameters than the
paper's 26.0 M. Shortcut: average pool (stride 2) + zero channels. Bottleneck block:
BN-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4)-BN; basic block:
BN-conv3x3(stride)-BN-ReLU-conv3x3-BN. ShakeDrop on the residual branch with the linear decay
rule (keep probability 1 - (l/N)·0.5), α∈[-1,1], β∈[0,1]. Stem conv3x3 + BN (no ReLU); head BN,
ReLU, global average pool, dense.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from sam_bench.models.common import batchnorm, conv1x1, conv3x3, no_pretrained, official_init
from sam_bench.models.shakedrop import ShakeDrop, shakedrop_keep_prob

__all__ = ["PyramidNet", "pyramidnet_widths"]


def pyramidnet_widths(depth: int, alpha: float, bottleneck: bool) -> list[int]:
    """Branch width of every block, as the official code computes it (float accumulation, round)."""
    per_block = 9 if bottleneck else 6
    if (depth - 2) % per_block != 0 or depth < 2 + per_block:
        kind = "9n+2 for the bottleneck" if bottleneck else "6n+2 for the basic"
        raise ValueError(f"PyramidNet depth must be {kind} block, got {depth}")
    total = 3 * ((depth - 2) // per_block)
    channels, widths = 16.0, []
    for _ in range(total):
        channels += alpha / total
        widths.append(int(round(channels)))
    return widths


class PyramidBlock(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, bottleneck: bool, shakedrop: ShakeDrop | None):
        super().__init__()
        self.out_channels = width * (4 if bottleneck else 1)
        if bottleneck:
            self.branch = nn.Sequential(
                batchnorm(cin), conv1x1(cin, width), batchnorm(width), nn.ReLU(inplace=True),
                conv3x3(width, width, stride), batchnorm(width), nn.ReLU(inplace=True),
                conv1x1(width, self.out_channels), batchnorm(self.out_channels),
            )  # fmt: skip
        else:
            self.branch = nn.Sequential(
                batchnorm(cin), conv3x3(cin, width, stride), batchnorm(width), nn.ReLU(inplace=True),
                conv3x3(width, width), batchnorm(width),
            )  # fmt: skip
        self.shakedrop = shakedrop if shakedrop is not None else nn.Identity()
        self.stride = stride
        self.pad_channels = self.out_channels - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.pad_channels)) if self.pad_channels else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.shakedrop(self.branch(x))


class PyramidNet(nn.Module):
    def __init__(
        self,
        depth: int = 272,
        alpha: float = 200,
        bottleneck: bool = True,
        shakedrop: bool = True,
        shakedrop_p_last: float = 0.5,
        num_classes: int = 10,
        in_chans: int = 3,
    ):
        super().__init__()
        widths = pyramidnet_widths(depth, alpha, bottleneck)
        self.num_classes = num_classes
        self.stem = nn.Sequential(conv3x3(in_chans, 16), batchnorm(16))
        per_group, blocks, cin = len(widths) // 3, [], 16
        for i, width in enumerate(widths):
            stride = 2 if i in (per_group, 2 * per_group) else 1
            sd = ShakeDrop(shakedrop_keep_prob(i + 1, len(widths), shakedrop_p_last)) if shakedrop else None
            blocks.append(PyramidBlock(cin, width, stride, bottleneck, sd))
            cin = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.num_features = cin
        self.final_bn = nn.Sequential(batchnorm(cin), nn.ReLU(inplace=True))
        self.fc = nn.Linear(cin, num_classes)
        official_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_bn(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1))


def _pyramid(name: str, pretrained: bool, kwargs: dict, **defaults) -> PyramidNet:
    kwargs = no_pretrained(name, pretrained, kwargs)
    return PyramidNet(**{**defaults, **kwargs})


@register_model
def pyramidnet_cifar(pretrained: bool = False, **kwargs) -> PyramidNet:
    """Any PyramidNet: ``timm.create_model('pyramidnet_cifar', depth=110, alpha=270, bottleneck=False)``."""
    return _pyramid("PyramidNet", pretrained, kwargs)


@register_model
def pyramidnet272_shakedrop(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-272 α200 bottleneck + ShakeDrop p_L=0.5 (official ``Pyramid_ShakeDrop``)."""
    return _pyramid("PyramidNet-272 ShakeDrop", pretrained, kwargs, depth=272, alpha=200, bottleneck=True, shakedrop=True)


@register_model
def pyramidnet272(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-272 α200 bottleneck without ShakeDrop (our choice for Table 1's "PyramidNet")."""
    return _pyramid("PyramidNet-272", pretrained, kwargs, depth=272, alpha=200, bottleneck=True, shakedrop=False)


@register_model
def pyramidnet110_a270(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-110 α270 basic blocks (the PyramidNet paper's best basic-block CIFAR model)."""
    return _pyramid("PyramidNet-110", pretrained, kwargs, depth=110, alpha=270, bottleneck=False, shakedrop=False)


@register_model
def pyramidnet_shakedrop_mini(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-11 α200 bottleneck + ShakeDrop (official ``Pyramid_ShakeDrop_mini``): tests."""
    return _pyramid("PyramidNet mini", pretrained, kwargs, depth=11, alpha=200, bottleneck=True, shakedrop=True)


@register_model
def pyramidnet_mini(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-11 α200 bottleneck without ShakeDrop: tests."""
    return _pyramid("PyramidNet mini", pretrained, kwargs, depth=11, alpha=200, bottleneck=True, shakedrop=False)
