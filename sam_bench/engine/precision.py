"""Device and numeric precision: CUDA when present, bf16 autocast there, fp32 on the CPU; fp16 with
a dynamic loss scaler that understands SAM's two passes."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from sam_bench.errors import ConfigError


def resolve_device(requested: str, key: str = "trainer.device") -> torch.device:
    """``requested`` (auto, cpu, cuda) on this machine; ``key``: the config key the refusal names
    (``device`` for sam-bench hessian)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but CUDA is not available (torch.cuda.is_available() is False); use {key}=auto or cpu")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 on CUDA, fp32 on the CPU. fp16 (with loss scaling) is a CUDA mode: refused on the CPU.
    ``requested`` may be the config's enum member; the result is always the plain name."""
    requested = str(getattr(requested, "value", requested))
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.precision=fp16 needs CUDA (float16 autocast is GPU-only here); use trainer.precision=fp32 or bf16 on the CPU")
    return requested


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for the forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def scaled_backward(loss: torch.Tensor, scaler: LossScaler | None) -> None:
    """``loss.backward()``, on the scaled loss under fp16 loss scaling (``scaler`` given): every
    backward pass of a step goes through here, and is unscaled after it by ``scaler.unscale_``."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


class LossScaler:
    """Dynamic loss scaling for a step with several backward passes (fp16 SAM).

    Same arithmetic and defaults as ``torch.amp.GradScaler`` (scale 2¹⁶, ×2 after 2000 clean steps,
    ×0.5 on overflow; the same fused kernels), but ``unscale_`` may run once per *pass*: GradScaler
    allows one ``unscale_`` per optimizer between updates and its ``step`` skips by reading the inf
    flag on the host. Here the inf flags of all passes accumulate in ``found_inf`` (a device tensor),
    the SAM optimizer masks its update with it, and :meth:`update` runs once per step.
    """

    def __init__(self, device: torch.device, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale_ = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_.to(loss.dtype)

    @torch.no_grad()
    def unscale_(self, grads: Iterable[torch.Tensor]) -> None:
        """grads /= scale in place; sets ``found_inf`` if any is inf/NaN (accumulates across passes)."""
        grads = [g for g in grads if g is not None]
        inv = self.scale_.double().reciprocal().float()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, self.found_inf, inv)

    @torch.no_grad()
    def update(self) -> None:
        """Grow/back off the scale from this step's overflow flag, then clear it (once per step)."""
        torch._amp_update_scale_(self.scale_, self.growth_tracker, self.found_inf,
                                 self.growth_factor, self.backoff_factor, self.growth_interval)
        self.found_inf.zero_()

    def state_dict(self) -> dict:
        return {"scale": self.scale_.clone(), "growth_tracker": self.growth_tracker.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scale_.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])
