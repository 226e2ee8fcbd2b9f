"""Model registry: the hand-written CIFAR architectures register themselves with timm on import.

ImageNet ResNets and EfficientNets come from timm itself (see ``imagenet.py``).
"""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

from sam_bench.errors import ConfigError
from sam_bench.models import pyramidnet, resnet_cifar, shake_shake, wide_resnet  # noqa: F401  (register with timm)
from sam_bench.models.imagenet import create_timm_model

__all__ = ["build_model", "sam_bench_models"]


def sam_bench_models() -> list[str]:
    """Every timm-registered model that sam-bench defines (the hand-written CIFAR families)."""
    from timm.models import model_entrypoint

    return sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("sam_bench."))


def _plain(value: Any) -> Any:
    """Hydra hands nested kwargs over as DictConfig/ListConfig; timm wants plain containers."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def build_model(arch: str, num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    """``timm.create_model`` with a clear error for an unknown name, argument or missing weights."""
    if not timm.is_model(arch):
        close = [n for n in timm.list_models() if arch.split("_")[0] in n][:8]
        raise ConfigError(f"model.arch={arch!r} is not a registered model" + (f"; similar: {', '.join(close)}" if close else ""))
    kwargs = {k: _plain(v) for k, v in kwargs.items()}
    try:
        return create_timm_model(arch, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model.kwargs {dict(kwargs)} do not fit model.arch={arch!r}: {e}") from e
