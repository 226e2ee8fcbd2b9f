"""Device and numeric precision: CUDA when present, bf16 autocast there, fp32 on the CPU."""

from __future__ import annotations

import contextlib

import torch

from sam_bench.errors import ConfigError


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but CUDA is not available (torch.cuda.is_available() is False); use trainer.device=auto or cpu")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.precision=fp16 needs CUDA (float16 autocast is GPU-only here); use trainer.precision=fp32 or bf16 on the CPU")
    if requested == "fp16":
        raise ConfigError("trainer.precision=fp16 is not available yet in this version; use trainer.precision=bf16 (the default on CUDA)")
    return requested


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for the forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
