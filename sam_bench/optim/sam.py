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

Variants (all off by default):

- ``adaptive`` (ASAM, Kwon et al. 2021, as SamsungLabs/ASAM ``asam.py``): with T = |w| + η for the
  parameters whose group has ``adaptive=True`` and T = 1 for the others,
  ε = ρ · T²g / ‖T g‖. The official code scales the parameters whose *name contains "weight"*
  (conv/linear kernels **and BatchNorm scales**), not biases or BN shifts;
  :func:`sam_bench.optim.factory.build_optimizer` builds the groups that way.
- ``p="inf"``: ε = ρ · sign(g) (the dual-norm solution for p = ∞, App. C.5).
- ``p="random"``: ε = ρ · z / ‖z‖ with z ~ N(0, I) from the optimizer's own generator (App. C.5).
- ``ascent_steps = k > 1``: k projected ascent steps (Table 11): ε₁ as above, then
  ε ← Π_ρ(ε + ρ·ĝ(w+ε)) with ĝ the p-direction of the gradient at w+ε and Π_ρ the projection onto
  the ρ-ball of the same norm. k = 1 is plain SAM.
- ``second_order``: the full gradient of L(w + ε̂(w)) (App. C.4), g' + J_ε̂ᵀ g' with
  J_ε̂ᵀ v = ρ·H(v − ĝ ĝᵀv)/‖g‖ (H the Hessian at w incl. the L2 term), via a Hessian-vector product
  supplied by the training step.

Gradients are handled "stacked": the ascent works on tensors with a leading chunk axis [C, ...]
so the same code serves plain SAM (C = 1) and m-sharpness (C = batch/m chunks, each with its own ε).

The interface is the one users know from davda54/sam: ``first_step``, ``second_step``,
``step(closure)``, and ``param_groups`` shared with the base optimizer so LR schedulers work.
``state_dict`` carries the base optimizer's state (momentum); the saved copy of ``w`` is not saved.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from sam_bench.variant_rules import sam_variant_conflict

WEIGHT_DECAY_MODES = ("loss", "decoupled")
P_NORMS = ("2", "inf", "random")
DIAGNOSTICS = ("grad_norm", "eps_norm", "loss_gap", "cosine", "second_order_cosine")
#: recorded only by an optimizer with ``second_order`` (App. C.4, Fig. 5)
SECOND_ORDER_DIAGNOSTICS = ("second_order_cosine",)


_HALF = (torch.float16, torch.bfloat16)


def tensor_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """‖t‖₂ of every tensor as device scalars, each accumulated and returned in float32 or wider:
    fp16/bf16 tensors in float32 (``_foreach_norm`` would return their norm rounded to their own
    dtype: 32.5 for a bf16 gradient whose norm is 32.544), float32 and float64 in their own dtype
    (a float64 norm is never rounded to float32). One fused kernel per kind."""
    half = [i for i, t in enumerate(tensors) if t.dtype in _HALF]
    if not half:
        return list(torch._foreach_norm(tensors))
    if len(half) == len(tensors):
        return list(torch._foreach_norm(tensors, dtype=torch.float32))
    wide = [i for i, t in enumerate(tensors) if t.dtype not in _HALF]
    out: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for idx, norms in ((half, torch._foreach_norm([tensors[i] for i in half], dtype=torch.float32)),
                       (wide, torch._foreach_norm([tensors[i] for i in wide]))):
        for i, n in zip(idx, norms):
            out[i] = n
    return out


def _stacked(norms: list[torch.Tensor]) -> torch.Tensor:
    """The norms as one tensor in their widest dtype (float32 next to float64 is widened, exactly)."""
    dtype = norms[0].dtype
    for n in norms[1:]:
        dtype = torch.promote_types(dtype, n.dtype)
    return torch.stack([n.to(dtype) for n in norms])


def global_norm(tensors: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """‖(t₁, …, tₙ)‖₂ as one device scalar (no host sync), computed in float32 or wider (see
    :func:`tensor_norms`). No tensors: 0 on ``device`` (pass the optimizer's: a CPU zero meeting
    CUDA tensors later is a host-to-device copy)."""
    if not tensors:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(_stacked(tensor_norms(tensors)))


def chunk_slices(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The C slices t[0], …, t[C−1] of every stacked tensor [C, ...], parameter-major (views)."""
    return [s for t in tensors for s in t.unbind(0)]


def chunk_norms(tensors: list[torch.Tensor], chunks: int) -> torch.Tensor:
    """Per-chunk global L2 norm of stacked tensors [C, ...] -> [C]: one fused norm over all the
    chunk slices (not one kernel per parameter), computed in float32 or wider."""
    if chunks == 1:
        return global_norm(tensors).reshape(1)
    norms = _stacked(tensor_norms(chunk_slices(tensors))).view(len(tensors), chunks)
    return torch.linalg.vector_norm(norms, dim=0)


def scale_chunks(tensors: list[torch.Tensor], scale: torch.Tensor) -> list[torch.Tensor]:
    """t[c]·scale[c] for stacked tensors [C, ...] and a [C] scale, as new tensors: one fused copy
    and C fused in-place multiplies (not one broadcast kernel per parameter)."""
    out = torch._foreach_mul(tensors, 1.0)
    slices = chunk_slices(out)
    for c in range(scale.shape[0]):
        torch._foreach_mul_(slices[c::scale.shape[0]], scale[c])
    return out


def _per_chunk(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[C] -> [C, 1, ..., 1] so it broadcasts over a stacked tensor."""
    return scale.reshape(scale.shape + (1,) * (like.dim() - 1)).to(like.dtype)


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), each group in list order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' values, one after the other, as one new 1-d tensor (one kernel; exact)."""
    return torch.cat([t.reshape(-1) for t in tensors])


class _FlatCopy:
    """An exact copy of some tensors, taken before an fp16 base step, to put back on the device
    where the step overflowed (no host sync).

    One flat buffer per (device, dtype): one concatenation to save, and to put back one
    concatenation, one select and one fused copy, instead of a clone, a select and a copy per
    tensor. A select and never arithmetic: a skipped step's values are inf/NaN (inf·0 is NaN), and
    w + (w0 − w)·1 is not w0 in floating point; no foreach op selects (there is no _foreach_where).
    """

    def __init__(self, keys: list, tensors: list[torch.Tensor]):
        self.groups = []  # (keys, flat copy, sizes)
        for idx in _by_device_and_dtype(tensors):
            self.groups.append(([keys[i] for i in idx], _flat([tensors[i] for i in idx]), [tensors[i].numel() for i in idx]))

    def _saved_for(self, keys: list, like: list[torch.Tensor]) -> torch.Tensor:
        """The saved values of ``keys`` as one flat tensor (zeros for a key not saved)."""
        for saved_keys, flat, _ in self.groups:
            if saved_keys == keys:  # every step but a buffer's first: the saved buffer itself
                return flat
        pieces = {k: piece for saved_keys, flat, sizes in self.groups for k, piece in zip(saved_keys, flat.split(sizes))}
        return torch.cat([pieces[k].to(t.dtype) if k in pieces else t.new_zeros(t.numel()) for k, t in zip(keys, like)])

    def put_back_where(self, skip: torch.Tensor, keys: list, tensors: list[torch.Tensor]) -> None:
        """t ← its saved value (zeros if none was saved) where the device flag ``skip`` is set, for
        every tensor (bit for bit either way)."""
        for idx in _by_device_and_dtype(tensors):
            ts = [tensors[i] for i in idx]
            new = _flat(ts)
            torch.where(skip.to(new.device), self._saved_for([keys[i] for i in idx], ts), new, out=new)
            torch._foreach_copy_(ts, [v.view_as(t) for v, t in zip(new.split([t.numel() for t in ts]), ts)])


def _cosine_from_norms(norm_a: torch.Tensor, norm_b: torch.Tensor, norm_diff: torch.Tensor) -> torch.Tensor:
    """cos(a, b) = (‖a‖² + ‖b‖² − ‖a−b‖²) / (2‖a‖‖b‖) in float64, from three norms (fused norms of
    the tensor lists, no dot product per parameter); 0 when a or b is 0."""
    na, nb, nd = norm_a.double(), norm_b.double(), norm_diff.double()
    return (na**2 + nb**2 - nd**2) / (2 * na * nb).clamp_min(torch.finfo(torch.float64).tiny)


def second_order_terms(clean: list[torch.Tensor], first_order: list[torch.Tensor], groups: list[dict],
                       clean_norm: torch.Tensor, hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> list[torch.Tensor]:
    """J_ε̂ᵀ g' (App. C.4) for stacked tensors [C, ...], one ε̂ per chunk (C = 1 for plain SAM):
    ρ·H_L(u) + l2·u with u = (g' − ĝ ĝᵀg')/‖g‖ per chunk, where g is the clean gradient with its L2
    term, ‖g‖ = ``clean_norm`` [C], ĝ = g/‖g‖, g' = ``first_order`` (ρ per parameter group), and
    ``hvp(u)`` gives H_L·u per chunk (the Hessian of the loss without the L2 term)."""
    norm = clean_norm.clamp_min(torch.finfo(clean_norm.dtype).tiny)
    rv = [b * grp["rho"] for b, grp in zip(first_order, groups)]  # diag(ρ)·g' (ε̂ᵢ = ρᵢ gᵢ/‖g‖)
    gv = sum((a * b).reshape(a.shape[0], -1).sum(dim=1) for a, b in zip(clean, rv))
    u = [(b - a * _per_chunk(gv / norm**2, a)) / _per_chunk(norm, b) for a, b in zip(clean, rv)]
    return [h + ui * grp["l2"] if grp["l2"] else h for h, ui, grp in zip(hvp(u), u, groups)]


class SAM(torch.optim.Optimizer):
    """SAM around ``base_optimizer`` (a class, e.g. ``torch.optim.SGD``).

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``, ``weight_decay``
            and ``adaptive``).
        base_optimizer: optimizer class that takes the descent step at ``w``.
        rho: radius of the perturbation ball; 0 gives the base optimizer alone.
        weight_decay: L2 coefficient ``wd`` (the loss gets ``0.5·wd·‖w‖²``).
        weight_decay_mode: ``"loss"`` (official code) or ``"decoupled"`` (base optimizer's own).
        grad_clip: clip the final gradient to this global norm (official default 5.0); None: no clip.
        adaptive, eta: ASAM with T = |w| + η (see module docstring for which parameters).
        p: ``"2"`` (SAM), ``"inf"`` (sign) or ``"random"`` (Gaussian direction of norm ρ).
        ascent_steps: k projected ascent steps (Table 11).
        second_order: keep the dε̂/dw term (App. C.4); the step must pass ``hvp`` to second_step
            (:func:`sam_bench.engine.step.train_step` does; ``step(closure)`` cannot).
        diagnostics: accumulate ‖g‖, ‖ε‖, L(w+ε)−L(w), cos(g, g_SAM) on the device, and with
            ``second_order`` the cosine between the first-order and the full update (Fig. 5).
        seed: seed of the generator for ``p="random"``.
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
        adaptive: bool = False,
        eta: float = 0.01,
        p: str = "2",
        ascent_steps: int = 1,
        second_order: bool = False,
        diagnostics: bool = False,
        seed: int = 0,
        **kwargs,
    ):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        p = str(p)
        if p not in P_NORMS:
            raise ValueError(f"p must be one of {P_NORMS}, got {p!r}")
        if ascent_steps < 1:
            raise ValueError(f"ascent_steps must be >= 1, got {ascent_steps}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.weight_decay_mode = weight_decay_mode
        self.grad_clip = grad_clip
        self.p = p
        self.eta = eta
        self.ascent_steps = ascent_steps
        self.second_order = second_order
        self.diagnostics = diagnostics
        self.seed = seed
        self._sam_defaults = dict(rho=rho, weight_decay=weight_decay, adaptive=adaptive)
        defaults = dict(rho=rho, weight_decay=weight_decay, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._split_weight_decay(group)
        self._check_groups(self.param_groups)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups  # shared: schedulers see one lr
        self.defaults.update(self.base_optimizer.defaults)
        self._backup: list[torch.Tensor] | None = None  # w, saved by first_step (never checkpointed)
        self._perturbed: list[torch.Tensor] = []
        self._had_grad: set[int] = set()  # ids of the parameters with a clean-pass gradient
        self._eps: list[torch.Tensor] = []  # current ε (stacked [C, ...]), for k-step ascent
        self._clean_grad: list[torch.Tensor] | None = None  # g (for diagnostics / second order)
        self._clean_params: list[torch.Tensor] = []  # the parameters of self._clean_grad
        self._moved: list[torch.Tensor] = []  # the parameters of self._eps (plain SAM)
        self._clean_norm = torch.zeros(1, device=self._device)
        self._generator: torch.Generator | None = None
        self.grad_norm = torch.zeros((), device=self._device)  # ‖g‖ of the last first pass (device scalar, for logging)
        self._diag: torch.Tensor | None = None  # running sums of DIAGNOSTICS, on the device
        self._pending: torch.Tensor | None = None  # this step's values, added to _diag unless the step is skipped
        self._l2_preloaded = False

    # ---- bookkeeping ------------------------------------------------------------------------

    def _split_weight_decay(self, group: dict) -> None:
        """"l2" is SAM's own term (in the loss); "weight_decay" is what the base optimizer applies."""
        wd = group["weight_decay"]
        group["l2"] = wd if self.weight_decay_mode == "loss" else 0.0
        group["weight_decay"] = 0.0 if self.weight_decay_mode == "loss" else wd

    def _check_groups(self, groups: list[dict]) -> None:
        """The variants' constraints (:func:`sam_bench.variant_rules.sam_variant_conflict`, the config's
        rules), with ``adaptive`` as any group sets it (a group may switch ASAM on)."""
        conflict = sam_variant_conflict(any(g["adaptive"] for g in groups), self.p, self.ascent_steps, self.second_order)
        if conflict:
            raise ValueError(conflict)
        if self.ascent_steps > 1 and len({g["rho"] for g in groups}) > 1:
            raise ValueError("ascent_steps > 1 projects onto one ρ-ball: give all param groups the same rho")

    def add_param_group(self, param_group: dict) -> None:
        """A group added later (e.g. layers unfrozen for finetuning) gets SAM's own defaults (rho,
        weight_decay, adaptive) and the same weight-decay split as the groups given at
        construction, then joins the base optimizer's list, which SAM shares."""
        if "base_optimizer" not in self.__dict__:  # during __init__: torch's Optimizer builds the groups
            super().add_param_group(param_group)
            return
        group = {**self._sam_defaults, **param_group}
        self._split_weight_decay(group)
        self._check_groups([*self.param_groups, group])
        self.base_optimizer.add_param_group(group)

    @property
    def _device(self) -> torch.device:
        """Where the parameters live (the first one's device; the CPU for an optimizer without any)."""
        return next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))

    @property
    def two_pass(self) -> bool:
        """True when a step needs the second (perturbed) forward-backward pass."""
        return any(group["rho"] > 0 for group in self.param_groups)

    def _params_with_grad(self, group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [p for p in group["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    def trainable(self) -> list[tuple[torch.Tensor, dict]]:
        """(parameter, its group) for every parameter the optimizer owns, in group order."""
        return [(p, g) for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def add_l2(self) -> None:
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

    # ---- the perturbation (stacked: every tensor has a leading chunk axis) ------------------

    def _scale_t(self, params: list[torch.Tensor], groups: list[dict]) -> list[torch.Tensor | None]:
        """ASAM's T = |w| + η per parameter (None where the group is not adaptive)."""
        if not any(g["adaptive"] for g in groups):
            return [None] * len(params)
        return [(w.detach().abs() + self.eta) if g["adaptive"] else None for w, g in zip(params, groups)]

    @torch.no_grad()
    def direction(self, grads: list[torch.Tensor], params: list[torch.Tensor], groups: list[dict], chunks: int) -> list[torch.Tensor]:
        """ε (stacked [C, ...]) from stacked gradients: the variant's maximiser of εᵀg on the ρ-ball.

        Also records ‖g‖ per chunk (:attr:`clean_norm`) for diagnostics and the second-order term.
        """
        if not grads:  # nothing received a gradient this step: ‖g‖ = 0 (not the last step's)
            self._clean_norm = torch.zeros(1, device=self._device)
            return []
        rhos = [g["rho"] for g in groups]
        if self.p == "random":
            gen = self._rng(grads[0].device)
            z = [torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype) for t in grads]
            self._clean_norm = chunk_norms(grads, chunks)
            zn = chunk_norms(z, chunks).clamp_min(torch.finfo(z[0].dtype).tiny)
            return [t * _per_chunk(r / zn, t) for t, r in zip(z, rhos)]
        if self.p == "inf":
            self._clean_norm = chunk_norms(grads, chunks)
            return [torch.sign(t) * r for t, r in zip(grads, rhos)]
        ts = self._scale_t(params, groups)
        if chunks == 1 and len(set(rhos)) == 1 and any(s is not None for s in ts):
            return self._asam_fused(grads, ts, rhos[0])
        tg = [t if s is None else t * s for t, s in zip(grads, ts)]  # T g
        norm = chunk_norms(tg, chunks)
        self._clean_norm = norm if not any(s is not None for s in ts) else chunk_norms(grads, chunks)
        inv = 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny)  # g = 0 gives ε = 0, not NaN
        if not any(s is not None for s in ts) and len(set(rhos)) == 1:
            if chunks == 1:
                return torch._foreach_mul(grads, (inv * rhos[0]).reshape(()).to(grads[0].dtype))  # one fused kernel
            return scale_chunks(grads, inv * rhos[0])
        return [(u if s is None else u * s) * _per_chunk(inv * r, u) for u, s, r in zip(tg, ts, rhos)]

    def _asam_fused(self, grads: list[torch.Tensor], ts: list[torch.Tensor | None], rho: float) -> list[torch.Tensor]:
        """ASAM for C = 1 and one ρ: the same formula in fused foreach kernels, scaled parameters
        (T = |w| + η) and unscaled ones (T = 1) as two lists."""
        idx_a = [i for i, t in enumerate(ts) if t is not None]
        idx_p = [i for i, t in enumerate(ts) if t is None]
        t_a = [ts[i] for i in idx_a]
        tg_a = list(torch._foreach_mul([grads[i] for i in idx_a], t_a))
        g_p = [grads[i] for i in idx_p]
        norm = global_norm(tg_a + g_p).reshape(1)
        self._clean_norm = chunk_norms(grads, 1)
        scale = (rho / norm.clamp_min(torch.finfo(norm.dtype).tiny)).reshape(()).to(grads[0].dtype)
        torch._foreach_mul_(tg_a, t_a)
        torch._foreach_mul_(tg_a, scale)
        eps_p = torch._foreach_mul(g_p, scale) if g_p else []
        out: list[torch.Tensor] = [None] * len(grads)  # type: ignore[list-item]
        for i, e in zip(idx_a, tg_a):
            out[i] = e
        for i, e in zip(idx_p, eps_p):
            out[i] = e
        return out

    @torch.no_grad()
    def project(self, eps: list[torch.Tensor], chunks: int) -> list[torch.Tensor]:
        """Π onto the ρ-ball of the variant's norm (k-step ascent)."""
        rho = self.param_groups[0]["rho"]
        if self.p == "inf":
            return [e.clamp(-rho, rho) for e in eps]
        n = chunk_norms(eps, chunks)
        coef = (rho / n.clamp_min(torch.finfo(n.dtype).tiny)).clamp(max=1.0)
        return [e * _per_chunk(coef, e) for e in eps]

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def rng_state(self) -> torch.Tensor | None:
        """State of the generator of ``p="random"`` (None before its first draw), for a checkpoint."""
        return self._generator.get_state() if self._generator is not None else None

    def set_rng_state(self, state: torch.Tensor, device: torch.device | None = None) -> None:
        """Resume the generator of ``p="random"`` from :meth:`rng_state` (on ``device``, default the
        parameters')."""
        self._rng(device if device is not None else self._device).set_state(state)

    @property
    def clean_norm(self) -> torch.Tensor:
        """‖g‖ per chunk [C] of the clean-pass gradient that the last :meth:`direction` saw (device)."""
        return self._clean_norm

    def set_perturbation(self, eps: list[torch.Tensor], clean_norm: torch.Tensor) -> None:
        """The ε (stacked [C, ...]) now applied and the clean pass's ‖g‖ per chunk [C], for the
        diagnostics of :meth:`descend`, when a caller computes the ascent itself (m-sharpness)."""
        self._eps = eps
        self._clean_norm = clean_norm

    # ---- the plain (C = 1) two-pass API -----------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save w, then move to w + ε̂ using the gradients of the first (clean) pass."""
        self.add_l2()
        pairs = [(p, g) for p, g in self.trainable() if p.grad is not None]
        all_params = [p for p, _ in pairs]
        self._had_grad = {id(p) for p in all_params}  # preload_l2: the L2 term only where the loss reaches
        grads = [p.grad.unsqueeze(0) for p in all_params]
        # every parameter is saved, not only those with a gradient now: a later ascent pass may move
        # one that got none in this pass (k-step ascent), and restore() must put it back too
        self._save_backup([p for p, _ in self.trainable()])
        if self.diagnostics or self.second_order:
            self.keep_clean_grad(all_params, [p.grad for p in all_params])
        eps = self.direction(grads, all_params, [g for _, g in pairs], 1)
        self.grad_norm = self._clean_norm.reshape(())
        self._eps = [e for e, (_, g) in zip(eps, pairs) if g["rho"] > 0]
        self._moved = [p for p, g in pairs if g["rho"] > 0]  # the parameters self._eps belongs to
        if self._moved:
            torch._foreach_add_(self._moved, [e[0] for e in self._eps])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def ascent_step(self, zero_grad: bool = False) -> None:
        """One more projected ascent step from the gradient at w + ε (k-step SAM)."""
        self.add_l2()
        before = dict(zip(map(id, self._moved), self._eps))
        # ε lives on the parameters moved so far and those with a gradient now (a missing gradient is 0)
        pairs = [(p, g) for p, g in self.trainable() if g["rho"] > 0 and (p.grad is not None or id(p) in before)]
        moved, groups = [p for p, _ in pairs], [g for _, g in pairs]
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).unsqueeze(0) for p in moved]
        step = self.direction(grads, moved, groups, 1)
        previous = [before.get(id(p), torch.zeros_like(s)) for p, s in zip(moved, step)]
        self._eps = self.project([e + s for e, s in zip(previous, step)], 1)
        self._moved = moved
        backup = dict(zip(map(id, self._perturbed), self._backup))
        torch._foreach_copy_(moved, [backup[id(p)] for p in moved])
        torch._foreach_add_(moved, [e[0] for e in self._eps])
        self._clean_norm = self.grad_norm.reshape(1)  # diagnostics report the clean-pass ‖g‖
        if zero_grad:
            self.zero_grad()

    def keep_clean_grad(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Copy g (of ``params``) into persistent buffers (one fused copy per step, no allocation)."""
        self._clean_params = params
        buf = self._clean_grad
        if buf is None or len(buf) != len(grads) or any(b.shape != g.shape or b.dtype != g.dtype for b, g in zip(buf, grads)):
            self._clean_grad = [g.detach().clone() for g in grads]
        elif grads:  # (a foreach op refuses an empty list: a step where nothing got a gradient)
            torch._foreach_copy_(buf, grads)

    def _clean_grads_for(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The clean-pass gradient of each of ``params`` (zeros where that pass gave it none): the
        two passes' gradient lists are paired by parameter, never by position. The kept list itself
        when the parameters are the same (every step of a model whose passes use the same ones)."""
        if list(map(id, params)) == list(map(id, self._clean_params)):
            return self._clean_grad
        index = {id(p): i for i, p in enumerate(self._clean_params)}
        return [self._clean_grad[index[id(p)]] if id(p) in index else torch.zeros_like(p) for p in params]

    def _save_backup(self, params: list[torch.Tensor]) -> None:
        if self._backup is None or len(self._backup) != len(params) or any(b.shape != p.shape for b, p in zip(self._backup, params)):
            self._backup = [p.detach().clone() for p in params]
        else:
            torch._foreach_copy_(self._backup, params)
        self._perturbed = params

    @torch.no_grad()
    def preload_l2(self, loss_scale: torch.Tensor | None = None) -> None:
        """Put l2·(w+ε) in ``p.grad`` *before* the perturbed backward (grads must be None/zero).

        Under DDP the backward then all-reduces CE-gradient + L2 term together, so every rank gets
        mean_r l2·(w+ε_r) as the official per-device loss does, with no extra communication;
        :meth:`second_step` then skips its own L2 addition. Only the parameters that had a gradient
        in the clean pass get it (as :meth:`add_l2` without DDP): a frozen or unused one gets none,
        so it does not move.
        """
        for group in self.param_groups:
            params = [p for p in group["params"] if id(p) in self._had_grad]
            if not group["l2"] or not params:
                continue
            for idx in _by_device_and_dtype(params):  # fused kernels, the same arithmetic per tensor
                ps = [params[i] for i in idx]
                terms = torch._foreach_mul(ps, group["l2"])
                if loss_scale is not None:  # fp16: the backward adds scaled gradients
                    torch._foreach_mul_(terms, loss_scale.to(ps[0].device, ps[0].dtype))
                added = [(p.grad, t) for p, t in zip(ps, terms) if p.grad is not None]
                if added:
                    torch._foreach_add_([g for g, _ in added], [t for _, t in added])
                for p, t in zip(ps, terms):
                    if p.grad is None:
                        p.grad = t
        self._l2_preloaded = True

    @torch.no_grad()
    def second_step(
        self,
        zero_grad: bool = False,
        hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> None:
        """Restore w exactly, then take the base step with the gradients of the perturbed pass.

        ``hvp(u)`` (second_order only) returns H_L(w)·u for the loss without the L2 term.
        ``found_inf`` (fp16): a device flag; when set, the step is undone on the device (weights
        back to w, base-optimizer state untouched) without a host sync.
        """
        if self._backup is None:
            raise RuntimeError("second_step() called before first_step()")
        if not self._l2_preloaded:
            self.add_l2()  # official: the L2 term is evaluated at w + ε̂ too
        self._l2_preloaded = False
        self.restore()
        if self.second_order:
            if hvp is None:
                raise ValueError("second_order=True needs the step to pass hvp= to second_step")
            self._add_second_order(hvp)
        self.descend(found_inf)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the w saved by :meth:`first_step` (exactly), without a descent step."""
        if self._backup is None:
            raise RuntimeError("restore() called before first_step()")
        torch._foreach_copy_(self._perturbed, self._backup)

    @torch.no_grad()
    def _add_second_order(self, hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> None:
        """g' += J_ε̂ᵀ g' = ρ·H(u), u = (g' − ĝ ĝᵀg')/‖g‖, H = H_L + l2·I (App. C.4)."""
        params, groups = zip(*[(p, g) for p, g in self.trainable() if p.grad is not None])
        v = [p.grad for p in params]
        stacked = lambda ts: [t.unsqueeze(0) for t in ts]  # noqa: E731 - one chunk
        terms = [t[0] for t in second_order_terms(stacked(self._clean_grads_for(params)), stacked(v), list(groups),
                                                  self._clean_norm.reshape(1), lambda u: stacked(hvp([x[0] for x in u])))]
        if self.diagnostics:
            self.record_second_order_cosine(v, terms)
        torch._foreach_add_(v, terms)

    def record_second_order_cosine(self, first_order: list[torch.Tensor], terms: list[torch.Tensor]) -> None:
        """Fig. 5: cos(first-order g', full g' + J_ε̂ᵀ g'), from three fused norms."""
        full = torch._foreach_add(first_order, terms)
        cos = _cosine_from_norms(global_norm(first_order), global_norm(full), global_norm(terms))
        self._accumulate(DIAGNOSTICS.index("second_order_cosine"), cos)

    @torch.no_grad()
    def descend(self, found_inf: torch.Tensor | None = None) -> None:
        """Diagnostics, clip, base step from the final gradient in ``p.grad`` (weights at w);
        with ``found_inf`` (fp16) the step is masked out on the device."""
        if self.diagnostics and self.two_pass and self._clean_grad is not None:
            self._record_cosine()
        self._commit_diagnostics(found_inf)
        self._clip()
        if found_inf is None:
            self.base_optimizer.step()
            return
        params = [p for p, _ in self.trainable()]
        saved = _FlatCopy(*self._step_tensors(params))
        self.base_optimizer.step()
        # a buffer created by this step is restored to zeros: SGD then starts it from g exactly as
        # a fresh buffer (dampening 0)
        saved.put_back_where(found_inf.reshape(()) > 0, *self._step_tensors(params))

    def _step_tensors(self, params: list[torch.Tensor]) -> tuple[list[tuple[int, str]], list[torch.Tensor]]:
        """What the base step may change: the parameters and their tensor state (momentum), as
        (keys, tensors), a key being (the parameter's index, "" or the state's name)."""
        keys, tensors = [(i, "") for i in range(len(params))], list(params)
        for i, p in enumerate(params):
            for k, v in self.base_optimizer.state.get(p, {}).items():
                if torch.is_tensor(v):
                    keys.append((i, k))
                    tensors.append(v)
        return keys, tensors

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        """One full step. Call after the first ``backward``.

        With rho > 0, ``closure`` must redo forward and backward (at the perturbed weights).
        With rho = 0 this is the base optimizer's step (plus L2 and clipping); no closure runs.
        """
        if not self.two_pass:
            self.add_l2()
            self._clip()
            self.base_optimizer.step()
            return
        if closure is None:
            raise ValueError("SAM with rho > 0 needs a closure that recomputes forward and backward")
        if self.second_order:  # checked before any pass: second_step would refuse it after two of them
            raise ValueError("second_order=True needs a Hessian-vector product, which step(closure) cannot compute: "
                             "train with sam_bench.engine.step.train_step (it passes hvp= to second_step), or call "
                             "first_step and second_step(hvp=...) yourself")
        self.first_step(zero_grad=True)
        for _ in range(self.ascent_steps - 1):
            with torch.enable_grad():
                closure()
            self.ascent_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()

    # ---- diagnostics (device accumulators, read once per log interval) ----------------------

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(len(DIAGNOSTICS) + 1, device=self._device, dtype=torch.float64)

    def _accumulate(self, index: int, value: torch.Tensor) -> None:
        """Add to this step's values; :meth:`_commit_diagnostics` moves them to the running sums."""
        if self._pending is None:
            self._pending = self._zeros()
        self._pending[index] += value.detach().reshape(()).to(self._pending.device, torch.float64)

    def _commit_diagnostics(self, found_inf: torch.Tensor | None) -> None:
        """This step's values join the running sums, unless ``found_inf`` (fp16) says the step is
        skipped: its norms and losses are inf/NaN and would make the whole interval's means NaN
        (a device-side select, no sync)."""
        if self._pending is None:
            return
        if self._diag is None:
            self._diag = self._zeros()
        if found_inf is None:
            self._diag += self._pending
        else:
            self._diag += torch.where(found_inf.reshape(()) > 0, torch.zeros_like(self._pending), self._pending)
        self._pending.zero_()

    @torch.no_grad()
    def _record_cosine(self) -> None:
        """‖g‖, ‖ε‖ (chunk means) and cos(clean g, SAM g) before clipping, with fused norms."""
        params = [p for p, _ in self.trainable() if p.grad is not None]
        if list(map(id, params)) != list(map(id, self._clean_params)):  # some parameter has a gradient in one pass only
            clean_ids = set(map(id, self._clean_params))
            params = [p for p, _ in self.trainable() if p.grad is not None or id(p) in clean_ids]
        sam = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        clean = self._clean_grads_for(params)
        device = self._device
        cos = _cosine_from_norms(global_norm(clean, device), global_norm(sam, device),
                                 global_norm(torch._foreach_sub(clean, sam) if clean else [], device))
        self._accumulate(0, self._clean_norm.double().mean())
        self._accumulate(1, chunk_norms(self._eps, self._eps[0].shape[0]).double().mean() if self._eps else torch.zeros((), device=device))
        self._accumulate(3, cos)
        self._accumulate(len(DIAGNOSTICS), torch.ones((), device=self._clean_norm.device))

    def record_loss_gap(self, clean_loss: torch.Tensor, perturbed_loss: torch.Tensor) -> None:
        """Accumulate L(w+ε) − L(w) on the batch (device op, no sync)."""
        if self.diagnostics:
            self._accumulate(2, perturbed_loss.detach().double() - clean_loss.detach().double())

    def take_diagnostics(self) -> torch.Tensor | None:
        """The running sums since the last take, as a device tensor (the sums restart from zero; no
        sync): for a caller that reads them in a host sync it makes anyway, then turns the values
        into means with :meth:`diagnostics_means`. None when diagnostics are off or nothing ran."""
        if self._diag is None:
            return None
        sums = self._diag.clone()
        self._diag.zero_()
        return sums

    def diagnostics_means(self, sums: list[float]) -> dict[str, float]:
        """The values of :meth:`take_diagnostics`, read on the host, as means per step; {} when no
        step was recorded."""
        count = sums[-1]
        if not count:
            return {}
        return {f"sam/{name}": v / count for name, v in zip(DIAGNOSTICS, sums)
                if self.second_order or name not in SECOND_ORDER_DIAGNOSTICS}

    def read_diagnostics(self) -> dict[str, float]:
        """Means since the last read (one host sync of its own); {} when nothing was recorded."""
        sums = self.take_diagnostics()
        return {} if sums is None else self.diagnostics_means(sums.tolist())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The base optimizer's state (momentum buffers, param groups with rho/l2) and the
        random-direction generator; never the saved copy of w."""
        out = {"base_optimizer": self.base_optimizer.state_dict()}
        if self._generator is not None:
            out["generator"] = self.rng_state()
        if self._diag is not None:  # a log interval cut by a checkpoint: its resumed mean covers all its steps
            out["diagnostics"] = self._diag.detach().cpu().clone()
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.param_groups = self.base_optimizer.param_groups
        if "generator" in state_dict:
            self.set_rng_state(state_dict["generator"])
        if "diagnostics" in state_dict:
            self._diag = state_dict["diagnostics"].to(self._device).clone()
