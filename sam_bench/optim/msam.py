"""m-sharpness in one batched pass: each chunk of m examples gets its own ε (recipes.md §2).

The paper's multi-accelerator SAM treats every device as an independent SAM step on its sub-batch
and averages the resulting SAM gradients; m-sharpness is that with "device" = chunk of m examples.
So a chunk is a device in every respect:

- ε_c = ρ·g_c/‖g_c‖ from the chunk's own clean gradient g_c = ∇L_c(w) (+ L2 term, per chunk);
- BatchNorm normalises with per-chunk statistics in both passes (ghost BN), and the running
  statistics become the average over chunks of the clean-pass updates (official ``pmean`` of the
  BN state);
- the final gradient is mean_c ∇L_c(w + ε_c), then clipped and applied once.

Implementation: ``torch.func.vmap`` over the chunk axis of ``functional_call`` with *stacked*
parameters ([C, ...], one copy per chunk) and stacked BN buffers, so every layer runs once per pass
for all chunks (convolutions with per-chunk weights become one grouped convolution). Autograd
through the vmapped forward gives, in the clean pass, the per-chunk gradients (w.r.t. the stacked
leaf) and, in the perturbed pass, the chunk average directly in ``w.grad`` (the stacked weights are
w + ε_c with ε_c constant). No Python loop over chunks and no host sync.

Known limits: the batched passes run in fp32 whatever ``trainer.precision`` says (TF32 matmuls
on CUDA when enabled). Under vmap, CUDA autocast feeds batch norm bf16 activations with fp32
running statistics, which its batching rule rejects ("Expected running_mean to have type BFloat16
but got Float", seen on an H200 with torch 2.11); and CPU autocast does not cast the
``aten::convolution`` a vmapped convolution dispatches to. Plain SAM keeps bf16.
Ops without a batching rule (e.g. ``as_strided_`` inside channels-last adaptive pooling) fall back
to a per-chunk loop inside PyTorch; they are small ops at the end of the network.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from sam_bench.optim.sam import SAM


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Running-stat buffers of BN modules that update them in this mode (train + tracking)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, _BatchNorm) and mod.training and mod.track_running_stats:
            prefix = f"{name}." if name else ""
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(mod, b, None) is not None:
                    out[prefix + b] = getattr(mod, b)
    return out


def _stack(tensors: dict[str, torch.Tensor], chunks: int) -> dict[str, torch.Tensor]:
    return {k: v.detach().unsqueeze(0).repeat(chunks, *([1] * v.dim())) for k, v in tensors.items()}


@torch.no_grad()
def _write_back(buffers: dict[str, torch.Tensor], stacked: dict[str, torch.Tensor]) -> None:
    """Running statistics = mean over chunks (pmean); the batch counter moved by one."""
    for k, v in buffers.items():
        if k.endswith("num_batches_tracked"):
            v.copy_(stacked[k][0])
        else:
            v.copy_(stacked[k].mean(dim=0))


def msam_step(
    model: nn.Module,
    optimizer: SAM,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast: Callable[[], object],
    m: int,
    bn_modules: list | None,
    rng,
    scaler,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One m-sharpness SAM step (see module docstring). ``bn_modules`` given = BN mode "clean"."""
    from sam_bench.engine.step import set_true_gradient

    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: vmap the eager module
    batch = images.shape[0]
    chunks = batch // m
    # vmap cannot query channels_last contiguity (cuDNN BN does): chunks run in contiguous NCHW
    x = images.contiguous().reshape(chunks, m, *images.shape[1:])
    y = labels.reshape(chunks, m, *labels.shape[1:])
    name_of = {id(p): n for n, p in model.named_parameters()}
    owned = [(p, g) for p, g in optimizer.trainable() if id(p) in name_of]  # others get no gradient
    names = [name_of[id(p)] for p, _ in owned]
    params = [p for p, _ in owned]
    groups = [g for _, g in owned]
    owned_ids = {id(p) for p in params}
    bn_bufs = _bn_buffers(model)
    consts = {n: p.detach() for n, p in model.named_parameters() if id(p) not in owned_ids}
    consts.update({n: b for n, b in model.named_buffers() if n not in bn_bufs})

    def chunk_loss(stacked_params, stacked_bufs, xc, yc):
        with torch.autocast(device_type=xc.device.type, enabled=False):  # fp32: see "Known limits"
            out = functional_call(model, (stacked_params, stacked_bufs, consts), (xc,), strict=False)
            return loss_fn(out, yc), out

    batched = vmap(chunk_loss, in_dims=(0, 0, 0, 0), randomness="different")

    # clean pass: per-chunk gradients at w (leaf = w repeated per chunk)
    if rng is not None:
        rng.save()
    set_true_gradient(model, True)
    leaf = {n: p.detach().unsqueeze(0).expand(chunks, *p.shape).contiguous().requires_grad_(True) for n, p in zip(names, params)}
    bufs = _stack(bn_bufs, chunks)
    losses, logits = batched(leaf, bufs, x, y)
    (scaler.scale(losses.sum()) if scaler is not None else losses.sum()).backward()
    grads = [leaf[n].grad if leaf[n].grad is not None else torch.zeros_like(leaf[n]) for n in names]
    if scaler is not None:
        scaler.unscale_(grads)
    with torch.no_grad():
        for g, p, grp in zip(grads, params, groups):
            if grp["l2"]:
                g.add_(p.detach().unsqueeze(0), alpha=grp["l2"])  # the L2 term of each chunk's loss
        if bn_modules is not None or bn_bufs:
            _write_back(bn_bufs, bufs)
        eps = optimizer.direction(grads, params, groups, chunks)
        optimizer.grad_norm = optimizer._clean_norm.mean()
        optimizer._eps = eps
        if optimizer.diagnostics:
            optimizer._keep_clean_grad([g.mean(dim=0) for g in grads])
    del leaf, grads

    # perturbed pass: mean_c ∇L_c(w + ε_c) lands in w.grad
    set_true_gradient(model, False)
    if rng is not None:
        rng.rewind()
    optimizer.zero_grad()
    shifted = {n: (p.unsqueeze(0) + e).contiguous() for n, p, e in zip(names, params, eps)}
    bufs2 = _stack(bn_bufs, chunks)
    losses2, _ = batched(shifted, bufs2, x, y)
    (scaler.scale(losses2.mean()) if scaler is not None else losses2.mean()).backward()
    if scaler is not None:
        scaler.unscale_(p.grad for p in params)
    with torch.no_grad():
        if bn_modules is None and bn_bufs:  # mode "both": the perturbed pass updates the stats too
            _write_back(bn_bufs, bufs2)
        for p, e, grp in zip(params, eps, groups):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if grp["l2"]:
                p.grad.add_(p + e.mean(dim=0), alpha=grp["l2"])  # mean_c l2·(w + ε_c)
    loss = losses.detach().mean()
    optimizer.record_loss_gap(loss, losses2.detach().mean())
    optimizer.descend(scaler.found_inf if scaler is not None else None)
    optimizer.zero_grad()
    if scaler is not None:
        scaler.update()
    return loss, logits.detach().reshape(batch, *logits.shape[2:])
