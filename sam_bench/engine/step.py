"""The training step: one pass for SGD, two (or k+1) for SAM. This is the hot path: no host syncs.

Pass order of a SAM step (official code, recipes.md §2)::

    clean pass at w          BN running stats updated (mode "clean"/"both"), RNG state saved,
                             shake layers with true_gradient=True, under DDP ``no_sync``
    [k−1 extra ascent passes at w+ε (Table 11), same settings, BN stats untouched]
    perturbed pass at w+ε    RNG rewound (same dropout/shake draws), true_gradient=False,
                             BN stats untouched in mode "clean", DDP all-reduces this backward only
    base step at w           from the (clipped) perturbed-pass gradient

fp16: every backward runs on the scaled loss and is unscaled right after it; an inf/NaN in any pass
masks the whole step on the device (see :class:`sam_bench.engine.precision.LossScaler`).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from sam_bench.engine.precision import LossScaler, scaled_backward
from sam_bench.optim.bn import batchnorm_modules, running_stats_frozen
from sam_bench.optim.chunked import ghost_batch_norm_pass
from sam_bench.optim.sam import SAM


def _draws(m: nn.Module) -> bool:
    """Whether this module's own forward draws random numbers: a dropout module, a shake layer, a
    drop-path, or a timm model/head whose ``drop_rate`` > 0 (timm calls ``F.dropout`` there, which no
    module shows)."""
    return (isinstance(m, _DropoutNd) or getattr(m, "stochastic", False) or type(m).__name__ == "DropPath"
            or (isinstance(getattr(m, "drop_rate", None), (int, float)) and m.drop_rate > 0))


def uses_randomness(model: nn.Module) -> bool:
    """Whether the forward pass draws random numbers (dropout, shake layers, drop-path, timm's
    functional dropout)."""
    return any(_draws(m) for m in model.modules())


class RngReplay:
    """Saves the device RNG before the first pass and rewinds it before the second, so dropout
    and shake layers draw the same numbers in both passes (the official code reuses its key)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.state: torch.Tensor | None = None

    def save(self) -> None:
        self.state = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def rewind(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(self.state, self.device)
        else:
            torch.set_rng_state(self.state)


def set_true_gradient(model: nn.Module, value: bool) -> None:
    """Shake-Shake/ShakeDrop "true gradient fix": on for the ascent passes, off for the descent."""
    for m in model.modules():
        if hasattr(m, "true_gradient"):
            m.true_gradient = value


def _unscale(optimizer: SAM, scaler: LossScaler | None) -> None:
    if scaler is not None:
        scaler.unscale_(p.grad for p, _ in optimizer.trainable())


@torch.no_grad()
def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Mean over ranks of many small tensors in ONE all-reduce (flattened), written back in place."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    torch._foreach_copy_(tensors, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors)])


def _average_bn_state(model: nn.Module) -> None:
    """Running statistics = mean over ranks of the clean-pass updates (official ``pmean`` of the BN
    state), so every rank holds the same state (DDP's buffer broadcast then changes nothing)."""
    _all_reduce_mean([buf for mod in model.modules()
                      if isinstance(mod, _BatchNorm) and mod.training and mod.track_running_stats
                      for buf in (mod.running_mean, mod.running_var) if buf is not None])


def _average_gradients(optimizer: SAM) -> None:
    """All-reduce (mean) the ascent gradient: ``sync_perturbation`` (official --sync_perturbations)."""
    _all_reduce_mean([p.grad for p, _ in optimizer.trainable() if p.grad is not None])


def train_step(
    model: nn.Module,
    optimizer: SAM,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast: Callable[[], object],
    bn_modules: list[_BatchNorm] | None = None,
    rng: RngReplay | None = None,
    *,
    m: int | None = None,
    m_engine: str | None = None,
    m_layout: str = "nchw",
    scaler: LossScaler | None = None,
    sync_perturbation: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; returns the clean-pass loss and logits (detached).

    ``bn_modules``: when given, the perturbed pass leaves their running statistics alone
    (BN mode "clean"). ``rng``: when given, the perturbed pass replays the clean pass's draws.
    ``m``: m-sharpness chunk size (each chunk of m examples gets its own ε; ghost BN per chunk; for
    SGD, ghost BN only: the chunks are the simulated devices of both methods); None or the whole
    batch: plain SAM / SGD. ``m_engine``: "auto" (also None), "split" or "vmap", and ``m_layout``
    the vmap engine's image layout (see :func:`sam_bench.optim.msam.msam_step`). ``scaler``: fp16
    loss scaling. ``sync_perturbation``: under DDP, average the ascent gradient over ranks (default:
    each rank perturbs with its own).

    The passes: :func:`_sgd_step` (ρ = 0), else :func:`_ascent_passes` then :func:`_descent_pass`.
    """
    ddp_module = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    ddp = isinstance(ddp_module, nn.parallel.DistributedDataParallel)
    if m is not None and m != images.shape[0]:
        if m < 1 or images.shape[0] % m:  # a shape, not a value: no sync
            raise ValueError(f"m={m} must be >= 1 and divide the batch of {images.shape[0]} examples (chunks of m)")
        if ddp:
            raise ValueError("m-sharpness under DDP: each rank already perturbs with its own batch (m = per-rank batch); pass m=None")
        if optimizer.two_pass:
            from sam_bench.optim.msam import msam_step

            return msam_step(model, optimizer, images, labels, loss_fn, autocast, m, bn_modules, rng, scaler,
                             m_engine or "auto", m_layout)
    else:
        m = None
    if not optimizer.two_pass:
        return _sgd_step(model, optimizer, images, labels, loss_fn, autocast, m, scaler, ddp)
    if ddp and optimizer.second_order:
        raise ValueError("second_order under DDP is not supported (its double backward would bypass the all-reduce)")
    if rng is not None:
        rng.save()
    loss, logits = _ascent_passes(model, optimizer, images, labels, loss_fn, autocast, rng, scaler, ddp, sync_perturbation)
    _descent_pass(model, optimizer, images, labels, loss_fn, autocast, bn_modules, rng, scaler, ddp, loss)
    return loss.detach(), logits.detach()


def _sgd_step(model, optimizer: SAM, images, labels, loss_fn, autocast, m: int | None, scaler: LossScaler | None,
              ddp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SGD (ρ = 0): one pass and the base step; with ``m``, BN per chunk of m as in m-SAM's clean pass."""
    with ghost_batch_norm_pass(model, images.shape[0] // m) if m else contextlib.nullcontext(), autocast():
        logits = model(images)
        loss = loss_fn(logits, labels)
    scaled_backward(loss, scaler)
    if ddp:  # every rank the same running statistics, as SAM's clean pass leaves them (official pmean)
        _average_bn_state(model)
    if scaler is None:
        optimizer.step()
    else:
        _unscale(optimizer, scaler)
        optimizer.add_l2()
        optimizer.descend(scaler.found_inf)
        scaler.update()
    optimizer.zero_grad()
    return loss.detach(), logits.detach()


def _ascent_passes(model, optimizer: SAM, images, labels, loss_fn, autocast, rng: RngReplay | None,
                   scaler: LossScaler | None, ddp: bool, sync_perturbation: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean pass at w (BN statistics move; under DDP unsynced, forward and backward), then the
    weights at w + ε, then the k − 1 extra ascent passes (same draws, BN statistics untouched), all
    with the shake layers' true gradient. Returns the clean-pass loss and logits."""
    ddp_module = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    set_true_gradient(model, True)
    with ddp_module.no_sync() if ddp else contextlib.nullcontext():  # forward AND backward unsynced
        with autocast():
            logits = model(images)
            loss = loss_fn(logits, labels)
        scaled_backward(loss, scaler)
        if sync_perturbation and ddp:
            _average_gradients(optimizer)
    if ddp:
        _average_bn_state(model)
    _unscale(optimizer, scaler)
    optimizer.first_step(zero_grad=True)
    for _ in range(optimizer.ascent_steps - 1):
        if rng is not None:
            rng.rewind()
        with ddp_module.no_sync() if ddp else contextlib.nullcontext():
            with running_stats_frozen(batchnorm_modules(model)), autocast():
                ascent_loss = loss_fn(model(images), labels)
            scaled_backward(ascent_loss, scaler)
            if sync_perturbation and ddp:
                _average_gradients(optimizer)
        _unscale(optimizer, scaler)
        optimizer.ascent_step(zero_grad=True)
    set_true_gradient(model, False)
    return loss, logits


def _descent_pass(model, optimizer: SAM, images, labels, loss_fn, autocast, bn_modules: list[_BatchNorm] | None,
                  rng: RngReplay | None, scaler: LossScaler | None, ddp: bool, loss: torch.Tensor) -> None:
    """The perturbed pass at w + ε (the clean pass's draws; BN statistics untouched in mode "clean";
    the only backward DDP synchronises), then the base step from w (``second_step``: weights
    restored, second-order term, clip, fp16 masking)."""
    if rng is not None:
        rng.rewind()
    if ddp:
        optimizer.preload_l2(scaler.scale_ if scaler is not None else None)  # the L2 term of each rank's loss joins the all-reduce
    with running_stats_frozen(bn_modules or []), autocast():
        perturbed_loss = loss_fn(model(images), labels)
    scaled_backward(perturbed_loss, scaler)  # the only synchronised backward under DDP
    if ddp and bn_modules is None:  # BN mode "both": the perturbed pass's updates are averaged too
        _average_bn_state(model)  # (after the backward, which saved the running statistics)
    _unscale(optimizer, scaler)
    optimizer.record_loss_gap(loss, perturbed_loss)
    hvp = _hessian_vector_product(model, optimizer, images, labels, loss_fn, autocast, rng) if optimizer.second_order else None
    optimizer.second_step(zero_grad=True, hvp=hvp, found_inf=scaler.found_inf if scaler is not None else None)
    if scaler is not None:
        scaler.update()


def _hessian_vector_product(model, optimizer: SAM, images, labels, loss_fn, autocast, rng) -> Callable:
    """u ↦ H_L(w)·u for the clean-pass loss (App. C.4): a third forward at w (same draws, BN stats
    untouched, true gradient on) and a double backward."""

    def hvp(u: list[torch.Tensor]) -> list[torch.Tensor]:
        params = [p for p, _ in optimizer.trainable() if p.grad is not None]
        if rng is not None:
            rng.rewind()
        set_true_gradient(model, True)
        with torch.enable_grad():
            with running_stats_frozen(batchnorm_modules(model)), autocast():
                loss = loss_fn(model(images), labels)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            out = torch.autograd.grad(grads, params, grad_outputs=u)
        set_true_gradient(model, False)
        return list(out)

    return hvp
