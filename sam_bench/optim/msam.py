"""m-sharpness without a loop over the model: each chunk of m examples gets its own ε (recipes.md §2).

The paper's multi-accelerator SAM treats every device as an independent SAM step on its sub-batch
and averages the resulting SAM gradients; m-sharpness is that with "device" = chunk of m examples.
So a chunk is a device in every respect:

- ε_c = ρ·g_c/‖g_c‖ from the chunk's own clean gradient g_c = ∇L_c(w) (+ L2 term, per chunk), or
  any variant's direction (ASAM, p = ∞, random); with k ascent steps (Table 11) each chunk takes
  its own k − 1 further projected steps from its gradient at w + ε_c (an extra pass each, in which
  every chunk has its own weights and gets its own gradient; BN state untouched); with the
  second-order term (App. C.4) each chunk's final gradient gets its own J_cᵀ g'_c, from a Hessian-
  vector product of its own loss (vmap engine only: a double backward through the vmapped pass);
- BatchNorm normalises with per-chunk statistics in both passes (ghost BN), and the running
  statistics become the average over chunks of the clean-pass updates (official ``pmean`` of the
  BN state);
- the final gradient is mean_c ∇L_c(w + ε_c), then clipped and applied once.

Two engines compute exactly this (``msam_step``'s ``engine``; "auto" takes split for a compiled model or on the CPU,
vmap for an eager CUDA model, above ``SPLIT_MAX_CHUNKS`` chunks per batch, or where split cannot run
the model: measured, see ``why_auto_takes_vmap``):

- **split** (:mod:`sam_bench.optim.chunked`): the network runs on the whole batch and only the
  parts that differ per chunk run per chunk: in the clean pass (all chunks at w) a convolution's
  forward and input gradient are ordinary full-batch kernels and only its weight gradient is taken
  per chunk; in the perturbed pass (chunk c at w + ε_c) forward and input gradient run per chunk
  and the weight gradient, needed only summed over chunks, is one full-batch kernel. Every kernel
  is a dense one (no grouped convolution, no layout transpose). For models built from Conv2d,
  Linear and BatchNorm (all the paper's CIFAR architectures).
- **vmap** (any model): ``torch.func.vmap`` over the chunk axis of ``functional_call`` with
  *stacked* parameters ([C, ...], one copy per chunk) and stacked BN buffers, so every layer runs
  once per pass for all chunks (convolutions with per-chunk weights become one grouped
  convolution). Autograd through the vmapped forward gives, in the clean pass, the per-chunk
  gradients (w.r.t. the stacked leaf) and, in the perturbed pass, the chunk average directly in
  ``w.grad`` (the stacked weights are w + ε_c with ε_c constant).

Both run without a host sync.

Compilation: given a ``torch.compile``'d model (``trainer.compile=true``), the split engine calls it
inside :func:`chunked.chunked_layers`; dynamo traces the swapped layer forwards and both custom
autograd Functions into one graph per pass (clean, perturbed), compiled on the first step and reused
by every later one (the parameters reach the graph as inputs, not constants). The vmap engine runs
the eager module. Tests: float64 equality with the loop reference under ``aot_eager`` and inductor,
no recompilation after the first step, no graph break.

Precision: the passes run under the trainer's autocast (bf16 on CUDA by default), like plain SAM.
vmap engine: BatchNorm inside the vmapped call goes through ``ghost_batch_norm`` below instead of
the module's own forward: ``F.batch_norm``'s vmap batching rule rejects bf16 activations with fp32
running statistics ("Expected running_mean to have type BFloat16 but got Float", H200, torch
2.11), so the statistics-free batch norm is called and the running averages are updated
separately in fp32. A channels_last model's images are re-laid out per ``layout`` (``LAYOUTS``; the module's
own BN forward asked vmap for the memory format, which it cannot answer for channels_last). On
CPU, autocast does not cast the ``aten::convolution`` a vmapped convolution dispatches to, so
convolutions stay fp32 there. Ops without a batching rule (e.g. ``as_strided_`` inside
channels-last adaptive pooling) fall back to a per-chunk loop inside PyTorch; they are small ops at
the end of the network.

Speed, WRN-28-10 (CUDA) / WRN-16-4 (CPU), batch 256, m = 32 (results/benchmarks.md):

- H200 bf16, torch 2.11 (eighth session): plain SAM 52.8 ms eager, 43.1 ms compiled; vmap 142.5 ms
  (eager only); split 181.5 ms eager, **106.3 ms compiled** (m-SAM/SAM 2.46, compiled both). The
  eager split engine is host-bound there (the profiler saw 78 ms of kernels in a 167 ms step: about
  C kernels per layer and pass, a concatenation per layer); under ``reduce-overhead`` (CUDA graphs)
  the compiled split step took 297 ms (not diagnosed yet). The vmap profile (third session) puts its
  excess in cuDNN's grouped convolutions (NCHW<->NHWC transposes, slower grouped weight gradients).
- CPU fp32 (2 cores), one run: split 6.67 s, vmap 8.57 s, plain SAM 6.57 s per step (m-SAM/SAM
  1.02 split, 1.30 vmap); compiled, split m-SAM 5.33 s against SAM 4.75 s (1.12).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from sam_bench.engine.precision import scaled_backward
from sam_bench.optim import chunked
from sam_bench.optim.chunked import at_least_fp32
from sam_bench.optim.sam import SAM, second_order_terms


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


def _structure(model: nn.Module) -> tuple:
    """What a :class:`_Setup` of ``model`` depends on, as a cheap key: the ids of its modules and
    parameters, its buffers' names, and the modes that decide which BN statistics move (a walk
    without building names, about half the cost of one ``named_parameters()``)."""
    out: list = []
    stack = [model]
    while stack:
        mod = stack.pop()
        out += (id(mod), mod.training, mod.__dict__.get("track_running_stats"))  # (no getattr: a miss raises, slow)
        out += map(id, mod._parameters.values())
        out += mod._buffers
        stack += (m for m in mod._modules.values() if m is not None)
    return tuple(out)


@dataclass
class _Setup:
    """What a step's passes take from the model and the optimizer's parameter groups alone (and the
    engine, chunk count and device): built once and reused while ``key`` holds. ``msam_step`` used
    to rebuild it at every step (several walks over the model's modules and parameters with their
    names: a host cost of the eager split engine, host-bound on a GPU). Tensors whose storage may
    be swapped (``model.to()``) are read at each step: parameters are detached then, buffers are
    looked up in their module."""

    key: tuple
    held: list  # every object whose id is in ``key`` (so that no new object takes one of them)
    runner: nn.Module  # the model as called (a torch.compile wrapper stays compiled)
    model: nn.Module
    engine: str  # "split" or "vmap"
    names: list[str]  # the parameters the step trains: the optimizer's, in the model, requires_grad
    params: list[torch.Tensor]
    groups: list[dict]
    fixed: list[tuple[str, torch.Tensor]]  # the model's other parameters (constants of the passes)
    bn_buffers: list[tuple[str, nn.Module, str]]  # (name, module, attribute): running stats BN moves
    other_buffers: list[tuple[str, nn.Module, str]]  # every other buffer (a constant of the passes)

    @staticmethod
    def buffers(slots: list[tuple[str, nn.Module, str]]) -> dict[str, torch.Tensor]:
        """{name: the buffer now in its module} for ``bn_buffers`` or ``other_buffers``."""
        return {name: mod._buffers[attr] for name, mod, attr in slots}


#: The last setup per optimizer (weak: dropped with the optimizer).
_SETUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _setup(runner: nn.Module, optimizer: SAM, chunks: int, engine: str, device_type: str) -> _Setup:
    """The cached :class:`_Setup` of this model, optimizer, chunk count, engine and device, rebuilt
    when any of them changed: a module or parameter replaced or added, a train/eval switch, a
    parameter frozen or unfrozen, a param group added or reloaded (``load_state_dict``)."""
    model = getattr(runner, "_orig_mod", runner)
    key = (id(runner), _structure(model), chunks, engine, device_type, optimizer.second_order,
           tuple((id(p), id(g), p.requires_grad) for g in optimizer.param_groups for p in g["params"]))
    setup = _SETUPS.get(optimizer)
    if setup is None or setup.key != key:
        setup = _SETUPS[optimizer] = _new_setup(key, runner, model, optimizer, chunks, engine, device_type)
    return setup


def _new_setup(key: tuple, runner: nn.Module, model: nn.Module, optimizer: SAM, chunks: int, engine: str,
               device_type: str) -> _Setup:
    name_of = {id(p): n for n, p in model.named_parameters()}
    # the optimizer's parameters of this model that train (one frozen after the optimizer was built does not)
    owned = [(p, g) for p, g in optimizer.trainable() if id(p) in name_of and p.requires_grad]
    owned_ids = {id(p) for p, _ in owned}
    if engine not in ("split", "vmap") or (optimizer.second_order and engine == "split"):  # the trainer resolves it once
        engine = resolve_engine(runner, engine, chunks, device=device_type, second_order=optimizer.second_order)
    bn = _bn_buffers(model)

    def slot(name: str) -> tuple[str, nn.Module, str]:
        prefix, _, attr = name.rpartition(".")
        return name, model.get_submodule(prefix), attr

    return _Setup(
        key=key, held=[runner, *model.modules(), *model.parameters(), *optimizer.param_groups],
        runner=runner, model=model, engine=engine,
        names=[name_of[id(p)] for p, _ in owned], params=[p for p, _ in owned], groups=[g for _, g in owned],
        fixed=[(n, p) for n, p in model.named_parameters() if id(p) not in owned_ids],
        bn_buffers=[slot(n) for n in bn], other_buffers=[slot(n) for n, _ in model.named_buffers() if n not in bn],
    )


#: Physical layout of the chunked images: "nchw" (contiguous chunks) or "interleaved" (memory
#: order m, H, W, chunk, C). vmap turns each convolution into one grouped convolution over
#: [m, chunks*C, H, W]; the interleaved order makes that tensor channels_last, so cuDNN runs NHWC
#: grouped kernels and the layout carries through the network, instead of transposing NCHW to
#: NHWC and back around every convolution. Measured on an H200 (WRN-28-10, m=32 of 256, bf16):
#: 151 ms interleaved vs 159 ms nchw per step (results/benchmarks.md). The default stays "nchw",
#: the layout every CUDA test ran with (bf16, fp16, fp32); "interleaved" ran in bf16 only
#: (scripts/bench_sam.py's variant "msam_il" passes it).
LAYOUTS = ("nchw", "interleaved")


def ghost_batch_norm(mod: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` for one chunk, written so that vmap batches it in any dtype.

    Same arithmetic as ``F.batch_norm``: biased batch variance to normalise, unbiased
    (n/(n-1)) for the running variance, momentum ``None`` = cumulative average. Statistics in
    fp32 for fp16/bf16 activations, else in the activation dtype. Running statistics never enter
    a vmapped ``F.batch_norm`` call (whose batching rule rejects bf16 input with fp32 statistics).
    """
    shape = [1, -1] + [1] * (x.dim() - 2)
    if not (mod.training or mod.running_mean is None):  # eval mode: a per-channel affine map
        scale = torch.rsqrt(mod.running_var + mod.eps)
        if mod.weight is not None:
            scale = scale * mod.weight
        shift = -mod.running_mean * scale
        if mod.bias is not None:
            shift = shift + mod.bias
        xf = at_least_fp32(x)
        return torch.addcmul(shift.to(xf.dtype).reshape(shape), xf, scale.to(xf.dtype).reshape(shape)).to(x.dtype)
    if mod.training and mod.track_running_stats and mod.running_mean is not None:
        with torch.no_grad():  # PyTorch's running-average update from this chunk (the split engine's)
            mod.num_batches_tracked.add_(1)
            chunked.update_running_stats(mod, x, 1)
    y = F.batch_norm(x, None, None, None, None, True, 0.0, mod.eps)  # one fused kernel, fp32 stats inside
    if mod.weight is not None:
        y = torch.addcmul(mod.bias.to(y.dtype).reshape(shape), y, mod.weight.to(y.dtype).reshape(shape))
    return y


def _ghost_forward(mod: _BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    """The replacement forward of one BN module inside the vmapped call (see :func:`chunked.whole_bn_forward`)."""
    return chunked.whole_bn_forward(mod, lambda x: ghost_batch_norm(mod, x),
                                    f"m-sharpness (optimizer.m) cannot run the BatchNorm subclass {type(mod).__name__}: its "
                                    "forward does more than batch normalisation; use plain SAM (optimizer.m=null) for this model")


def ghost_batch_norms(model: nn.Module):
    """Route every BatchNorm of ``model`` through ``ghost_batch_norm`` (instance-level forward)."""
    return chunked.batch_norm_forwards(model, _ghost_forward)


def _chunked(images: torch.Tensor, chunks: int, m: int, layout: str) -> torch.Tensor:
    """[batch, ...] -> [chunks, m, ...] in the physical ``layout`` (one of ``LAYOUTS``; values equal)."""
    x = images.reshape(chunks, m, *images.shape[1:])
    if layout == "interleaved" and images.dim() == 4:
        return x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)
    return x.contiguous()


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


class _VmapPasses:
    """Both passes through ``vmap`` over stacked parameters and BN buffers (any model)."""

    def __init__(self, setup: _Setup, x, y, loss_fn, autocast, chunks, layout):
        model = setup.model
        consts = {n: p.detach() for n, p in setup.fixed}
        consts.update(setup.buffers(setup.other_buffers))

        def chunk_loss(stacked_params, stacked_bufs, xc, yc):
            with autocast(), ghost_batch_norms(model):  # see "Precision" above
                out = functional_call(model, (stacked_params, stacked_bufs, consts), (xc,), strict=False)
                return at_least_fp32(loss_fn(out, yc)), out

        self.batched = vmap(chunk_loss, in_dims=(0, 0, 0, 0), randomness="different")
        self.model, self.chunks, self.consts, self.bn_bufs = model, chunks, consts, setup.buffers(setup.bn_buffers)
        self.names, self.params, self.groups = setup.names, setup.params, setup.groups
        self.x, self.y = _chunked(x, chunks, x.shape[0] // chunks, layout), y.reshape(chunks, -1, *y.shape[1:])

    def clean(self, scaler) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Per-chunk losses [C], logits [batch, ...] and per-chunk gradients [C, ...] at w (None for a
        parameter no chunk's loss used)."""
        leaf = {n: p.detach().unsqueeze(0).expand(self.chunks, *p.shape).contiguous().requires_grad_(True)
                for n, p in zip(self.names, self.params)}
        losses, logits, grads = self._per_chunk_grads(leaf, scaler, update_stats=True)
        return losses, logits.reshape(-1, *logits.shape[2:]), grads

    def ascent(self, eps: list[torch.Tensor], scaler) -> list[torch.Tensor]:
        """Per-chunk gradients [C, ...] of chunk c's loss at w + ε_c (k-step ascent; BN state untouched)."""
        leaf = {n: (p.detach().unsqueeze(0) + e).requires_grad_(True) for n, p, e in zip(self.names, self.params, eps)}
        return _zeros_for_none(self._per_chunk_grads(leaf, scaler, update_stats=False)[2], list(leaf.values()))

    def drop(self, names: set[str]) -> None:
        """Evaluate these parameters as constants from now on (they get no gradient)."""
        self.names, self.params, self.groups, dropped = _without(self.names, self.params, self.groups, names)
        self.consts.update((n, p.detach()) for n, p in dropped)

    def hessian_vector_products(self, u: list[torch.Tensor]) -> list[torch.Tensor]:
        """H_c·u_c for every chunk c ([C, ...] each), H_c the Hessian of chunk c's loss (without the L2
        term) at w: a double backward through the vmapped pass (BN state untouched)."""
        leaf = {n: p.detach().unsqueeze(0).expand(self.chunks, *p.shape).contiguous().requires_grad_(True)
                for n, p in zip(self.names, self.params)}
        leaves = list(leaf.values())  # all used: msam_step drops the parameters no chunk's loss uses
        with torch.enable_grad():
            losses, _ = self.batched(leaf, _stack(self.bn_bufs, self.chunks), self.x, self.y)
            grads = torch.autograd.grad(losses.sum(), leaves, create_graph=True)
            hu = torch.autograd.grad(grads, leaves, grad_outputs=u, allow_unused=True)  # a layer linear in w: H part 0
        return _zeros_for_none(list(hu), leaves)

    def _per_chunk_grads(self, leaf: dict, scaler, update_stats: bool):
        """Losses, logits and per-chunk gradients (None for a parameter no chunk's loss used)."""
        bufs = _stack(self.bn_bufs, self.chunks)
        losses, logits = self.batched(leaf, bufs, self.x, self.y)
        scaled_backward(losses.sum(), scaler)
        if update_stats and self.bn_bufs:
            _write_back(self.bn_bufs, bufs)
        return losses, logits, [leaf[n].grad for n in self.names]

    def perturbed(self, eps: list[torch.Tensor], scaler, update_stats: bool) -> torch.Tensor:
        """Per-chunk losses at w + ε_c; mean_c ∇L_c(w + ε_c) lands in w.grad."""
        shifted = {n: (p.unsqueeze(0) + e).contiguous() for n, p, e in zip(self.names, self.params, eps)}
        bufs = _stack(self.bn_bufs, self.chunks)
        losses, _ = self.batched(shifted, bufs, self.x, self.y)
        scaled_backward(losses.mean(), scaler)
        if update_stats and self.bn_bufs:
            _write_back(self.bn_bufs, bufs)
        return losses


class _SplitPasses:
    """Both passes with full-batch layers, per-chunk kernels only where needed (:mod:`chunked`)."""

    def __init__(self, setup: _Setup, x, y, loss_fn, autocast, chunks):
        """``setup.runner``: what is called on the images, the model itself or its ``torch.compile``
        wrapper (dynamo traces the swapped layer forwards: one graph per pass, reused every step)."""
        self.model, self.runner, self.chunks = setup.model, setup.runner, chunks
        self.names, self.params, self.groups = setup.names, setup.params, setup.groups
        self.x, self.y, self.loss_fn, self.autocast = x, y, loss_fn, autocast
        self.fixed = {n: chunked.Stacked(p.detach().unsqueeze(0).expand(chunks, *p.shape)) for n, p in setup.fixed}

    def _run(self, stacked: dict, update_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast(), chunked.chunked_layers(self.model, self.chunks, {**self.fixed, **stacked}, update_stats):
            logits = self.runner(self.x)
            losses = torch.stack([at_least_fp32(self.loss_fn(o, t)) for o, t in
                                  zip(logits.chunk(self.chunks), self.y.chunk(self.chunks))])
        return losses, logits

    def clean(self, scaler) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """As :meth:`_VmapPasses.clean`."""
        leaf = [p.detach().unsqueeze(0).expand(self.chunks, *p.shape).requires_grad_(True) for p in self.params]
        return self._per_chunk_grads(leaf, scaler, per_chunk=False, update_stats=True)

    def ascent(self, eps: list[torch.Tensor], scaler) -> list[torch.Tensor]:
        """Per-chunk gradients [C, ...] of chunk c's loss at w + ε_c (k-step ascent; BN state untouched)."""
        leaf = [(p.detach().unsqueeze(0) + e).requires_grad_(True) for p, e in zip(self.params, eps)]
        return _zeros_for_none(self._per_chunk_grads(leaf, scaler, per_chunk=True, update_stats=False)[2], leaf)

    def drop(self, names: set[str]) -> None:
        """Evaluate these parameters as constants from now on (they get no gradient)."""
        self.names, self.params, self.groups, dropped = _without(self.names, self.params, self.groups, names)
        self.fixed.update((n, chunked.Stacked(p.detach().unsqueeze(0).expand(self.chunks, *p.shape))) for n, p in dropped)

    def _per_chunk_grads(self, leaf: list[torch.Tensor], scaler, per_chunk: bool, update_stats: bool):
        """Losses, logits and per-chunk gradients (None for a parameter no chunk's loss used)."""
        stacked = {n: chunked.Stacked(t, per_chunk=per_chunk) for n, t in zip(self.names, leaf)}
        losses, logits = self._run(stacked, update_stats)
        scaled_backward(losses.sum(), scaler)
        return losses, logits, [t.grad for t in leaf]

    def perturbed(self, eps: list[torch.Tensor], scaler, update_stats: bool) -> torch.Tensor:
        stacked = {n: chunked.Stacked(p.unsqueeze(0) + e, base=p) for n, p, e in zip(self.names, self.params, eps)}
        losses, _ = self._run(stacked, update_stats)
        scaled_backward(losses.mean(), scaler)
        return losses


def _second_order_final_gradient(passes: _VmapPasses, optimizer: SAM, eps: list, clean_grads: list,
                                 clean_norm: torch.Tensor, rng, update_stats: bool) -> torch.Tensor:
    """App. C.4 per chunk: w.grad = mean_c [g'_c + J_cᵀ g'_c], g'_c = ∇L_c(w + ε_c) + l2·(w + ε_c) and
    J_cᵀ v = ρ·H_c(u_c) + l2·u_c, u_c = (v − ĝ_c ĝ_cᵀ v)/‖g_c‖ (ĝ_c = g_c/‖g_c‖, g_c the clean gradient
    with its L2 term, H_c the Hessian of chunk c's loss at w): :meth:`SAM._add_second_order` for each
    chunk, with the chunk's own ε, gradients and Hessian. Returns the per-chunk losses at w + ε_c."""
    from sam_bench.engine.step import set_true_gradient

    params, groups = passes.params, passes.groups
    leaf = {n: (p.detach().unsqueeze(0) + e).requires_grad_(True) for n, p, e in zip(passes.names, params, eps)}
    losses2, _, grads = passes._per_chunk_grads(leaf, None, update_stats=update_stats)
    def hvp(u: list[torch.Tensor]) -> list[torch.Tensor]:  # at w, the clean pass's draws, shake true gradient
        if rng is not None:
            rng.rewind()
        set_true_gradient(passes.model, True)
        hu = passes.hessian_vector_products(u)
        set_true_gradient(passes.model, False)
        return hu

    with torch.no_grad():
        first = _zeros_for_none(grads, list(leaf.values()))
        _add_l2_terms(first, params, groups, eps)
        terms = second_order_terms(clean_grads, first, groups, clean_norm, hvp)
        if optimizer.diagnostics:  # Fig. 5: cos(first-order, full), of the chunk means
            optimizer.record_second_order_cosine([g.mean(dim=0) for g in first], [t.mean(dim=0) for t in terms])
        for p, g, t in zip(params, first, terms):
            p.grad = (g + t).mean(dim=0)
    return losses2


def _without(names: list[str], params: list[torch.Tensor], groups: list[dict], drop: set[str]) -> tuple[list, list, list, list]:
    """(names, params, groups) without those named in ``drop`` (new lists), and the dropped (name,
    param) pairs."""
    kept = [i for i, n in enumerate(names) if n not in drop]
    return ([names[i] for i in kept], [params[i] for i in kept], [groups[i] for i in kept],
            [(n, p) for n, p in zip(names, params) if n in drop])


@torch.no_grad()
def _add_l2_terms(grads: list[torch.Tensor], params: list[torch.Tensor], groups: list[dict],
                  eps: list[torch.Tensor] | None = None) -> None:
    """g_c += l2·(w + ε_c) in place for stacked gradients [C, ...]: the gradient of the L2 term
    0.5·l2·‖w + ε_c‖² of chunk c's loss, at w (``eps`` None) or at chunk c's perturbed weights."""
    for i, (g, p, grp) in enumerate(zip(grads, params, groups)):
        if grp["l2"]:
            w = p.detach().unsqueeze(0)
            g.add_(w if eps is None else w + eps[i], alpha=grp["l2"])


def _zeros_for_none(grads: list, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, like)]


def _by_l2(a: list, b: list, groups: list[dict]) -> list[tuple[float, tuple[list, list]]]:
    """(l2, (a's items, b's items)) for each nonzero L2 coefficient among the parameters' groups,
    so the L2 terms are added with one fused call per coefficient instead of one per parameter."""
    out: dict[float, tuple[list, list]] = {}
    for x, y, grp in zip(a, b, groups):
        if grp["l2"]:
            xs, ys = out.setdefault(grp["l2"], ([], []))
            xs.append(x)
            ys.append(y)
    return list(out.items())


#: "auto" takes the split engine up to this many chunks per batch, the vmap engine above. The split
#: engine launches a few kernels per chunk for every layer, so its host cost grows with the chunk
#: count, while vmap's does not (one grouped kernel per layer). On 2 CPU cores (ResNet-32, batch 256,
#: fp32, results/benchmarks.md) split is faster up to 16 chunks, even at 64 and slower at 256. The
#: compiled split engine also unrolls every chunk into its graphs (compile time grows with it).
SPLIT_MAX_CHUNKS = 32


def why_auto_takes_vmap(chunks: int | None, compiled: bool, device: str) -> str | None:
    """Why engine "auto" takes vmap for this run (None: it takes split). Measured, H200 bf16,
    torch 2.11 (results/benchmarks.md, eighth session): eager, vmap beat split at every chunk count
    tried (WRN-28-10, 8 chunks: 142.5 against 181.5 ms/step; ResNet-32, 4/16/64 chunks: 105/146/159
    against 132/215/809), the eager split engine being host-bound there (its kernels kept the GPU
    busy about 78 of its 167 ms); compiled, split is the fastest (WRN-28-10: 106.3 ms), while vmap
    runs the eager model. On the CPU split wins up to ``SPLIT_MAX_CHUNKS`` chunks."""
    if chunks is not None and chunks > SPLIT_MAX_CHUNKS:
        return (f"{chunks} chunks per batch is more than the split engine's {SPLIT_MAX_CHUNKS} (its host cost grows "
                "with the chunk count); optimizer.m_engine=split forces it")
    if device == "cuda" and not compiled:
        return ("the model runs eagerly on CUDA, where the vmap engine is faster (the split engine is for "
                "trainer.compile=true); optimizer.m_engine=split forces it")
    return None


def resolve_engine(model: nn.Module, engine: str, chunks: int | None = None, *, compiled: bool | None = None,
                   device: str | None = None, second_order: bool = False) -> str:
    """"split" or "vmap" for ``engine`` ("auto", "split", "vmap") on this model with ``chunks`` chunks
    per batch (None: not known, the chunk count does not decide); ``compiled`` (default: whether
    ``model`` is a ``torch.compile`` wrapper) and ``device`` ("cuda", "cpu"; default: where the
    model's parameters are) decide "auto" as :func:`why_auto_takes_vmap` says. A clear error when
    "split" is asked of a model it cannot run, or with ``second_order``."""
    return "vmap" if why_vmap(model, engine, chunks, compiled=compiled, device=device, second_order=second_order) else "split"


def why_vmap(model: nn.Module, engine: str, chunks: int | None = None, *, compiled: bool | None = None,
             device: str | None = None, second_order: bool = False) -> str | None:
    """Why :func:`resolve_engine` gives vmap (None when it gives split), for the run's log."""
    if engine not in ("auto", "split", "vmap"):
        raise ValueError(f"m-sharpness engine {engine!r} is unknown: use auto, split or vmap")
    if engine == "vmap":
        return "asked for"
    if second_order:  # the split engine's layers are autograd Functions without a double backward
        if engine == "split":
            raise ValueError("optimizer.m_engine=split cannot take the second-order term (its layers have no double "
                             "backward); use optimizer.m_engine=auto or vmap")
        return "the second-order term needs a double backward through the chunks, which only the vmap engine has"
    blocker = chunked.unsupported_layer(getattr(model, "_orig_mod", model))
    if engine == "split" and blocker:
        raise ValueError(f"optimizer.m_engine=split cannot run this model: {blocker}; use optimizer.m_engine=auto or vmap")
    if engine == "split":
        return None
    if blocker:
        return f"the split engine cannot run this model: {blocker}"
    compiled = hasattr(model, "_orig_mod") if compiled is None else compiled
    device = device or next((p.device.type for p in model.parameters()), "cpu")
    return why_auto_takes_vmap(chunks, compiled, device)


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
    engine: str = "auto",
    layout: str = "nchw",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One m-sharpness SAM step (see module docstring). ``bn_modules`` given = BN mode "clean";
    ``engine``: "auto" (the split engine of :mod:`sam_bench.optim.chunked` when the model's layers
    allow it, else vmap: :func:`why_vmap`), "split" or "vmap"; ``layout``: the vmap engine's image
    layout, one of ``LAYOUTS``."""
    from sam_bench.engine.step import set_true_gradient

    if optimizer.second_order and scaler is not None:
        raise ValueError("second_order needs a double backward without loss scaling: use bf16 or fp32, not fp16")
    if layout not in LAYOUTS:
        raise ValueError(f"m-sharpness layout {layout!r} is unknown: use one of {', '.join(LAYOUTS)}")
    passes = _build_passes(model, optimizer, images, labels, loss_fn, autocast, images.shape[0] // m, engine, layout)
    if rng is not None:
        rng.save()
    set_true_gradient(passes.model, True)
    losses, logits, eps, clean_norm, clean_grads = _clean_pass(passes, optimizer, scaler)
    eps = _ascend(passes, optimizer, eps, scaler, rng)
    optimizer.set_perturbation(eps, clean_norm)  # diagnostics report the clean pass's ‖g_c‖
    set_true_gradient(passes.model, False)
    if rng is not None:
        rng.rewind()
    optimizer.zero_grad()
    losses2 = _final_gradient(passes, optimizer, eps, clean_grads, clean_norm, scaler, rng, update_stats=bn_modules is None)
    loss = losses.detach().mean()
    optimizer.record_loss_gap(loss, losses2.detach().mean())
    optimizer.descend(scaler.found_inf if scaler is not None else None)
    optimizer.zero_grad()
    if scaler is not None:
        scaler.update()
    return loss, logits.detach()


def _build_passes(runner: nn.Module, optimizer: SAM, images: torch.Tensor, labels: torch.Tensor, loss_fn, autocast,
                  chunks: int, engine: str, layout: str) -> _VmapPasses | _SplitPasses:
    """This step's passes over ``images`` in ``chunks`` chunks, from the cached :class:`_Setup`."""
    setup = _setup(runner, optimizer, chunks, engine, images.device.type)
    if setup.engine == "split":  # chunked_layers refuses a layer it cannot split (same module walk)
        return _SplitPasses(setup, images, labels, loss_fn, autocast, chunks)
    return _VmapPasses(setup, images, labels, loss_fn, autocast, chunks, layout)


def _clean_pass(passes: _VmapPasses | _SplitPasses, optimizer: SAM, scaler) -> tuple:
    """The clean pass: per-chunk gradients at w (with each chunk's L2 term), and from them each
    chunk's ε. Returns the per-chunk losses, the logits, ε, ‖g_c‖ [C] and (second order only) the
    per-chunk clean gradients. A parameter in no chunk's loss is dropped from the passes: as in
    plain SAM it gets no gradient, so no L2 term, no ε and no step."""
    losses, logits, grads = passes.clean(scaler)
    unused = {n for n, g in zip(passes.names, grads) if g is None}
    if unused:
        passes.drop(unused)
        grads = [g for g in grads if g is not None]
    if scaler is not None:
        scaler.unscale_(grads)
    with torch.no_grad():
        _add_l2_terms(grads, passes.params, passes.groups)  # the L2 term of each chunk's loss
        eps = optimizer.direction(grads, passes.params, passes.groups, passes.chunks)
        clean_norm = optimizer.clean_norm
        optimizer.grad_norm = clean_norm.mean()
        if optimizer.diagnostics:
            optimizer.keep_clean_grad(passes.params, [g.mean(dim=0) for g in grads])
    return losses, logits, eps, clean_norm, grads if optimizer.second_order else None


def _ascend(passes: _VmapPasses | _SplitPasses, optimizer: SAM, eps: list[torch.Tensor], scaler, rng) -> list[torch.Tensor]:
    """k-step ascent (Table 11): k − 1 more passes, in which each chunk's ε moves along its own
    gradient at w + ε_c (with its L2 term there), projected onto the ρ-ball; the clean pass's
    draws, shake layers' true gradient, BN state untouched (as plain SAM). Returns the final ε."""
    for _ in range(optimizer.ascent_steps - 1):
        if rng is not None:
            rng.rewind()
        grads = passes.ascent(eps, scaler)
        if scaler is not None:
            scaler.unscale_(grads)
        with torch.no_grad():
            _add_l2_terms(grads, passes.params, passes.groups, eps)  # L2 term at w + ε_c
            step = optimizer.direction(grads, passes.params, passes.groups, passes.chunks)
            eps = optimizer.project(torch._foreach_add(eps, step), passes.chunks) if eps else eps
        del grads
    return eps


def _final_gradient(passes: _VmapPasses | _SplitPasses, optimizer: SAM, eps: list[torch.Tensor], clean_grads,
                    clean_norm: torch.Tensor, scaler, rng, update_stats: bool) -> torch.Tensor:
    """The perturbed pass: w.grad = mean_c [∇L_c(w + ε_c) + l2·(w + ε_c)] (with each chunk's
    second-order term under ``second_order``); BN statistics move again when ``update_stats`` (BN
    mode "both"). Returns the per-chunk losses at w + ε_c."""
    if optimizer.second_order:
        return _second_order_final_gradient(passes, optimizer, eps, clean_grads, clean_norm, rng, update_stats)
    params, groups = passes.params, passes.groups
    losses = passes.perturbed(eps, scaler, update_stats=update_stats)
    if scaler is not None:
        scaler.unscale_(p.grad for p in params)
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for l2, (ws, es) in _by_l2(params, eps, groups):  # mean_c l2·(w + ε_c)
            final = [w.grad for w in ws]
            torch._foreach_add_(final, ws, alpha=l2)  # one fused kernel (w.grad has w's layout)
            for g, e in zip(final, es):  # ε has the clean gradients' layout (contiguous), maybe not w's
                g.add_(e.mean(dim=0), alpha=l2)
    return losses
