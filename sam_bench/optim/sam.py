"""Sharpness-Aware Minimization (Foret et al., ICLR 2021) as a wrapper around a base optimizer.

For loss L and weights w, one SAM step is::

    g   = ∇L(w)                       (first pass, at w)
    ε̂   = ρ · g / ‖g‖₂                 (‖·‖ over all parameters together; ε̂ = 0 when g = 0)
    g'  = ∇L(w + ε̂)                    (second pass, second-order terms dropped)
    w   ← base_optimizer(w, g')         (the step is taken from w, not from w + ε̂)

Defaults follow the official code (google-research/sam, recipes.md §2): the L2 term 0.5·wd·‖w‖²
is part of the loss, so ``wd·w`` enters the ascent gradient and ``wd·(w+ε̂)`` the descent gradient
(``weight_decay_mode="decoupled"`` hands ``wd`` to the base optimizer instead, descent only);
the final gradient is clipped to a global norm (``grad_clip``) before the base step.
``rho = 0`` is plain SGD: one pass, :meth:`step` without a closure.

The interface is the one users know from davda54/sam: ``first_step``, ``second_step``,
``step(closure)``, and ``param_groups`` shared with the base optimizer so LR schedulers work.
``state_dict`` carries the base optimizer's state (momentum); the saved copy of ``w`` is not saved.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

WEIGHT_DECAY_MODES = ("loss", "decoupled")


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖(t₁, …, tₙ)‖₂ as one device scalar (no host sync), computed in float32 or wider."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([n.to(torch.promote_types(n.dtype, torch.float32)) for n in norms]))


class SAM(torch.optim.Optimizer):
    """SAM around ``base_optimizer`` (a class, e.g. ``torch.optim.SGD``).

    Args:
        params: parameters or parameter groups (a group may set its own ``rho`` and ``weight_decay``).
        base_optimizer: optimizer class that takes the descent step at ``w``.
        rho: radius of the perturbation ball; 0 gives the base optimizer alone.
        weight_decay: L2 coefficient ``wd`` (the loss gets ``0.5·wd·‖w‖²``).
        weight_decay_mode: ``"loss"`` (official code) or ``"decoupled"`` (base optimizer's own).
        grad_clip: clip the final gradient to this global norm (official default 5.0); None: no clip.
        **kwargs: the base optimizer's arguments (lr, momentum, nesterov, ...).
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        *,
        weight_decay: float = 0.0,
        weight_decay_mode: str = "loss",
        grad_clip: float | None = None,
        **kwargs,
    ):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        self.weight_decay_mode = weight_decay_mode
        self.grad_clip = grad_clip
        defaults = dict(rho=rho, weight_decay=weight_decay, **kwargs)
        super().__init__(params, defaults)
        for group in self.param_groups:
            # "l2" is SAM's own term (in the loss); "weight_decay" is what the base optimizer applies.
            wd = group["weight_decay"]
            group["l2"] = wd if weight_decay_mode == "loss" else 0.0
            group["weight_decay"] = 0.0 if weight_decay_mode == "loss" else wd
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups  # shared: schedulers see one lr
        self.defaults.update(self.base_optimizer.defaults)
        self._backup: list[torch.Tensor] | None = None  # w, saved by first_step (never checkpointed)
        self.grad_norm = torch.zeros(())  # ‖g‖ of the last first pass (device scalar, for logging)

    @property
    def two_pass(self) -> bool:
        """True when a step needs the second (perturbed) forward-backward pass."""
        return any(group["rho"] > 0 for group in self.param_groups)

    def _params_with_grad(self, group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [p for p in group["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    @torch.no_grad()
    def _add_l2(self) -> None:
        """grad += l2·w at the current weights (the gradient of 0.5·l2·‖w‖² in the loss)."""
        for group in self.param_groups:
            if group["l2"]:
                params, grads = self._params_with_grad(group)
                if params:
                    torch._foreach_add_(grads, params, alpha=group["l2"])

    @torch.no_grad()
    def _clip(self) -> None:
        """Scale all gradients by min(1, grad_clip/‖g‖) (official code; no epsilon)."""
        if self.grad_clip is None:
            return
        grads = [g for group in self.param_groups for g in self._params_with_grad(group)[1]]
        if grads:
            coef = (self.grad_clip / global_norm(grads)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save w, then move to w + ε̂ using the gradients of the first (clean) pass."""
        self._add_l2()
        per_group = [self._params_with_grad(g) for g in self.param_groups]
        all_grads = [g for _, grads in per_group for g in grads]
        norm = global_norm(all_grads)
        self.grad_norm = norm
        all_params = [p for params, _ in per_group for p in params]
        if self._backup is None or len(self._backup) != len(all_params) or any(b.shape != p.shape for b, p in zip(self._backup, all_params)):
            self._backup = [p.detach().clone() for p in all_params]
        else:
            torch._foreach_copy_(self._backup, all_params)
        self._perturbed = all_params
        inv_norm = 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny)  # g = 0 gives ε̂ = 0, not NaN
        for group, (params, grads) in zip(self.param_groups, per_group):
            if params and group["rho"] > 0:
                torch._foreach_add_(params, torch._foreach_mul(grads, inv_norm * group["rho"]))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly, then take the base step with the gradients of the perturbed pass."""
        if self._backup is None:
            raise RuntimeError("second_step() called before first_step()")
        self._add_l2()  # official: the L2 term is evaluated at w + ε̂ too
        torch._foreach_copy_(self._perturbed, self._backup)
        self._clip()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        """One full step. Call after the first ``backward``.

        With rho > 0, ``closure`` must redo forward and backward (at the perturbed weights).
        With rho = 0 this is the base optimizer's step (plus L2 and clipping); no closure runs.
        """
        if not self.two_pass:
            self._add_l2()
            self._clip()
            self.base_optimizer.step()
            return
        if closure is None:
            raise ValueError("SAM with rho > 0 needs a closure that recomputes forward and backward")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The base optimizer's state (momentum buffers, param groups with rho/l2), nothing else."""
        return {"base_optimizer": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.param_groups = self.base_optimizer.param_groups
