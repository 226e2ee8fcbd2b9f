"""Shake-Shake and ShakeDrop: per-sample random scaling with a different coefficient in backward.

As the official code (``sam_jax/models/utils.py``): the forward pass uses one random coefficient
per sample, the backward pass an independent one, and evaluation the expectation. With
``true_gradient = True`` the backward uses the forward coefficient (the official "true gradient
fix", used for SAM's ascent pass; ``engine/step.py`` flips the attribute).

All draws come from the default generator of the input's device in ``forward`` and happen in a
single ``torch.rand`` call whose size does not depend on ``true_gradient``, so rewinding the RNG
replays exactly the same forward coefficients in SAM's second pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ShakeShake", "ShakeDrop", "shake_scale", "shake_mix", "shakedrop_keep_prob"]


class _ShakeScale(torch.autograd.Function):
    """``x * fwd`` in forward, ``grad * bwd`` in backward (no gradient to the coefficients)."""

    generate_vmap_rule = True  # m-sharpness's vmap engine runs the model under torch.func.vmap

    @staticmethod
    def forward(x: torch.Tensor, fwd: torch.Tensor, bwd: torch.Tensor) -> torch.Tensor:
        return x * fwd

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (bwd,) = ctx.saved_tensors
        return grad * bwd, None, None


class _ShakeMix(torch.autograd.Function):
    """``a*α + b*(1-α)`` in forward; gradients ``g*β`` and ``g*(1-β)`` in backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return torch.lerp(b, a, alpha)  # b + α(a - b) = αa + (1-α)b

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[3])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (beta,) = ctx.saved_tensors
        ga = grad * beta
        return ga, grad - ga, None, None


def shake_scale(x: torch.Tensor, fwd: torch.Tensor, bwd: torch.Tensor) -> torch.Tensor:
    if bwd is fwd:  # the true gradient: plain autograd (torch.compile rejects a Function given one tensor twice)
        return x * fwd
    return _ShakeScale.apply(x, fwd, bwd)


def shake_mix(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    if beta is alpha:  # the true gradient, as in shake_scale
        return torch.lerp(b, a, alpha)
    return _ShakeMix.apply(a, b, alpha, beta)


def _per_sample_uniform(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` U(0,1) draws per sample, shaped (n, N, 1, 1, ...) to broadcast over x; float32 like
    the official code, cast to x's dtype (bf16 under autocast) when applied."""
    return torch.rand((n, x.shape[0]) + (1,) * (x.dim() - 1), device=x.device, dtype=torch.float32)


class ShakeShake(nn.Module):
    """Mixes two residual branches: α ~ U(0,1) per sample forward, β ~ U(0,1) backward, 0.5 at eval."""

    stochastic = True

    def __init__(self) -> None:
        super().__init__()
        self.true_gradient = False

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return (a + b) * 0.5
        u = _per_sample_uniform(a, 2).to(a.dtype)
        alpha, beta = u[0], u[1]
        return shake_mix(a, b, alpha, alpha if self.true_gradient else beta)


def shakedrop_keep_prob(layer: int, total_layers: int, p_last: float = 0.5) -> float:
    """Linear decay rule: the l-th of L blocks keeps its branch with probability 1 - (l/L)(1 - p_L)
    (``_calc_shakedrop_mask_prob`` of the official code, with mask_prob = 1 - p_L = 0.5)."""
    return 1.0 - (layer / total_layers) * (1.0 - p_last)


class ShakeDrop(nn.Module):
    """ShakeDrop (Yamada et al. 2018, eq. 6): ``(b + α - bα) x`` with b ~ Bernoulli(keep_prob),
    α ~ U(alpha_range) forward, β ~ U(beta_range) backward; at eval the expectation
    ``keep_prob + E[α](1 - keep_prob)``."""

    stochastic = True

    def __init__(self, keep_prob: float, alpha_range: tuple[float, float] = (-1.0, 1.0), beta_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        if not 0.0 <= keep_prob <= 1.0:
            raise ValueError(f"ShakeDrop keep_prob must be in [0, 1], got {keep_prob}")
        self.keep_prob = float(keep_prob)
        self.alpha_range = (float(alpha_range[0]), float(alpha_range[1]))
        self.beta_range = (float(beta_range[0]), float(beta_range[1]))
        self.true_gradient = False

    @property
    def expected_scale(self) -> float:
        mean_alpha = 0.5 * (self.alpha_range[0] + self.alpha_range[1])
        return self.keep_prob + mean_alpha - self.keep_prob * mean_alpha

    def extra_repr(self) -> str:
        return f"keep_prob={self.keep_prob:.4f}, alpha_range={self.alpha_range}, beta_range={self.beta_range}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x * self.expected_scale
        u = _per_sample_uniform(x, 3)
        gate = (u[0] < self.keep_prob).to(u.dtype)  # Bernoulli(keep_prob)
        (a0, a1), (b0, b1) = self.alpha_range, self.beta_range
        alpha = a0 + (a1 - a0) * u[1]
        fwd = (gate + alpha - gate * alpha).to(x.dtype)
        if self.true_gradient:
            return shake_scale(x, fwd, fwd)
        beta = b0 + (b1 - b0) * u[2]
        return shake_scale(x, fwd, (gate + beta - gate * beta).to(x.dtype))
