"""m-sharpness layers without vmap: full-batch kernels, per-chunk kernels only where the math needs them.

A chunk c of m examples is evaluated at its own weights: ``w`` in the clean pass, ``w + ε_c`` in the
perturbed pass. What each pass must compute per chunk differs, and a convolution (the cost of every
CIFAR network) only pays for that part:

=================  ======================================  =======================================
                   clean pass (all chunks at w)            perturbed pass (chunk c at w + ε_c)
=================  ======================================  =======================================
forward            one full-batch convolution              C convolutions of m examples
input gradient     one full-batch kernel                   C kernels of m examples
weight gradient    C kernels of m examples (g_c per chunk) one full-batch kernel (only the sum
                                                           over chunks is needed: it is w.grad)
=================  ======================================  =======================================

The extra ascent passes of k-step m-SAM (Table 11) evaluate chunk c at w + ε_c *and* need g_c per
chunk: every kernel of those passes runs per chunk (``Stacked.per_chunk``).

Every per-chunk kernel is an ordinary dense convolution on a batch of m, so no grouped convolution and
no layout transpose is involved (the vmap engine in :mod:`sam_bench.optim.msam` turns each convolution
into a grouped one). BatchNorm normalises each chunk with its own statistics (ghost BN: one fused
kernel per chunk when eager, one expression over all chunks under ``torch.compile``); Linear layers
are one batched matmul over the chunks; every other layer (activations, pooling, dropout,
Shake-Shake/ShakeDrop) runs on the whole batch untouched, so RNG replay and the shake layers'
true-gradient switch work as in plain SAM.

Supported: models whose parameters all live in ``nn.Conv2d`` (zero padding; or timm's TF-'SAME' ``Conv2dSame``), ``nn.Linear``,
``nn.BatchNorm1d``/``nn.BatchNorm2d`` modules of exactly these types (every CIFAR architecture of the
paper). :func:`supports` says whether a model qualifies; the others use the vmap engine.

Parameters are given per pass as *stacked* tensors [C, ...]. In the clean pass an optimised
parameter is a leaf [C, ...] (w repeated), so autograd leaves g_c in ``leaf.grad[c]``; in the
perturbed pass it is ``w + ε`` built from the parameter itself, so autograd leaves
mean_c ∇L_c(w + ε_c) (times C, see the loss) directly in ``w.grad``; in an ascent pass it is a leaf
``w + ε_c`` per chunk, and autograd leaves ∇L_c(w + ε_c) in ``leaf.grad[c]``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same
from torch.nn.modules.batchnorm import _BatchNorm

SUPPORTED = (nn.Conv2d, Conv2dSame, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


def _why_unsupported(name: str, mod: nn.Module) -> str | None:
    """Why this engine cannot evaluate ``mod`` per chunk (None when it can)."""
    if type(mod) in SUPPORTED:
        if isinstance(mod, nn.Conv2d) and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
            return f"{name} ({type(mod).__name__}) pads with mode {mod.padding_mode!r} / padding {mod.padding!r}"
    elif isinstance(mod, _BatchNorm) or next(mod.parameters(recurse=False), None) is not None:
        # a BN subclass (e.g. with a fused activation) or a layer with parameters we cannot split
        return f"{name or 'the model'} ({type(mod).__name__}) is not Conv2d, Linear or BatchNorm1d/2d"
    return None


def unsupported_layer(model: nn.Module) -> str | None:
    """The first layer this engine cannot evaluate per chunk, described; None when there is none."""
    return next((why for name, mod in model.named_modules() if (why := _why_unsupported(name, mod))), None)


def supports(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` sits in a layer this engine evaluates per chunk."""
    return unsupported_layer(model) is None


@dataclass
class Stacked:
    """One parameter in one pass: ``value`` [C, ...] is what chunk c uses (value[c]).

    ``base`` is the parameter itself when the pass is the perturbed one (value = base + ε, the weight
    gradient is wanted summed over chunks, in ``base.grad``); None when all chunks share the value
    (clean pass, or a parameter the optimizer does not own) or when ``per_chunk``: the chunks'
    values differ and each chunk's gradient is wanted in ``value.grad[c]`` (the ascent passes of
    k-step m-SAM, value = w + ε_c as a leaf)."""

    value: torch.Tensor
    base: torch.Tensor | None = None
    per_chunk: bool = False


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a convolution in (x's own dtype when autocast is off)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _conv_args(conv: nn.Conv2d) -> tuple:
    return conv.stride, conv.padding, conv.dilation, conv.groups


def _weight_grad(grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    stride, padding, dilation, groups = _conv_args(conv)
    return torch.ops.aten.convolution_backward(
        grad_out, x, w, None, stride, padding, dilation, False, [0, 0], groups, [False, True, False])[1]


def _input_grad(grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    stride, padding, dilation, groups = _conv_args(conv)
    return torch.ops.aten.convolution_backward(
        grad_out, x, w, None, stride, padding, dilation, False, [0, 0], groups, [True, False, False])[0]


class _SharedWeightConv(torch.autograd.Function):
    """Clean pass: conv(x, w) for the whole batch; weight gradient per chunk, stacked [C, ...]."""

    @staticmethod
    def forward(ctx, x, stacked_w, conv, chunks):
        dt = _compute_dtype(x)
        xc, w = x.to(dt), stacked_w[0].to(dt)
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(xc, w, None, *_conv_args(conv))
        ctx.save_for_backward(xc, w)
        ctx.conv, ctx.chunks, ctx.w_dtype, ctx.x_dtype = conv, chunks, stacked_w.dtype, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        xc, w = ctx.saved_tensors
        grad_out = grad_out.to(xc.dtype)
        gx = _input_grad(grad_out, xc, w, ctx.conv).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            pairs = zip(grad_out.chunk(ctx.chunks), xc.chunk(ctx.chunks))
            gw = torch.stack([_weight_grad(g, xi, w, ctx.conv) for g, xi in pairs]).to(ctx.w_dtype)
        return gx, gw, None, None


def _per_chunk_conv(xc: torch.Tensor, ws: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Chunk c of ``xc`` through conv(·, ws[c]): C dense kernels of m examples, concatenated."""
    with torch.autocast(xc.device.type, enabled=False):
        return torch.cat([F.conv2d(xi, wi, None, *_conv_args(conv)) for xi, wi in zip(xc.chunk(len(ws)), ws)])


def _per_chunk_input_grad(grad_out: torch.Tensor, xc: torch.Tensor, ws: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    pairs = zip(grad_out.chunk(len(ws)), xc.chunk(len(ws)), ws)
    return torch.cat([_input_grad(g, xi, wi, conv) for g, xi, wi in pairs])


class _PerChunkWeightConv(torch.autograd.Function):
    """Chunk c through conv(x_c, w_c), w_c = w + ε_c = ``shifted[c]``; input gradient per chunk. The
    weight gradient goes to ``target``: summed over chunks (one full-batch kernel) when ``target`` is
    w itself (perturbed pass: mean_c ∇L_c(w + ε_c) is all that is needed), per chunk [C, ...] when
    ``per_chunk_grad`` (``target`` = the stacked leaf w + ε_c: the ascent passes of k-step m-SAM)."""

    @staticmethod
    def forward(ctx, x, target, shifted, conv, per_chunk_grad):
        dt = _compute_dtype(x)
        xc, ws = x.to(dt), shifted.to(dt)
        y = _per_chunk_conv(xc, ws, conv)
        ctx.save_for_backward(xc, ws)
        ctx.conv, ctx.w_dtype, ctx.x_dtype, ctx.per_chunk_grad = conv, target.dtype, x.dtype, per_chunk_grad
        return y

    @staticmethod
    def backward(ctx, grad_out):
        xc, ws = ctx.saved_tensors
        grad_out = grad_out.to(xc.dtype)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _per_chunk_input_grad(grad_out, xc, ws, ctx.conv).to(ctx.x_dtype)
        if ctx.needs_input_grad[1] and ctx.per_chunk_grad:
            pairs = zip(grad_out.chunk(len(ws)), xc.chunk(len(ws)), ws)
            gw = torch.stack([_weight_grad(g, xi, wi, ctx.conv) for g, xi, wi in pairs]).to(ctx.w_dtype)
        elif ctx.needs_input_grad[1]:
            gw = _weight_grad(grad_out, xc, ws[0], ctx.conv).to(ctx.w_dtype)
        return gx, gw, None, None, None


def conv_forward(conv: nn.Conv2d, x: torch.Tensor, params: dict[str, Stacked], chunks: int) -> torch.Tensor:
    w = params["weight"]
    if isinstance(conv, Conv2dSame):  # TF 'SAME' padding (the official models' strided convs), then an unpadded conv
        x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
    if w.base is not None:
        y = _PerChunkWeightConv.apply(x, w.base, w.value.detach(), conv, False)
    elif w.per_chunk:
        y = _PerChunkWeightConv.apply(x, w.value, w.value.detach(), conv, True)
    else:
        y = _SharedWeightConv.apply(x, w.value, conv, chunks)
    if "bias" in params:  # per chunk: [C, Cout] -> [C, 1, Cout, 1, 1] against [C, m, Cout, H, W]
        b = params["bias"].value
        y = (y.view(chunks, -1, *y.shape[1:]) + b.reshape(chunks, 1, -1, 1, 1).to(y.dtype)).view(y.shape)
    return y


def linear_forward(lin: nn.Linear, x: torch.Tensor, params: dict[str, Stacked], chunks: int) -> torch.Tensor:
    xs = x.reshape(chunks, -1, x.shape[-1])
    w = params["weight"].value.transpose(1, 2)
    y = torch.bmm(xs, w) if "bias" not in params else torch.baddbmm(params["bias"].value.unsqueeze(1), xs, w)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _updates_running_stats(bn: _BatchNorm, update_stats: bool) -> bool:
    return update_stats and bn.training and bn.track_running_stats and bn.running_mean is not None


def batch_norm_forward(bn: _BatchNorm, x: torch.Tensor, params: dict[str, Stacked], chunks: int,
                       update_stats: bool) -> torch.Tensor:
    """Ghost BN: chunk c normalised with its own batch statistics (training) or the running ones
    (eval), then chunk c's affine map. Eager: one ``F.batch_norm`` per chunk (the fused kernel, fp32
    statistics for fp16/bf16 input); under ``torch.compile``: :func:`_batch_norm_vectorised`.
    Running statistics, when updated, move by the mean over chunks of the per-chunk updates (the
    official ``pmean`` of the BN state)."""
    if torch.compiler.is_compiling():
        return _batch_norm_vectorised(bn, x, params, chunks, update_stats)
    weight = params["weight"].value if "weight" in params else [None] * chunks
    bias = params["bias"].value if "bias" in params else [None] * chunks
    batch_stats = bn.training or bn.running_mean is None
    track = batch_stats and _updates_running_stats(bn, update_stats)
    in_kernel = track and bn.momentum is not None  # F.batch_norm updates a per-chunk copy (row c)
    if in_kernel:
        means, variances = (s.unsqueeze(0).repeat(chunks, 1) for s in (bn.running_mean, bn.running_var))
        stats = list(zip(means, variances))
    elif batch_stats:
        stats = [(None, None)] * chunks
    else:
        stats = [(bn.running_mean, bn.running_var)] * chunks
    momentum = bn.momentum if in_kernel else 0.0
    y = torch.cat([F.batch_norm(xc, rm, rv, w, b, batch_stats, momentum, bn.eps)
                   for xc, (rm, rv), w, b in zip(x.chunk(chunks), stats, weight, bias)])
    if track:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            if in_kernel:
                bn.running_mean.copy_(means.mean(0))
                bn.running_var.copy_(variances.mean(0))
            else:
                update_running_stats(bn, x, chunks)
    return y


def _batch_norm_vectorised(bn: _BatchNorm, x: torch.Tensor, params: dict[str, Stacked], chunks: int,
                           update_stats: bool) -> torch.Tensor:
    """Ghost BN as tensor ops over the [C, m, channels, ...] view of the batch (no copy, any memory
    format): the statistics of every chunk in one reduction, the normalisation and per-chunk affine
    map in one pointwise expression. For ``torch.compile``, which fuses these into a reduction and a
    pointwise kernel shared by all chunks (and with the neighbouring layers), where the eager form
    gives C kernels and a concatenation per layer. Same arithmetic as ``F.batch_norm``: biased
    variance to normalise, unbiased for the running variance, fp32 statistics for fp16/bf16."""
    xf = at_least_fp32(x.view(chunks, -1, *x.shape[1:]))
    per_chunk = [chunks, 1, -1] + [1] * (x.dim() - 2)  # [C, ch] -> broadcast against [C, m, ch, ...]
    per_channel = [1, 1, -1] + [1] * (x.dim() - 2)
    if bn.training or bn.running_mean is None:
        var, mean = _chunk_moments(xf)
    else:
        var, mean = (s.to(xf.dtype).view(per_channel) for s in (bn.running_var, bn.running_mean))
    scale = torch.rsqrt(var + bn.eps)
    if "weight" in params:
        scale = scale * params["weight"].value.to(xf.dtype).view(per_chunk)
    y = (xf - mean) * scale
    if "bias" in params:
        y = y + params["bias"].value.to(xf.dtype).view(per_chunk)
    if _updates_running_stats(bn, update_stats):
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            _move_running_stats(bn, var, mean, xf)
    return y.to(x.dtype).reshape(x.shape)


def _chunk_moments(xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean of every (chunk, channel) of the [C, m, channels, ...] view, in one
    reduction, shaped [C, 1, channels, 1, ...] to broadcast against it."""
    return torch.var_mean(xv, dim=[1, *range(3, xv.dim())], correction=0, keepdim=True)


def update_running_stats(bn: _BatchNorm, x: torch.Tensor, chunks: int) -> None:
    """Move ``bn``'s running statistics by the mean over the ``chunks`` chunks of ``x`` of each chunk's
    statistics (:func:`_move_running_stats`; the batch counter already advanced), in fp32 for
    fp16/bf16 activations. The eager path with momentum None (``F.batch_norm`` would need the count as
    a host float: a sync), and the vmap engine's ghost BN (one chunk per vmapped call)."""
    xv = at_least_fp32(x.detach()).view(chunks, -1, *x.shape[1:])
    _move_running_stats(bn, *_chunk_moments(xv), xv)


def _move_running_stats(bn: _BatchNorm, chunk_vars: torch.Tensor, chunk_means: torch.Tensor, xv: torch.Tensor) -> None:
    """running ← (1 − mom)·running + mom·(mean over chunks of the chunk statistics, the variances
    made unbiased over the n values per chunk and channel of the [C, m, channels, ...] view ``xv``),
    mom = ``bn.momentum``, or 1/count (cumulative average) for momentum None, with the count kept on
    the device (already advanced for this step)."""
    n = xv.numel() // (xv.shape[0] * xv.shape[2])
    mom = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked
    unbiased = chunk_vars * (n / (n - 1)) if n > 1 else chunk_vars
    for stat, new in ((bn.running_mean, chunk_means), (bn.running_var, unbiased)):
        stat.mul_(1 - mom).add_(mom * new.detach().mean(0).flatten().to(stat.dtype))


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged (a float64 value must not be rounded to fp32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _layer_forward(fn, mod: nn.Module, **kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ fn(mod, x, **kwargs)`` as a closure, which dynamo reuses one graph for at every step
    (with ``functools.partial`` here it recompiled at each step: caught by the compile tests)."""
    return lambda x: fn(mod, x, **kwargs)


@contextmanager
def chunked_layers(model: nn.Module, chunks: int, params: dict[str, Stacked], update_stats: bool) -> Iterator[None]:
    """Evaluate ``model`` with chunk c at parameters ``params[name].value[c]`` (names as in
    ``model.named_parameters()``); BN running statistics updated when ``update_stats``. A layer it
    cannot split raises ``ValueError`` before any module is touched (checked in this same walk)."""
    layers = []
    for prefix, mod in model.named_modules():
        why = _why_unsupported(prefix, mod)
        if why:
            raise ValueError(f"optimizer.m_engine=split cannot run this model: {why}; use optimizer.m_engine=auto or vmap")
        if type(mod) in SUPPORTED:
            layers.append((prefix, mod))
    swapped = []
    for prefix, mod in layers:
        own = {k: params[f"{prefix}.{k}" if prefix else k] for k, p in mod.named_parameters(recurse=False)}
        if isinstance(mod, nn.Conv2d):
            mod.forward = _layer_forward(conv_forward, mod, params=own, chunks=chunks)
        elif isinstance(mod, nn.Linear):
            mod.forward = _layer_forward(linear_forward, mod, params=own, chunks=chunks)
        else:
            mod.forward = _layer_forward(batch_norm_forward, mod, params=own, chunks=chunks, update_stats=update_stats)
        swapped.append(mod)
    try:
        yield
    finally:
        for mod in swapped:
            del mod.forward


_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def whole_bn_forward(bn: _BatchNorm, normalise: Callable[[torch.Tensor], torch.Tensor],
                     refusal: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A replacement forward of ``bn`` that normalises with ``normalise``: a plain BatchNorm is just that;
    timm's BatchNormAct2d (BN, drop, act in one module, as in timm's EfficientNets) keeps its drop and
    activation; any other subclass is refused (``ValueError(refusal)``): replacing its forward would
    drop whatever else it does."""
    if type(bn) in _PLAIN_BATCH_NORMS:
        return normalise
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        return lambda x: bn.act(bn.drop(normalise(x)))
    raise ValueError(refusal)


@contextmanager
def batch_norm_forwards(model: nn.Module, forward_of: Callable[[_BatchNorm], Callable]) -> Iterator[None]:
    """Every BatchNorm of ``model`` runs ``forward_of(module)`` (instance-level forward) inside the block;
    all are built before any module is touched, so a refusal leaves the model as it was."""
    mods = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    forwards = [forward_of(mod) for mod in mods]
    for mod, fwd in zip(mods, forwards):
        mod.forward = fwd
    try:
        yield
    finally:
        for mod in mods:
            del mod.forward


def _ghost_bn_forward(bn: _BatchNorm, chunks: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward of one BN module in :func:`ghost_batch_norm_pass`: its affine parameters shared by
    all chunks as expanded views (their gradients sum into the parameter)."""
    def normalise(x: torch.Tensor) -> torch.Tensor:
        shared = {k: Stacked(p.expand(chunks, *p.shape)) for k, p in bn.named_parameters(recurse=False)}
        return batch_norm_forward(bn, x, shared, chunks, update_stats=True)

    return whole_bn_forward(bn, normalise, f"optimizer.m with SGD normalises BatchNorm per chunk of m examples, which the "
                            f"BatchNorm subclass {type(bn).__name__} cannot do (its forward does more than batch "
                            "normalisation); use optimizer.m=null for this model")


def ghost_batch_norm_unsupported(model: nn.Module) -> str | None:
    """Why :func:`ghost_batch_norm_pass` cannot run ``model`` (None when it can)."""
    try:
        for mod in model.modules():
            if isinstance(mod, _BatchNorm):
                _ghost_bn_forward(mod, 1)
    except ValueError as e:
        return str(e)
    return None


def ghost_batch_norm_pass(model: nn.Module, chunks: int):
    """Run ``model`` unchanged except that every BatchNorm normalises each chunk of the batch with its
    own statistics and moves its running statistics by the mean over chunks of the chunk updates: the
    one pass of SGD with ``optimizer.m``, whose simulated devices each normalise their own m examples
    as m-SAM's chunks do (official code: BN batch = per-device batch, running state ``pmean``-ed;
    recipes.md §2). Weights are shared, so everything but BN runs on the whole batch."""
    return batch_norm_forwards(model, lambda bn: _ghost_bn_forward(bn, chunks))
