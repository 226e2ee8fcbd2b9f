"""Model registry: the hand-written CIFAR architectures register themselves with timm on import."""

from __future__ import annotations

import timm
import torch.nn as nn

from sam_bench.models import wide_resnet  # noqa: F401  (registers the WRN family with timm)
from sam_bench.errors import ConfigError


def build_model(arch: str, num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    """``timm.create_model`` with a clear error for an unknown name or argument."""
    if not timm.is_model(arch):
        close = [n for n in timm.list_models() if arch.split("_")[0] in n][:8]
        raise ConfigError(f"model.arch={arch!r} is not a registered model" + (f"; similar: {', '.join(close)}" if close else ""))
    try:
        return timm.create_model(arch, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.kwargs {dict(kwargs)} do not fit model.arch={arch!r}: {e}") from e
