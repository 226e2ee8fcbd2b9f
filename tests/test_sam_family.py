"""The SAM family against independent float64 references: switches, m-sharpness, variants, fp16.

References are written here from the paper / official code with plain tensors and a hand-written
forward (BN with batch statistics), never through the code under test.
"""

import copy
import functools
import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from sam_bench.engine.precision import LossScaler, resolve_precision
import sam_bench.optim.msam as msam
from sam_bench.engine.step import RngReplay, train_step
from sam_bench.errors import ConfigError
from sam_bench.optim import SAM, batchnorm_modules, build_optimizer, set_bn_eval
from sam_bench.schema import DatasetConfig, OptimizerConfig, TrainerConfig
from sam_reference import EPS_BN, LR, MOMENTUM, RHO, WD, batch, ref_grad, ref_loss, tiny_model, weights

BN_MOM = 0.1
NO_AMP = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
NAMES = ["0.weight", "1.weight", "1.bias", "5.weight", "5.bias"]


@pytest.fixture(params=["split", "vmap"])
def engine(request, monkeypatch):
    """Run an m-sharpness test through each engine of sam_bench.optim.msam: this module's
    ``train_step`` (as every helper here calls it) takes that engine unless a call names one."""
    monkeypatch.setattr(sys.modules[__name__], "train_step", functools.partial(train_step, m_engine=request.param))
    return request.param


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ---- reference ------------------------------------------------------------------------------

def norm(ts):
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


def nesterov(w, v, g, clip):
    if clip is not None:
        c = min(1.0, clip / norm(g))
        g = [t * c for t in g]
    for i in range(len(w)):
        v[i] = MOMENTUM * v[i] + g[i]
        w[i] = w[i] - LR * (g[i] + MOMENTUM * v[i])


def ref_eps(g, w, variant, rng=None):
    if variant == "sam":
        n = norm(g)
        return [RHO * t / n for t in g]
    if variant == "asam":  # SamsungLabs/ASAM: T = |w| + η on "*weight*" (indices 0, 1, 3)
        eta, rho = 0.01, 0.5
        t = [(a.abs() + eta) if i in (0, 1, 3) else torch.ones_like(a) for i, a in enumerate(w)]
        n = norm([ti * gi for ti, gi in zip(t, g)])
        return [rho * ti * ti * gi / n for ti, gi in zip(t, g)]
    if variant == "inf":
        return [RHO * torch.sign(t) for t in g]
    if variant == "random":
        z = [torch.randn((1,) + t.shape, generator=rng)[0] for t in g]
        n = norm(z)
        return [RHO * t / n for t in z]
    raise ValueError(variant)


def ref_steps(w, steps, variant="sam", clip=5.0, k=1, second_order=False, m=None, n=8):
    w = [t.detach().clone() for t in w]
    v = [torch.zeros_like(t) for t in w]
    rng = torch.Generator().manual_seed(0)
    for s in range(steps):
        x, y = batch(s, n)
        chunks = [(x, y)] if m is None else [(x[i:i + m], y[i:i + m]) for i in range(0, n, m)]
        total = [torch.zeros_like(t) for t in w]
        for xc, yc in chunks:
            if second_order:
                wr = [t.detach().requires_grad_(True) for t in w]
                full = lambda u: ref_loss(u, xc, yc) + 0.5 * WD * sum((t * t).sum() for t in u)  # noqa: E731
                g = torch.autograd.grad(full(wr), wr, create_graph=True)
                gn = torch.sqrt(sum((t * t).sum() for t in g))
                g = torch.autograd.grad(full([a + RHO * b / gn for a, b in zip(wr, g)]), wr)
            else:
                eps = ref_eps(ref_grad(w, xc, yc), w, variant, rng)
                for _ in range(k - 1):  # projected ascent (Table 11), step ρ·direction
                    d = ref_eps(ref_grad([a + e for a, e in zip(w, eps)], xc, yc), w, variant, rng)
                    eps = [e + di for e, di in zip(eps, d)]
                    if variant == "inf":
                        eps = [e.clamp(-RHO, RHO) for e in eps]
                    else:
                        c = min(1.0, RHO / norm(eps))
                        eps = [e * c for e in eps]
                g = ref_grad([a + e for a, e in zip(w, eps)], xc, yc)
            total = [a + b.detach() / len(chunks) for a, b in zip(total, g)]
        nesterov(w, v, total, clip)
    return w


def make_sam(model, **kw):
    base = dict(rho=RHO, weight_decay=WD, grad_clip=5.0, lr=LR, momentum=MOMENTUM, nesterov=True)
    base.update(kw)
    return SAM(model.parameters(), torch.optim.SGD, **base)


def run(model, opt, steps, m=None, n=8, bn="clean", rng=None):
    bn_mods = batchnorm_modules(model)
    if bn == "frozen":
        set_bn_eval(bn_mods)
    for s in range(steps):
        x, y = batch(s, n)
        train_step(model, opt, x, y, F.cross_entropy, NO_AMP, bn_mods if bn == "clean" else None, rng, m=m)


def assert_weights(model, expected, atol=1e-10):
    for got, want in zip(weights(model), expected):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=atol)


# ---- 1. switches ----------------------------------------------------------------------------

def bn_stats_reference(model, x, passes):
    """Running stats after the given passes (each: the conv output's batch mean/var at weights)."""
    rm, rv = model[1].running_mean.clone(), model[1].running_var.clone()
    for conv_w in passes:
        h = F.conv2d(x, conv_w, padding=1)
        rm = (1 - BN_MOM) * rm + BN_MOM * h.mean(dim=(0, 2, 3))
        rv = (1 - BN_MOM) * rv + BN_MOM * h.var(dim=(0, 2, 3), unbiased=True)
    return rm, rv


@pytest.mark.parametrize("mode", ["clean", "both", "frozen"])
def test_bn_modes(mode):
    model = tiny_model()
    x, y = batch(0)
    w0 = [t.detach().clone() for t in weights(model)]
    g = ref_grad(w0, x, y)
    eps = ref_eps(g, w0, "sam")
    passes = {"clean": [w0[0]], "both": [w0[0], w0[0] + eps[0]], "frozen": []}[mode]
    rm, rv = bn_stats_reference(model, x, passes)
    opt = make_sam(model)
    run(model, opt, 1, bn=mode)
    torch.testing.assert_close(model[1].running_mean, rm, rtol=0, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, rv, rtol=0, atol=1e-12)
    assert int(model[1].num_batches_tracked) == len(passes)


def test_bn_frozen_uses_running_statistics_in_both_passes():
    """Frozen BN = eval-mode BN: the weights follow a reference whose BN uses running stats."""
    model = tiny_model()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    rm, rv = model[1].running_mean.clone(), model[1].running_var.clone()

    def loss(w, x, y):
        h = F.conv2d(x, w[0], padding=1)
        h = (h - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) + EPS_BN) * w[1].view(1, -1, 1, 1) + w[2].view(1, -1, 1, 1)
        return F.cross_entropy(torch.relu(h).mean(dim=(2, 3)) @ w[3].T + w[4], y)

    def grad(w, x, y):
        w = [t.detach().requires_grad_(True) for t in w]
        return list(torch.autograd.grad(loss(w, x, y) + 0.5 * WD * sum((t * t).sum() for t in w), w))

    w = [t.detach().clone() for t in weights(model)]
    v = [torch.zeros_like(t) for t in w]
    for s in range(2):
        x, y = batch(s)
        eps = ref_eps(grad(w, x, y), w, "sam")
        nesterov(w, v, grad([a + e for a, e in zip(w, eps)], x, y), 5.0)
    run(model, make_sam(model), 2, bn="frozen")
    assert_weights(model, w)


class DropNet(nn.Module):
    """Linear -> Dropout -> Linear; records each forward's dropout mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.drop = nn.Linear(6, 16), nn.Linear(16, 3), nn.Dropout(0.5)
        self.masks = []

    def forward(self, x):
        h = torch.relu(self.a(x))
        keep = self.drop(torch.ones_like(h))  # the dropout draw itself (0 or 1/(1-p))
        self.masks.append(keep != 0)
        return self.b(h * keep)


@pytest.mark.parametrize("replay", [True, False])
def test_rng_replay_same_masks_when_on_different_when_off(replay):
    model = DropNet().double()
    opt = make_sam(model)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    rng = RngReplay(torch.device("cpu")) if replay else None
    train_step(model, opt, x, y, F.cross_entropy, NO_AMP, None, rng)
    clean, perturbed = model.masks
    assert torch.equal(clean, perturbed) == replay


@pytest.mark.parametrize("m", [None, 4])
@pytest.mark.parametrize("replay", [True, False])
def test_rng_replay_seen_through_the_loss_gap(replay, m, engine):
    """With a tiny ρ, L(w+ε) − L(w) is ~0 exactly when both passes draw the same dropout masks
    (covers the batched m-sharpness path, whose vmapped draws cannot be recorded directly)."""
    model = DropNet().double()
    opt = make_sam(model, rho=1e-9, diagnostics=True)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    rng = RngReplay(torch.device("cpu")) if replay else None
    train_step(model, opt, x, y, F.cross_entropy, NO_AMP, None, rng, m=m)
    gap = abs(opt.read_diagnostics()["sam/loss_gap"])
    assert (gap < 1e-7) if replay else (gap > 1e-3)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_k_step_split_engine_under_torch_compile_matches_loop_reference_without_recompiling(backend):
    """trainer.compile with k = 2 and m-sharpness: the ascent pass (per-chunk weights and weight
    gradients) is a third graph, compiled once; float64 steps equal the loop reference."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, batches, _, _ = rich_net_case("clean", seed=8)
    ref = generic_loop_reference(model, batches, 4, "clean", k=2)
    opt = SAM([p for p in model.parameters() if p.requires_grad], torch.optim.SGD, rho=RHO, weight_decay=WD,
              grad_clip=5.0, lr=LR, momentum=MOMENTUM, nesterov=True, ascent_steps=2)
    compiled = torch.compile(model, backend=backend)
    graphs, breaks = [], sum(counters["graph_break"].values())
    start = counters["stats"]["unique_graphs"]
    for x, y in batches:
        train_step(compiled, opt, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), m=4, m_engine="split")
        graphs.append(counters["stats"]["unique_graphs"] - start)
    assert graphs == [3, 3, 3], graphs  # clean, ascent and perturbed pass, compiled once
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    torch._dynamo.reset()


@pytest.mark.parametrize("m", [None, 4])
@pytest.mark.parametrize("replay", [True, False])
def test_rng_replay_under_inductor(replay, m):
    """trainer.compile: inductor draws dropout masks from its own seeds, taken from the generator
    that RngReplay rewinds, so the compiled perturbed pass (plain SAM, and split m-SAM) sees the
    clean pass's masks: loss gap ~0 with a tiny ρ only when replayed."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    opt = make_sam(model, rho=1e-9, diagnostics=True)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    rng = RngReplay(torch.device("cpu")) if replay else None
    compiled = torch.compile(model, backend="inductor")
    for _ in range(2):
        train_step(compiled, opt, x, y, F.cross_entropy, NO_AMP, None, rng, m=m, m_engine="split")
    torch._dynamo.reset()
    gap = abs(opt.read_diagnostics()["sam/loss_gap"])
    assert (gap < 1e-7) if replay else (gap > 1e-3)


@pytest.mark.parametrize("arch", ["shake_shake_mini", "pyramidnet_shakedrop_mini"])
def test_shake_models_replay_their_draws_in_m_sharpness(arch, engine):
    """The real Shake-Shake/ShakeDrop layers under m-sharpness: with a tiny ρ the perturbed pass
    sees the clean pass's shake draws (loss gap ~0) only when the RNG is replayed."""
    from sam_bench.models import build_model

    gaps = {}
    for replay in (True, False):
        torch.manual_seed(0)
        model = build_model(arch, 10, 3).double()
        opt = make_sam(model, rho=1e-9, diagnostics=True)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        rng = RngReplay(torch.device("cpu")) if replay else None
        train_step(model, opt, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), rng, m=4)
        gaps[replay] = abs(opt.read_diagnostics()["sam/loss_gap"])
    assert gaps[True] < 1e-7 and gaps[False] > 1e-4, gaps


def test_shakedrop_model_replays_its_draws_in_compiled_m_sharpness():
    """trainer.compile with m-sharpness on a ShakeDrop model: the split engine's two compiled graphs
    (true gradient on, then off) see the same shake draws when replayed; no graph break."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from sam_bench.models import build_model

    gaps = {}
    for replay in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model("pyramidnet_shakedrop_mini", 10, 3).double()
        opt = make_sam(model, rho=1e-9, diagnostics=True)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        rng = RngReplay(torch.device("cpu")) if replay else None
        compiled, start, breaks = torch.compile(model, backend="aot_eager"), counters["stats"]["unique_graphs"], \
            sum(counters["graph_break"].values())
        for _ in range(2):
            train_step(compiled, opt, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), rng, m=4, m_engine="split")
        assert counters["stats"]["unique_graphs"] - start == 2 and sum(counters["graph_break"].values()) == breaks
        gaps[replay] = abs(opt.read_diagnostics()["sam/loss_gap"])
    torch._dynamo.reset()
    assert gaps[True] < 1e-7 and gaps[False] > 1e-4, gaps

class ShakeLike(nn.Module):
    """Records the true_gradient flag it sees in each forward (the contract of HELPERS.md)."""

    stochastic = True

    def __init__(self):
        super().__init__()
        self.true_gradient = False
        self.seen = []

    def forward(self, x):
        self.seen.append(self.true_gradient)
        return x


@pytest.mark.parametrize("k", [1, 3])
def test_true_gradient_on_for_ascent_passes_only(k):
    shake = ShakeLike()
    model = nn.Sequential(nn.Linear(4, 3), shake).double()
    opt = make_sam(model, ascent_steps=k)
    train_step(model, opt, torch.randn(8, 4), torch.randint(0, 3, (8,)), F.cross_entropy, NO_AMP)
    assert shake.seen == [True] * k + [False]
    assert shake.true_gradient is False


@pytest.mark.parametrize("k", [1, 3])
def test_true_gradient_in_m_sharpness_path(k, engine):
    shake = ShakeLike()
    model = nn.Sequential(nn.Linear(4, 3), shake).double()
    train_step(model, make_sam(model, ascent_steps=k), torch.randn(8, 4), torch.randint(0, 3, (8,)), F.cross_entropy,
               NO_AMP, m=4)
    assert shake.seen == [True] * k + [False]


class RngProbe(nn.Module):
    """Dropout that records the CPU generator's state before its draw (works inside vmap too)."""

    stochastic = True

    def __init__(self):
        super().__init__()
        self.states = []

    def forward(self, x):
        self.states.append(torch.get_rng_state())
        return F.dropout(x, 0.5, self.training)


@pytest.mark.parametrize("replay", [True, False])
def test_k_step_m_sharpness_passes_replay_the_clean_pass_draws(replay, engine):
    """k = 3 with m-sharpness: both ascent passes and the perturbed pass start from the generator
    state of the clean pass when replayed (fresh draws when not)."""
    probe = RngProbe()
    model = nn.Sequential(nn.Linear(4, 6), probe, nn.Linear(6, 3)).double()
    rng = RngReplay(torch.device("cpu")) if replay else None
    train_step(model, make_sam(model, ascent_steps=3), torch.randn(8, 4), torch.randint(0, 3, (8,)), F.cross_entropy,
               NO_AMP, None, rng, m=4)
    assert len(probe.states) == 4
    same = [torch.equal(st, probe.states[0]) for st in probe.states[1:]]
    assert same == ([True] * 3 if replay else [False] * 3)


# ---- 2. m-sharpness -------------------------------------------------------------------------

def loop_over_chunks_reference(model, steps, m, n, bn_mode, wd=None):
    """Per-chunk copies of the model (one "device" each) with ordinary autograd, then the average:
    the official pmap semantics (pmean of gradients and of the BN state). ``wd``: one L2
    coefficient per parameter (default WD for all)."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    wd = wd or [WD] * len(params)
    v = [torch.zeros_like(p) for p in params]
    for s in range(steps):
        x, y = batch(s, n)
        total = [torch.zeros_like(p) for p in params]
        stats = []
        for i in range(0, n, m):
            dev = copy.deepcopy(model)
            dp = list(dev.parameters())
            F.cross_entropy(dev(x[i:i + m]), y[i:i + m]).backward()
            g = [p.grad + l2 * p.detach() for p, l2 in zip(dp, wd)]
            gn = norm(g)
            clean_stats = [b.clone() for b in dev[1].buffers()]
            with torch.no_grad():
                for p, gi in zip(dp, g):
                    p.add_(RHO * gi / gn)
                    p.grad = None
            F.cross_entropy(dev(x[i:i + m]), y[i:i + m]).backward()
            total = [t + (p.grad + l2 * p.detach()) * m / n for t, p, l2 in zip(total, dp, wd)]
            both_stats = [b.clone() for b in dev[1].buffers()]
            stats.append(clean_stats if bn_mode == "clean" else both_stats)
        with torch.no_grad():
            for j, b in enumerate(model[1].buffers()):
                vals = torch.stack([st[j].to(torch.float64) for st in stats])
                b.copy_(vals[0] if b.dtype == torch.long else vals.mean(0))
        g = total
        c = min(1.0, 5.0 / norm(g))
        with torch.no_grad():
            for i, p in enumerate(params):
                v[i] = MOMENTUM * v[i] + g[i] * c
                p.sub_(LR * (g[i] * c + MOMENTUM * v[i]))
    return model


@pytest.mark.parametrize("m,bn_mode", [(2, "clean"), (4, "clean"), (4, "both")])
def test_m_sharpness_matches_loop_over_chunks(m, bn_mode, engine):
    model = tiny_model()
    ref = loop_over_chunks_reference(model, steps=3, m=m, n=8, bn_mode=bn_mode)
    run(model, make_sam(model), 3, m=m, bn=bn_mode)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    # the hand-written reference agrees on the weights too (no BN-state dependence in weights)
    assert_weights(model, ref_steps(weights(tiny_model()), 3, m=m))


def test_m_sharpness_with_a_weight_decay_per_param_group(engine):
    """Param groups with different L2 coefficients (one of them 0, as for BN parameters): each
    chunk's ascent gradient and the final gradient carry each parameter's own L2 term."""
    model = tiny_model()
    wd_of = {"0.weight": WD, "1.weight": 0.0, "1.bias": 0.0, "5.weight": WD, "5.bias": 3 * WD}
    ref = loop_over_chunks_reference(model, steps=3, m=2, n=8, bn_mode="clean", wd=list(wd_of.values()))
    named = dict(model.named_parameters())
    groups = [{"params": [named[k] for k, v in wd_of.items() if v == wd], "weight_decay": wd} for wd in (WD, 0.0, 3 * WD)]
    opt = SAM(groups, torch.optim.SGD, rho=RHO, grad_clip=5.0, lr=LR, momentum=MOMENTUM, nesterov=True)
    run(model, opt, 3, m=2)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    uniform = loop_over_chunks_reference(tiny_model(), steps=3, m=2, n=8, bn_mode="clean")
    assert not torch.allclose(uniform[5].bias, ref[5].bias, rtol=0, atol=1e-9)  # the coefficients matter


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_ghost_batch_norm_equals_torch_batch_norm(momentum, affine, training):
    """The BN that runs inside the vmapped m-sharpness pass is F.batch_norm's arithmetic: output,
    input/parameter gradients, running statistics and the batch counter (fp64, two calls)."""
    from sam_bench.optim.msam import ghost_batch_norm

    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3, momentum=momentum, affine=affine).double().train(training)
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
        if affine:
            ref.weight.uniform_(0.5, 2)
            ref.bias.uniform_(-1, 1)
    ours = copy.deepcopy(ref)
    for i in range(2):
        x = torch.randn(5, 3, 4, 4) * 3 + i
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ref(xa), ghost_batch_norm(ours, xb)
        torch.testing.assert_close(yb, ya, rtol=0, atol=1e-12)
        w = torch.randn_like(ya)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=1e-12)
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)
    if affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=0, atol=1e-12)


def test_ghost_batch_norm_keeps_fp32_statistics_for_bf16_activations():
    """bf16 in, bf16 out; statistics in fp32 so the running stats stay fp32-accurate."""
    from sam_bench.optim.msam import ghost_batch_norm

    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4).float()
    ours = copy.deepcopy(ref)
    x = (torch.randn(8, 4, 5, 5) * 2 + 1).bfloat16()
    y = ghost_batch_norm(ours, x)
    expected = ref(x.float())
    assert y.dtype == torch.bfloat16 and ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=2e-2)  # one bf16 rounding of the output
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-6, atol=1e-7)


def test_m_sharpness_runs_under_bf16_autocast_and_stays_close_to_fp32(engine):
    """The batched pass runs under the trainer's autocast (bf16 here on CPU) and lands near the
    fp32 step; BN running statistics stay fp32."""
    torch.set_default_dtype(torch.float32)
    base = tiny_model().float()
    x, y = batch(0, 8)
    x = x.float()
    results = []
    for amp in (lambda: torch.autocast("cpu", enabled=False), lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        model = copy.deepcopy(base)
        loss, logits = train_step(model, make_sam(model), x, y, F.cross_entropy, amp, batchnorm_modules(model), None,
                                  m=4)
        assert torch.isfinite(loss) and logits.shape == (8, 5)
        assert model[1].running_mean.dtype == torch.float32
        results.append(model)
    fp32, bf16 = results
    for (name, a), b in zip(fp32.state_dict().items(), bf16.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2, msg=name)
    assert not torch.equal(fp32[5].weight, bf16[5].weight)  # the linear layer really ran in bf16


def test_m_sharpness_differs_from_plain_sam(engine):
    a, b = tiny_model(), tiny_model()
    run(a, make_sam(a), 2, m=2)
    run(b, make_sam(b), 2)
    assert max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters())) > 1e-6


def test_m_sharpness_whole_batch_equals_plain_sam(engine):
    """The m-sharpness step with one chunk (called directly) equals the plain two-pass step."""
    from sam_bench.optim.msam import msam_step

    a, b = tiny_model(), tiny_model()
    opt_a, opt_b = make_sam(a), make_sam(b)
    for s in range(3):
        x, y = batch(s)
        msam_step(a, opt_a, x, y, F.cross_entropy, NO_AMP, 8, batchnorm_modules(a), None, None, engine)
        train_step(b, opt_b, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(b))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # as_strided_ (pooling) has no batching rule
def test_vmap_engine_interleaved_layout_gives_the_nchw_step():
    """The vmap engine's image layouts (msam_step's ``layout``) differ in memory order only: the same
    weights and BN state after two steps; an unknown layout is refused."""
    from sam_bench.optim.msam import msam_step

    models = [tiny_model(), tiny_model()]
    opts = [make_sam(mdl) for mdl in models]
    for s in range(2):
        x, y = batch(s)
        for mdl, opt, layout in zip(models, opts, ("nchw", "interleaved")):
            msam_step(mdl, opt, x, y, F.cross_entropy, NO_AMP, 2, batchnorm_modules(mdl), None, None, "vmap", layout)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="layout 'nhwc' is unknown"):
        train_step(models[0], opts[0], x, y, F.cross_entropy, NO_AMP, None, m=2, m_engine="vmap", m_layout="nhwc")


def test_m_sharpness_setup_is_reused_and_rebuilt_when_the_model_or_groups_change(engine, monkeypatch):
    """What a step takes from the model and the optimizer's groups is cached (msam._Setup): steps
    that reuse it equal steps that rebuild it every time, bit for bit, through a parameter frozen
    and unfrozen, BN switched to eval, the optimizer reloaded (new group dicts) and model.float()
    (every parameter's and buffer's storage swapped, the key unchanged); rebuilt on those changes
    only."""
    real = msam._new_setup
    builds = []
    monkeypatch.setattr(msam, "_new_setup", lambda *a, **k: builds.append(1) or real(*a, **k))
    changes = [
        lambda model, opt: None,
        lambda model, opt: None,  # nothing changed: reused
        lambda model, opt: model[0].weight.requires_grad_(False),
        lambda model, opt: model[0].weight.requires_grad_(True),
        lambda model, opt: set_bn_eval(batchnorm_modules(model)),
        lambda model, opt: opt.load_state_dict(copy.deepcopy(opt.state_dict())),
        lambda model, opt: model.float(),  # storage swapped under the same key: read at each step
    ]
    states, counts = [], []
    for rebuild_every_step in (False, True):
        builds.clear()
        model = tiny_model()
        opt = make_sam(model)
        for s, change in enumerate(changes):
            change(model, opt)
            if rebuild_every_step:
                msam._SETUPS.clear()
            x, y = batch(s)
            train_step(model, opt, x.to(model[0].weight.dtype), y, F.cross_entropy, NO_AMP, batchnorm_modules(model), m=4)
        states.append(model.state_dict())
        counts.append(len(builds))
    assert counts == [5, len(changes)]
    assert states[0]["0.weight"].dtype == torch.float32
    for (name, a), b in zip(states[0].items(), states[1].values()):
        assert torch.equal(a, b), name


class RichNet(nn.Module):
    """Every layer configuration the split engine evaluates per chunk: strided conv with a bias,
    dilated grouped conv, BN with momentum None, BN without affine, BN1d, Linear with and without
    bias, and a frozen parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(4, momentum=None)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(6, affine=False)
        self.fc1 = nn.Linear(6, 7)
        self.bn3 = nn.BatchNorm1d(7)
        self.fc2 = nn.Linear(7, 5, bias=False)
        self.conv1.bias.requires_grad_(False)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h))).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.bn3(self.fc1(h))))


def generic_loop_reference(model, batches, m, bn_mode, k=1, rho=RHO):
    """Any model: one deep copy per chunk ("device") with plain autograd, SAM on the chunk (k
    projected ascent steps, BN state left alone by the extra ones), then the mean of the chunk
    gradients and of the BN state (official pmap semantics), Nesterov SGD. ``rho=0``: the official
    SGD baseline on those devices (each normalises BN over its own chunk)."""
    model = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    v = {n: 0.0 for n in names}
    for x, y in batches:
        total, states = {n: 0.0 for n in names}, []
        for xc, yc in zip(x.split(m), y.split(m)):
            dev = copy.deepcopy(model)
            dp = dict(dev.named_parameters())
            g = torch.autograd.grad(F.cross_entropy(dev(xc), yc), [dp[n] for n in names])
            g = [a + WD * dp[n].detach() for a, n in zip(g, names)]
            eps = [rho * a / norm(g) for a in g]
            clean = {key: b.clone() for key, b in dev.named_buffers()}
            w0 = [dp[n].detach().clone() for n in names]
            for _ in range(k - 1):  # an ascent pass at w + ε on a copy whose BN state is thrown away
                shifted = copy.deepcopy(dev)
                sp = dict(shifted.named_parameters())
                with torch.no_grad():
                    for n, a, e in zip(names, w0, eps):
                        sp[n].copy_(a + e)
                ga = torch.autograd.grad(F.cross_entropy(shifted(xc), yc), [sp[n] for n in names])
                ga = [a + WD * sp[n].detach() for a, n in zip(ga, names)]
                eps = [e + rho * a / norm(ga) for e, a in zip(eps, ga)]
                eps = [e * min(1.0, rho / norm(eps)) for e in eps]
            with torch.no_grad():
                for n, e in zip(names, eps):
                    dp[n].add_(e)
            g2 = torch.autograd.grad(F.cross_entropy(dev(xc), yc), [dp[n] for n in names])
            for a, n in zip(g2, names):
                total[n] = total[n] + (a + WD * dp[n].detach()) * m / x.shape[0]
            states.append(clean if bn_mode == "clean" else dict(dev.named_buffers()))
        with torch.no_grad():
            for key, b in model.named_buffers():
                b.copy_(states[0][key] if b.dtype == torch.long else torch.stack([st[key] for st in states]).mean(0))
            c = min(1.0, 5.0 / norm(list(total.values())))
            params = dict(model.named_parameters())
            for n in names:
                v[n] = MOMENTUM * v[n] + total[n] * c
                params[n].sub_(LR * (total[n] * c + MOMENTUM * v[n]))
    return model


def rich_net_case(bn_mode: str, seed: int):
    """RichNet in BN mode ``bn_mode``, 3 batches of 12, the loop reference after them, a fresh SAM."""
    model = RichNet().double()
    if bn_mode == "frozen":  # BN in eval mode in both passes: running statistics, per-chunk affine
        with torch.no_grad():
            for bn in batchnorm_modules(model):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
        set_bn_eval(batchnorm_modules(model))
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 5, (12,), generator=g)) for _ in range(3)]
    ref = generic_loop_reference(model, batches, 4, bn_mode)
    opt = SAM([p for p in model.parameters() if p.requires_grad], torch.optim.SGD, rho=RHO, weight_decay=WD,
              grad_clip=5.0, lr=LR, momentum=MOMENTUM, nesterov=True)
    return model, batches, ref, opt


@pytest.mark.parametrize("bn_mode", ["clean", "both", "frozen"])
def test_m_sharpness_matches_loop_reference_on_every_layer_kind(bn_mode, engine):
    model, batches, ref, opt = rich_net_case(bn_mode, seed=7)
    bn_mods = batchnorm_modules(model)
    for x, y in batches:
        train_step(model, opt, x, y, F.cross_entropy, NO_AMP, bn_mods if bn_mode == "clean" else None, m=4)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    assert not torch.equal(model.fc2.weight, RichNet().double().fc2.weight)  # it trained


@pytest.mark.parametrize("bn_mode", ["clean", "frozen"])
def test_sgd_with_m_normalises_batch_norm_per_chunk_as_the_official_devices(bn_mode):
    """optimizer.m with SGD (ρ = 0, one pass): each chunk of m examples is a simulated device that
    normalises BN over its own examples, as m-SAM's chunks and the official code's SGD baseline do
    (BN batch = per-device batch, recipes.md §2); equal to the loop over per-chunk model copies with
    ρ = 0, and to SAM's limit ρ -> 0 with the same m. Before, SGD ignored m (BN over the whole batch)."""
    model, batches, _, _ = rich_net_case(bn_mode, seed=9)
    ref = generic_loop_reference(model, batches, 4, "clean", rho=0.0)
    near_zero = copy.deepcopy(model)
    sgd = SAM([p for p in model.parameters() if p.requires_grad], torch.optim.SGD, rho=0.0, weight_decay=WD,
              grad_clip=5.0, lr=LR, momentum=MOMENTUM, nesterov=True)
    assert not sgd.two_pass
    for x, y in batches:
        train_step(model, sgd, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), m=4)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    tiny_rho = SAM([p for p in near_zero.parameters() if p.requires_grad], torch.optim.SGD, rho=1e-12, weight_decay=WD,
                   grad_clip=5.0, lr=LR, momentum=MOMENTUM, nesterov=True)
    for x, y in batches:
        train_step(near_zero, tiny_rho, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(near_zero), m=4)
    for (name, a), b in zip(model.state_dict().items(), near_zero.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)  # the ρ -> 0 limit of m-SAM is this SGD
    assert all(bn.forward.__func__ is type(bn).forward for bn in batchnorm_modules(model))  # forwards put back


def test_sgd_with_m_under_torch_compile_matches_the_loop_reference():
    """The compiled model: ghost BN as one vectorised expression, same numbers, one graph reused."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, batches, _, _ = rich_net_case("clean", seed=10)
    ref = generic_loop_reference(model, batches, 4, "clean", rho=0.0)
    sgd = SAM([p for p in model.parameters() if p.requires_grad], torch.optim.SGD, rho=0.0, weight_decay=WD,
              grad_clip=5.0, lr=LR, momentum=MOMENTUM, nesterov=True)
    compiled = torch.compile(model, backend="aot_eager")
    start = counters["stats"]["unique_graphs"]
    for x, y in batches:
        train_step(compiled, sgd, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), m=4)
    assert counters["stats"]["unique_graphs"] - start == 1
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    torch._dynamo.reset()


def test_sgd_with_m_refuses_a_batch_norm_subclass_it_cannot_split():
    from sam_bench.optim.chunked import ghost_batch_norm_unsupported

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4), nn.Flatten())
    assert "BatchNormAct" in ghost_batch_norm_unsupported(model) and "optimizer.m=null" in ghost_batch_norm_unsupported(model)
    sgd = make_sam(model, rho=0.0)
    x, y = batch(0, 8)
    with pytest.raises(ValueError, match="BatchNormAct"):
        train_step(model, sgd, x, y, lambda out, t: out.sum(), NO_AMP, batchnorm_modules(model), m=4)
    assert ghost_batch_norm_unsupported(tiny_model()) is None


@pytest.mark.parametrize("m", [3, 5, 16, 0])
@pytest.mark.parametrize("rho", [0.0, RHO])
def test_an_m_that_does_not_divide_the_batch_is_refused(m, rho):
    """train_step itself (the config checks trainer.batch_size): before, m = 3 of 8 ran as m = 4 and
    m = 5 as plain SAM, silently; m = 16 crashed in a reshape."""
    model = tiny_model()
    opt = make_sam(model, rho=rho)
    x, y = batch(0, 8)
    with pytest.raises(ValueError, match=rf"m={m} must be >= 1 and divide the batch of 8"):
        train_step(model, opt, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), m=m)


def test_m_sharpness_with_timm_batch_norm_act_matches_loop_reference():
    """timm's BatchNormAct2d (BN, then drop and act in one module, as in timm's EfficientNets): the
    split engine does not take it, the vmap engine keeps its activation."""
    from timm.layers import BatchNormAct2d

    from sam_bench.optim import chunked

    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4, act_layer=nn.ReLU),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).double()
    assert not chunked.supports(model)
    batches = [batch(s, 8) for s in range(2)]
    ref = generic_loop_reference(model, batches, 4, "clean")
    opt = make_sam(model)
    for x, y in batches:
        train_step(model, opt, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), m=4)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_engines_agree_on_every_deterministic_mini_model():
    """Split and vmap, two independent implementations, give the same m-sharpness step on every
    sam-bench architecture without random layers (the shake models: the replay test above)."""
    from sam_bench.engine.step import uses_randomness
    from sam_bench.models import build_model, sam_bench_models

    checked = []
    for arch in [a for a in sam_bench_models() if a.endswith("_mini")]:
        torch.manual_seed(0)
        base = build_model(arch, 10, 3).double()
        if uses_randomness(base):
            continue
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        states = []
        for engine in ("split", "vmap"):
            model = copy.deepcopy(base)
            train_step(model, make_sam(model), x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), m=4, m_engine=engine)
            states.append(model.state_dict())
        for name, a in states[0].items():
            torch.testing.assert_close(a, states[1][name], rtol=0, atol=1e-12, msg=f"{arch} {name}")
        checked.append(arch)
    assert len(checked) >= 5, checked


class BatchNormAct(nn.BatchNorm2d):
    """A BN subclass that does more than normalise (like timm's BatchNormAct2d)."""

    def forward(self, x):
        return torch.relu(super().forward(x)) - 0.5


def test_engine_choice_and_unsupported_layers():
    """"auto" runs the split engine on the paper's architectures and falls back to vmap for a layer
    it cannot split; vmap refuses a BN subclass it would silently change."""
    from sam_bench.models import build_model, sam_bench_models
    from sam_bench.optim import chunked

    for arch in sam_bench_models():  # every CIFAR architecture of the paper
        with torch.device("meta"):  # the layers are what counts, not their values (full size on the CPU: ~15 s)
            model = build_model(arch, 10, 3)
        assert chunked.supports(model), arch
    assert not chunked.supports(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)))
    assert not chunked.supports(nn.Sequential(nn.Conv2d(3, 4, 3, padding="same")))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5)).double()
    assert not chunked.supports(model)
    before = copy.deepcopy(model.state_dict())
    x, y = batch(0)
    with pytest.raises(ValueError, match="BatchNormAct"):
        train_step(model, make_sam(model), x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), m=4)
    with pytest.raises(ValueError, match=r"optimizer.m_engine=split cannot run this model: 1 \(BatchNormAct\)"):
        train_step(model, make_sam(model), x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), m=4, m_engine="split")
    with pytest.raises(ValueError, match="engine 'fast' is unknown"):
        train_step(model, make_sam(model), x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), m=4, m_engine="fast")
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), before.values()))  # refused untouched


def test_m_engine_is_a_config_key_that_does_not_change_the_run_identity():
    from sam_bench.schema import config_hash

    cfg = train_cfg(m=4)
    assert cfg.optimizer.m_engine == "auto"
    plain = OmegaConf.to_container(cfg)
    other = OmegaConf.to_container(OmegaConf.merge(cfg, {"optimizer": {"m_engine": "vmap"}}))
    assert config_hash(plain) == config_hash(other)
    with pytest.raises(Exception, match="m_engine"):
        OmegaConf.merge(cfg, {"optimizer": {"m_engine": "fast"}})


def train_cfg(precision="auto", **opt):
    return OmegaConf.create({
        "optimizer": OmegaConf.structured(OptimizerConfig(name="sam", **opt)),
        "trainer": OmegaConf.structured(TrainerConfig(batch_size=8, precision=precision, epochs=1, eval_every=1, eval_batch_size=8)),
        "dataset": OmegaConf.structured(DatasetConfig(name="synthetic", num_classes=10, in_chans=1, mean=[0.0], std=[1.0], train_size=64, test_size=16)),
    })


@pytest.mark.parametrize("opt,precision,message", [
    (dict(m=3), "auto", r"optimizer\.m=3 .*trainer\.batch_size=8"),
    (dict(m=0), "auto", r"optimizer\.m=0"),
    (dict(p="one"), "auto", r"optimizer\.p='one'"),
    (dict(ascent_steps=0), "auto", r"optimizer\.ascent_steps=0"),
    (dict(ascent_steps=2, p="random"), "auto", r"ascent_steps > 1"),
    (dict(adaptive=True, p="inf"), "auto", r"adaptive"),
    (dict(second_order=True), "fp16", r"second_order"),
    (dict(m=4, second_order=True, m_engine="split"), "auto", r"optimizer\.m_engine=split cannot take optimizer\.second_order"),
    (dict(eta=-1.0), "auto", r"optimizer\.eta"),
    (dict(warmup_epochs=-0.5), "auto", r"optimizer\.warmup_epochs=-0\.5 must be >= 0 and below trainer\.epochs=1"),
    (dict(warmup_epochs=1.0), "auto", r"optimizer\.warmup_epochs=1\.0 must be >= 0 and below trainer\.epochs=1"),
])
def test_validate_rejects_bad_sam_family_keys(opt, precision, message):
    from sam_bench.schema import validate

    with pytest.raises(ConfigError, match=message):
        validate(train_cfg(precision, **opt))
    validate(train_cfg(m=4))  # a divisor is fine
    validate(train_cfg(warmup_epochs=0.5))  # a warmup shorter than the run too


# ---- 4. variants ----------------------------------------------------------------------------

def asam_optimizer(model):
    cfg = OmegaConf.structured(OptimizerConfig(name="sam", rho=0.5, adaptive=True, eta=0.01, weight_decay=WD, lr=LR))
    return build_optimizer(cfg, model)


def test_asam_matches_reference_and_scales_weights_only():
    model = tiny_model()
    expected = ref_steps(weights(model), 3, variant="asam")
    opt = asam_optimizer(model)
    scaled = {id(p) for g in opt.param_groups if g["adaptive"] for p in g["params"]}
    assert [n for n, p in model.named_parameters() if id(p) in scaled] == ["0.weight", "1.weight", "5.weight"]
    run(model, opt, 3)
    assert_weights(model, expected)


@pytest.mark.parametrize("variant", ["inf", "random"])
def test_p_variants_match_reference(variant):
    model = tiny_model()
    expected = ref_steps(weights(model), 3, variant=variant)
    run(model, make_sam(model, p=variant, seed=0), 3)
    assert_weights(model, expected)


@pytest.mark.parametrize("k,variant", [(2, "sam"), (3, "sam"), (2, "inf")])
def test_k_step_ascent_matches_reference(k, variant):
    model = tiny_model()
    expected = ref_steps(weights(model), 3, variant=variant, k=k)
    run(model, make_sam(model, ascent_steps=k, p="inf" if variant == "inf" else "2"), 3)
    assert_weights(model, expected)


def test_k_step_projection_is_active():
    """Guard: with k = 3 the trajectory differs from k = 1."""
    w = weights(tiny_model())
    a, b = ref_steps(w, 2, k=1), ref_steps(w, 2, k=3)
    assert max(float((p - q).abs().max()) for p, q in zip(a, b)) > 1e-7


def test_second_order_matches_autograd_through_epsilon():
    model = tiny_model()
    expected = ref_steps(weights(model), 3, second_order=True)
    run(model, make_sam(model, second_order=True), 3)
    assert_weights(model, expected)
    first = ref_steps(weights(tiny_model()), 3)
    assert max(float((p - q).abs().max()) for p, q in zip(first, expected)) > 1e-7  # the term matters


def test_second_order_cosine_diagnostic_matches_reference():
    """Fig. 5: the cosine between the first-order SAM gradient ∇L(w + ε̂) and the full gradient of
    L(w + ε̂(w)) (autograd through ε̂, float64), both with the L2 term; logged only with second_order."""
    model = tiny_model()
    w = [t.detach().requires_grad_(True) for t in weights(model)]
    x, y = batch(0)
    full = lambda u: ref_loss(u, x, y) + 0.5 * WD * sum((t * t).sum() for t in u)  # noqa: E731
    g = torch.autograd.grad(full(w), w, create_graph=True)
    gn = torch.sqrt(sum((t * t).sum() for t in g))
    shifted = [a + RHO * b / gn for a, b in zip(w, g)]
    second = torch.autograd.grad(full(shifted), w)
    first = ref_grad([t.detach() for t in shifted], x, y)
    expected = sum(float((a * b).sum()) for a, b in zip(first, second)) / (norm(first) * norm(second))
    opt = make_sam(model, second_order=True, diagnostics=True)
    run(model, opt, 1)
    assert opt.read_diagnostics()["sam/second_order_cosine"] == pytest.approx(expected, rel=1e-10, abs=0)
    assert expected < 1 - 1e-9  # the second-order term turns the update
    plain = tiny_model()
    opt = make_sam(plain, diagnostics=True)
    run(plain, opt, 1)
    assert set(opt.read_diagnostics()) == {"sam/grad_norm", "sam/eps_norm", "sam/loss_gap", "sam/cosine"}


@pytest.mark.parametrize("k,variant,m", [(2, "sam", 4), (3, "sam", 2), (3, "inf", 4)])
def test_k_step_ascent_with_m_sharpness_matches_reference(k, variant, m, engine):
    """Table 11 with m-sharpness: every chunk takes its own k projected ascent steps from its own
    gradients at w + ε_c (the reference loops over chunks, each a plain k-step SAM on its examples)."""
    model = tiny_model()
    expected = ref_steps(weights(model), 3, variant=variant, k=k, m=m)
    run(model, make_sam(model, ascent_steps=k, p="inf" if variant == "inf" else "2"), 3, m=m)
    assert_weights(model, expected)
    one_step = ref_steps(weights(tiny_model()), 3, variant=variant, k=1, m=m)
    assert max(float((p - q).abs().max()) for p, q in zip(one_step, expected)) > 1e-7  # the extra steps matter


@pytest.mark.parametrize("bn_mode", ["clean", "both", "frozen"])
def test_k_step_m_sharpness_matches_loop_reference_on_every_layer_kind(bn_mode, engine):
    """k = 3 with m = 4 on every layer kind (strided/dilated/grouped conv with bias, BN1d/2d with and
    without affine or momentum, Linear, a frozen parameter): weights and BN state equal the loop
    over chunks, whose ascent passes leave the BN state alone."""
    model, batches, k1, _ = rich_net_case(bn_mode, seed=7)
    ref = generic_loop_reference(model, batches, 4, bn_mode, k=3)
    opt = SAM([p for p in model.parameters() if p.requires_grad], torch.optim.SGD, rho=RHO, weight_decay=WD,
              grad_clip=5.0, lr=LR, momentum=MOMENTUM, nesterov=True, ascent_steps=3)
    bn_mods = batchnorm_modules(model)
    for x, y in batches:
        train_step(model, opt, x, y, F.cross_entropy, NO_AMP, bn_mods if bn_mode == "clean" else None, m=4)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    assert not torch.allclose(k1.fc2.weight, ref.fc2.weight, rtol=0, atol=1e-9)  # k matters


def test_k_step_m_sharpness_diagnostics_report_the_clean_gradient_norm(engine):
    """‖g‖ in the diagnostics is the mean over chunks of the clean pass's ‖g_c‖ (with its L2 term),
    and ‖ε‖ the final ε's: ρ after a projection onto the ρ-ball (p = 2)."""
    model = tiny_model()
    w = weights(model)
    x, y = batch(0)
    expected = sum(norm(ref_grad(w, x[i:i + 4], y[i:i + 4])) for i in (0, 4)) / 2
    opt = make_sam(model, ascent_steps=3, diagnostics=True)
    run(model, opt, 1, m=4)
    diag = opt.read_diagnostics()
    assert diag["sam/grad_norm"] == pytest.approx(expected, rel=1e-10)
    assert diag["sam/eps_norm"] == pytest.approx(RHO, rel=1e-10)


@pytest.mark.parametrize("variant", ["asam", "inf"])
def test_variants_with_m_sharpness(variant, engine):
    model = tiny_model()
    expected = ref_steps(weights(model), 2, variant=variant, m=4)
    opt = asam_optimizer(model) if variant == "asam" else make_sam(model, p=variant)
    run(model, opt, 2, m=4)
    assert_weights(model, expected)


def test_random_direction_with_m_sharpness(engine):
    """Each chunk gets its own Gaussian direction: one generator, draws of shape [C, ...] per
    parameter (all chunks at once, in parameter order)."""
    model = tiny_model()
    w = [t.detach().clone() for t in weights(model)]
    v = [torch.zeros_like(t) for t in w]
    gen = torch.Generator().manual_seed(0)
    for s in range(2):
        x, y = batch(s)
        z = [torch.randn((2,) + t.shape, generator=gen) for t in w]
        total = [torch.zeros_like(t) for t in w]
        for c in range(2):
            zc = [t[c] for t in z]
            eps = [RHO * t / norm(zc) for t in zc]
            g = ref_grad([a + e for a, e in zip(w, eps)], x[4 * c:4 * c + 4], y[4 * c:4 * c + 4])
            total = [a + b / 2 for a, b in zip(total, g)]
        nesterov(w, v, total, 5.0)
    run(model, make_sam(model, p="random", seed=0), 2, m=4)
    assert_weights(model, w)


# ---- robustness -----------------------------------------------------------------------------

def test_frozen_and_unused_parameters_and_two_groups(engine):
    model = tiny_model()
    model[1].weight.requires_grad_(False)
    unused = nn.Parameter(torch.ones(3))
    opt = SAM([{"params": [p for p in model.parameters() if p.requires_grad]}, {"params": [unused], "rho": 0.1}],
              torch.optim.SGD, rho=RHO, weight_decay=0.0, lr=LR)
    x, y = batch(0)
    for m in (None, 4):
        train_step(model, opt, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), m=m)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(unused.detach(), torch.ones(3))


class PartlyUsedNet(nn.Module):
    """tiny_model plus a Linear layer its forward never calls."""

    def __init__(self):
        super().__init__()
        self.net, self.unused = tiny_model(), nn.Linear(3, 3).double()

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("k,p", [(1, "2"), (3, "2"), (1, "random")])
def test_m_sharpness_leaves_frozen_and_unused_parameters_alone_as_plain_sam_does(k, p, engine):
    """A parameter frozen after the optimizer was built, and one the forward never uses, get no
    gradient in plain SAM, hence no L2 term, no ε and no step; m-sharpness must agree: with one
    chunk it equals the plain step (weight decay on, so an L2 term on them would show), and with
    two chunks they do not move either."""
    from sam_bench.optim.msam import msam_step

    nets = [PartlyUsedNet() for _ in range(3)]
    opts = [make_sam(n, weight_decay=0.05, ascent_steps=k, p=p, seed=3) for n in nets]
    for n in nets:
        n.net[1].weight.requires_grad_(False)  # frozen after the optimizer was built
    frozen, unused = nets[2].net[1].weight.detach().clone(), nets[2].unused.weight.detach().clone()
    for s in range(2):
        x, y = batch(s)
        msam_step(nets[0], opts[0], x, y, F.cross_entropy, NO_AMP, 8, batchnorm_modules(nets[0]), None, None, engine)
        train_step(nets[1], opts[1], x, y, F.cross_entropy, NO_AMP, batchnorm_modules(nets[1]))
        train_step(nets[2], opts[2], x, y, F.cross_entropy, NO_AMP, batchnorm_modules(nets[2]), m=4)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
    assert torch.equal(nets[2].net[1].weight, frozen) and torch.equal(nets[2].unused.weight, unused)
    assert not torch.equal(nets[2].net[0].weight, nets[1].net[0].weight)  # the rest trained (per chunk)


def test_random_generator_state_resumes():
    model = tiny_model()
    opt = make_sam(model, p="random", seed=5)
    run(model, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    model_b = copy.deepcopy(model)
    opt_b = make_sam(model_b, p="random", seed=5)
    opt_b.load_state_dict(sd)
    assert_same_next_step((model, opt), (model_b, opt_b))


def assert_same_next_step(a, b):
    """One more step of (model, opt) ``a`` and ``b`` on the same batch leaves identical weights."""
    x, y = batch(4)
    for mdl, o in (a, b):
        train_step(mdl, o, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(mdl))
    for p, q in zip(a[0].parameters(), b[0].parameters()):
        assert torch.equal(p, q)


def test_random_generator_state_through_the_public_methods():
    """rng_state()/set_rng_state() (the trainer's per-rank checkpoint): None before the first draw,
    then a state that replays the same directions in another optimizer."""
    model = tiny_model()
    opt = make_sam(model, p="random", seed=5)
    assert opt.rng_state() is None
    run(model, opt, 1)
    state = opt.rng_state()
    model_b = copy.deepcopy(model)
    opt_b = make_sam(model_b, p="random", seed=6)
    opt_b.load_state_dict({"base_optimizer": copy.deepcopy(opt.state_dict()["base_optimizer"])})
    opt_b.set_rng_state(state)
    assert_same_next_step((model, opt), (model_b, opt_b))


# ---- 3. fp16 loss scaling -------------------------------------------------------------------

class _InfGrad(torch.autograd.Function):
    """Identity forward, inf backward (works under vmap too)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Inject(nn.Module):
    """Identity whose backward puts inf into the gradient in the chosen pass (0 clean, 1 perturbed)."""

    def __init__(self, when):
        super().__init__()
        self.when, self.calls = when, 0

    def forward(self, x):
        call = self.calls
        self.calls += 1
        return _InfGrad.apply(x) if call in self.when else x


def fp16_model(when):
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), Inject(when), nn.Linear(8, 3)).float()


@pytest.mark.parametrize("k,bad_pass", [(1, 0), (1, 1), (2, 1)])  # (2, 1): k-step's extra ascent pass
@pytest.mark.parametrize("m", [None, 4])
def test_fp16_overflow_in_either_pass_skips_the_whole_step(k, bad_pass, m, engine):
    torch.set_default_dtype(torch.float32)
    # forward calls (k = 1): step 0 -> passes (0, 1), step 1 -> (2, 3), step 2 -> (4, 5); the inf hits step 1
    model = fp16_model({k + 1 + bad_pass})
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, weight_decay=WD, grad_clip=5.0, lr=LR, momentum=MOMENTUM,
              ascent_steps=k)
    scaler = LossScaler(torch.device("cpu"), init_scale=2.0**10)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    train_step(model, opt, x, y, F.cross_entropy, NO_AMP, scaler=scaler, m=m)
    assert float(scaler.scale_) == 2.0**10 and float(scaler.found_inf) == 0
    w = [p.detach().clone() for p in model.parameters()]
    mom = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    train_step(model, opt, x, y, F.cross_entropy, NO_AMP, scaler=scaler, m=m)
    for p, a, b in zip(model.parameters(), w, mom):
        assert torch.equal(p.detach(), a)
        assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], b)
    assert float(scaler.scale_) == 2.0**9  # updated once, backed off once
    train_step(model, opt, x, y, F.cross_entropy, NO_AMP, scaler=scaler, m=m)  # clean step moves again
    assert any(not torch.equal(p.detach(), a) for p, a in zip(model.parameters(), w))


@pytest.mark.parametrize("bad_pass", [0, 1])
@pytest.mark.parametrize("m", [None, 4])
def test_fp16_skipped_step_is_left_out_of_the_diagnostics(bad_pass, m, engine):
    """An overflow (either pass) skips the step; its inf/NaN norms and losses must not enter the
    interval's means (before, one overflow made every sam/* mean of its interval NaN). The means are
    those of the steps taken: equal to a run of the same steps without the skipped one."""
    torch.set_default_dtype(torch.float32)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    results = []
    for when, steps in (({2 + bad_pass}, 3), (set(), 2)):  # the inf hits step 1 of 3; the reference takes 2 steps
        model = fp16_model(when)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, weight_decay=WD, grad_clip=5.0, lr=LR, momentum=MOMENTUM,
                  diagnostics=True)
        scaler = LossScaler(torch.device("cpu"), init_scale=2.0**10)
        for _ in range(steps):
            train_step(model, opt, x, y, F.cross_entropy, NO_AMP, scaler=scaler, m=m)
        results.append(opt.read_diagnostics())
    skipped, reference = results
    assert set(skipped) == {"sam/grad_norm", "sam/eps_norm", "sam/loss_gap", "sam/cosine"}
    assert all(math.isfinite(v) for v in skipped.values()), skipped
    for key, value in reference.items():
        assert skipped[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("k,m", [(1, None), (2, None), (2, 4)])
def test_fp16_scaled_step_equals_unscaled_step(k, m, engine):
    """Without overflow, scaling every pass and unscaling gives the fp32 SAM step (scale 2^n exact),
    k-step ascent and m-sharpness included (an ascent gradient left scaled would drown its L2 term)."""
    torch.set_default_dtype(torch.float32)
    a, b = fp16_model(set()), fp16_model(set())
    kw = dict(rho=RHO, weight_decay=WD, grad_clip=5.0, lr=LR, momentum=MOMENTUM, ascent_steps=k)
    oa, ob = SAM(a.parameters(), torch.optim.SGD, **kw), SAM(b.parameters(), torch.optim.SGD, **kw)
    scaler = LossScaler(torch.device("cpu"), init_scale=2.0**8)
    for s in range(3):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        train_step(a, oa, x, y, F.cross_entropy, NO_AMP, scaler=scaler, m=m)
        train_step(b, ob, x, y, F.cross_entropy, NO_AMP, m=m)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_fp16_overflow_on_first_step_leaves_fresh_momentum():
    torch.set_default_dtype(torch.float32)
    model = fp16_model({0})
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
    w = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, torch.randn(8, 6), torch.randint(0, 3, (8,)), F.cross_entropy, NO_AMP, scaler=LossScaler(torch.device("cpu")))
    assert all(torch.equal(p.detach(), a) for p, a in zip(model.parameters(), w))
    assert all(torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in model.parameters())


def _mixed_params():
    """fp32 and fp64 parameters, a channels_last conv kernel, and one that never gets a gradient."""
    g = torch.Generator().manual_seed(9)
    conv = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    return [nn.Parameter(conv), nn.Parameter(torch.randn(5, generator=g, dtype=torch.float32)),
            nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64)), nn.Parameter(torch.randn(2, generator=g))]


def _masked_steps(flags: list[float | None], bad: set[int] = frozenset()):
    """SGD steps through SAM.descend with these found_inf flags (None: no masking), gradients of
    every parameter but the last, inf in the steps of ``bad``; the parameters and the optimizer."""
    params = _mixed_params()
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, nesterov=True)
    g = torch.Generator().manual_seed(10)
    for step, flag in enumerate(flags):
        for p in params[:-1]:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * (float("inf") if step in bad else 1.0)
        opt.descend(None if flag is None else torch.tensor(flag))
        opt.zero_grad()
    return params, opt


def test_fp16_masking_leaves_a_clean_step_bit_for_bit_and_undoes_an_overflow_bit_for_bit():
    """descend(found_inf) (one flat select per device and dtype): with the flag clear, the very step
    of descend(None), weights and momentum (mixed dtypes, a channels_last kernel); with it set, every
    bit of every weight and buffer as before the step, also where the step made inf/NaN; a buffer
    the skipped step created is zeros, and the layout of every tensor is kept."""
    plain, opt_plain = _masked_steps([None, None, None])
    masked, opt_masked = _masked_steps([0.0, 0.0, 0.0])
    for a, b in zip(plain, masked):
        assert torch.equal(a, b) and a.stride() == b.stride() and a.dtype == b.dtype
        if a.grad is not None or b in opt_masked.base_optimizer.state:
            assert torch.equal(opt_plain.base_optimizer.state[a]["momentum_buffer"],
                               opt_masked.base_optimizer.state[b]["momentum_buffer"])
    two, opt_two = _masked_steps([0.0, 0.0])
    skipped, opt_skipped = _masked_steps([0.0, 0.0, 1.0], bad={2})
    for a, b in zip(two, skipped):
        assert torch.equal(a, b) and a.stride() == b.stride()
    for a, b in zip(two[:-1], skipped[:-1]):
        assert torch.equal(opt_two.base_optimizer.state[a]["momentum_buffer"], opt_skipped.base_optimizer.state[b]["momentum_buffer"])
    first, opt_first = _masked_steps([1.0], bad={0})
    for p, w in zip(first, _mixed_params()):
        assert torch.equal(p, w)
    assert all(torch.equal(opt_first.base_optimizer.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in first[:-1])
    assert first[-1] not in opt_first.base_optimizer.state  # no state made up for a parameter without gradient


def test_preload_l2_is_the_per_parameter_term_bit_for_bit():
    """preload_l2 (fused per device and dtype) puts exactly p.grad + l2·w·scale (or l2·w·scale where
    p.grad is None) in every parameter that had a clean-pass gradient, none in the others."""
    params = _mixed_params()
    opt = SAM([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.3}], torch.optim.SGD,
              rho=RHO, lr=LR, weight_decay=WD)
    g = torch.Generator().manual_seed(11)
    for p in params[:-1]:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    opt.first_step(zero_grad=True)
    params[1].grad = torch.randn(params[1].shape, generator=g, dtype=params[1].dtype)  # one already has a gradient
    before = params[1].grad.clone()
    scale = torch.tensor(2.0**13)
    opt.preload_l2(scale)
    for p, l2 in zip(params[:-1], (WD, WD, 0.3)):
        term = p.detach() * l2 * scale.to(p.dtype)
        assert torch.equal(p.grad, before + term if p is params[1] else term)
    assert params[-1].grad is None


def test_fp16_is_refused_on_the_cpu():
    with pytest.raises(ConfigError, match="trainer.precision=fp16 needs CUDA"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    from sam_bench.schema import Precision

    resolved = resolve_precision(Precision.bf16, torch.device("cpu"))  # the config's enum: the log said "Precision.bf16"
    assert type(resolved) is str and f"{resolved}" == "bf16"


# ---- 5. diagnostics -------------------------------------------------------------------------

def test_diagnostics_match_reference():
    model = tiny_model()
    opt = make_sam(model, diagnostics=True)
    w = [t.detach().clone() for t in weights(model)]
    x, y = batch(0)
    g = ref_grad(w, x, y)
    eps = ref_eps(g, w, "sam")
    g2 = ref_grad([a + e for a, e in zip(w, eps)], x, y)
    l0 = float(ref_loss(w, x, y))
    l1 = float(ref_loss([a + e for a, e in zip(w, eps)], x, y))
    cos = sum(float((a * b).sum()) for a, b in zip(g, g2)) / (norm(g) * norm(g2))
    run(model, opt, 1)
    d = opt.read_diagnostics()
    assert d["sam/grad_norm"] == pytest.approx(norm(g), abs=1e-12)
    assert d["sam/eps_norm"] == pytest.approx(RHO, abs=1e-12)
    assert d["sam/loss_gap"] == pytest.approx(l1 - l0, abs=1e-12)  # CE only (the L2 term is not in loss_fn)
    assert d["sam/cosine"] == pytest.approx(cos, abs=1e-12)
    assert opt.read_diagnostics() == {}  # reset after a read


# ---- CUDA-only: autocast inside the vmapped m-sharpness pass --------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_m_sharpness_runs_on_cuda_channels_last_under_autocast(precision, engine):
    """On a GPU, with a channels_last model and the trainer's autocast, the batched m-sharpness pass
    runs in the autocast dtype (see msam.py "Precision") and stays finite."""
    torch.set_default_dtype(torch.float32)
    from sam_bench.optim.msam import msam_step

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    amp = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
    model = tiny_model().float().cuda().to(memory_format=torch.channels_last)
    seen = []
    model[0].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    opt = make_sam(model)
    scaler = LossScaler(torch.device("cuda")) if precision == "fp16" else None
    x, y = batch(0)
    x = x.float().cuda().contiguous(memory_format=torch.channels_last)
    loss, _ = msam_step(model, opt, x, y.cuda(), F.cross_entropy, amp, 4, batchnorm_modules(model), None, scaler, engine)
    assert seen and all(d == dtype for d in seen)
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [1, 2])
def test_m_sharpness_on_cuda_matches_the_float64_cpu_step(k, engine):
    """The m-sharpness step (each engine, one or two ascent steps) on CUDA, fp32 without TF32 and
    with a channels_last model, equals the float64 CPU step that matches the loop-over-chunks reference."""
    cpu = tiny_model()
    model = copy.deepcopy(cpu).float().cuda().to(memory_format=torch.channels_last)
    run(cpu, make_sam(cpu, ascent_steps=k), 2, m=4)
    batches = [batch(s, 8) for s in range(2)]  # drawn in float64, as run() draws them
    torch.set_default_dtype(torch.float32)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        opt = make_sam(model, ascent_steps=k)
        bn_mods = batchnorm_modules(model)
        for x, y in batches:
            x = x.float().cuda().contiguous(memory_format=torch.channels_last)
            train_step(model, opt, x, y.cuda(), F.cross_entropy, lambda: torch.autocast("cuda", enabled=False), bn_mods,
                       None, m=4)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    for (name, a), b in zip(model.state_dict().items(), cpu.state_dict().values()):
        torch.testing.assert_close(a.cpu().to(b.dtype), b, rtol=0, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_split_m_sharpness_on_cuda(precision):
    """trainer.compile on a GPU: the split engine under inductor (channels_last). fp32 without TF32
    equals the float64 CPU step; bf16 autocast runs the two compiled graphs and stays finite."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    cpu = tiny_model()
    model = copy.deepcopy(cpu).float().cuda().to(memory_format=torch.channels_last)
    run(cpu, make_sam(cpu), 2, m=4)
    batches = [batch(s, 8) for s in range(2)]
    torch.set_default_dtype(torch.float32)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precision == "bf16" else \
        (lambda: torch.autocast("cuda", enabled=False))
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    start = counters["stats"]["unique_graphs"]
    try:
        opt, compiled = make_sam(model), torch.compile(model)
        for x, y in batches:
            x = x.float().cuda().contiguous(memory_format=torch.channels_last)
            loss, _ = train_step(compiled, opt, x, y.cuda(), F.cross_entropy, amp, batchnorm_modules(model), None,
                                 m=4, m_engine="split")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] - start == 2  # clean + perturbed pass
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
    if precision == "fp32":
        for (name, a), b in zip(model.state_dict().items(), cpu.state_dict().values()):
            torch.testing.assert_close(a.cpu().to(b.dtype), b, rtol=0, atol=1e-5, msg=name)


# ---- the trainer wiring, end to end ---------------------------------------------------------

@pytest.mark.slow
def test_cli_asam_m_sharpness_logs_diagnostics(cli_env, tmp_path):
    """optimizer=asam + optimizer.m reach the step; diagnostics land in TensorBoard.
    (fp16 is CUDA-only; its trainer wiring is tested in test_reliability with the scaler.)"""
    import json

    from conftest import sam_bench_forked
    precision = "fp32"
    run_dir = tmp_path / "run"
    args = ["train", "dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32", "model=wrn",
            "model.kwargs.depth=10", "model.kwargs.width=1", "trainer.batch_size=16", "trainer.epochs=1",
            "trainer.progress=false", "trainer.log_every_steps=2", "optimizer=asam", "optimizer.m=4",
            f"trainer.precision={precision}", f"hydra.run.dir={run_dir}"]
    proc = sam_bench_forked(args, cli_env)  # the trainer's wiring, not the process: main() in a forked child
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["config"]["optimizer"]["adaptive"] and result["config"]["optimizer"]["m"] == 4
    assert "m-sharpness: m=4, 4 chunks per batch, engine split (optimizer.m_engine=auto)" in (run_dir / "train.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    cos = events.Scalars("sam/cosine")
    assert [e.step for e in cos] == [2, 4] and all(-1 <= e.value <= 1 for e in cos)
    # the same command line twice more
    bad = sam_bench_forked(args[:-1] + ["optimizer.m=3", f"hydra.run.dir={tmp_path / 'bad'}"], cli_env)
    assert bad.returncode == 2 and "optimizer.m=3" in bad.stderr + bad.stdout
    vmap = sam_bench_forked(args[:-1] + ["optimizer.m_engine=vmap", f"hydra.run.dir={tmp_path / 'vmap'}"], cli_env)
    assert vmap.returncode == 0, vmap.stderr[-2000:]
    assert "engine vmap (optimizer.m_engine=vmap)" in (tmp_path / "vmap" / "train.log").read_text()
    other = json.loads((tmp_path / "vmap" / "result.json").read_text())  # same run, other engine
    assert other["config_hash"] == result["config_hash"]
    # fp32: the engines round differently (float64: equal to 1e-15 after 4 steps, by hand), and
    # ASAM's ρ = 0.5 on 4-example chunks amplifies that: test-loss gaps of 1e-6 to 7e-4 over seeds 0-3
    assert other["final_test_loss"] == pytest.approx(result["final_test_loss"], rel=5e-3)


@pytest.mark.parametrize("backend,bn_mode", [("aot_eager", "clean"), ("aot_eager", "both"), ("aot_eager", "frozen"),
                                             ("inductor", "clean")])
def test_split_engine_under_torch_compile_matches_loop_reference_without_recompiling(backend, bn_mode):
    """trainer.compile with m-sharpness: the split engine runs the compiled model (dynamo traces the
    swapped layer forwards and both custom autograd Functions; BN takes its vectorised form). Same
    float64 steps as the loop reference; one graph per pass, reused by every later step (no
    recompilation per step)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, batches, ref, opt = rich_net_case(bn_mode, seed=8)
    compiled = torch.compile(model, backend=backend)
    bn_mods = batchnorm_modules(model) if bn_mode == "clean" else None
    graphs, breaks = [], sum(counters["graph_break"].values())
    start = counters["stats"]["unique_graphs"]  # counters add up over the session
    for x, y in batches:
        train_step(compiled, opt, x, y, F.cross_entropy, NO_AMP, bn_mods, m=4, m_engine="split")
        graphs.append(counters["stats"]["unique_graphs"] - start)
    assert graphs == [2, 2, 2], graphs  # clean + perturbed pass, compiled once
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    torch._dynamo.reset()


def test_trainer_says_whether_m_sharpness_steps_run_compiled(caplog):
    """With trainer.compile the split engine's steps run the compiled model, the vmap engine's the
    eager one: the run's log says which."""
    import logging

    from sam_bench.engine.trainer import _m_sharpness_engine

    with caplog.at_level(logging.INFO, logger="sam_bench"):
        assert _m_sharpness_engine(tiny_model(), "auto", 4, 8, True) == "split"
        assert _m_sharpness_engine(tiny_model(), "vmap", 4, 8, True) == "vmap"
        assert _m_sharpness_engine(tiny_model(), "auto", 4, 8, False) == "split"
    split, vmap, eager = [r.getMessage() for r in caplog.records]
    assert split.endswith("m=4, 2 chunks per batch, engine split (optimizer.m_engine=auto); its training steps run the compiled model")
    assert vmap.endswith("engine vmap (optimizer.m_engine=vmap); its training steps run the eager model (trainer.compile applies to evaluation)")
    assert eager.endswith("engine split (optimizer.m_engine=auto)")


def test_auto_engine_takes_vmap_above_the_split_engines_chunk_bound(caplog, monkeypatch):
    """engine "auto": split up to msam.SPLIT_MAX_CHUNKS chunks per batch, vmap above (the split
    engine's host cost grows with the chunk count); "split" asked explicitly stays split."""
    import logging

    from sam_bench.engine.trainer import _m_sharpness_engine

    bound = msam.SPLIT_MAX_CHUNKS
    assert msam.resolve_engine(tiny_model(), "auto", bound) == "split"
    assert msam.resolve_engine(tiny_model(), "auto", bound + 1) == "vmap"
    assert msam.resolve_engine(tiny_model(), "auto") == "split"  # chunk count unknown
    assert msam.resolve_engine(tiny_model(), "split", 8 * bound) == "split"
    with caplog.at_level(logging.INFO, logger="sam_bench"):
        assert _m_sharpness_engine(tiny_model(), "auto", 1, 2 * bound, False) == "vmap"
    why, chosen = [r.getMessage() for r in caplog.records]
    assert f"{2 * bound} chunks per batch is more than the split engine's {bound}" in why
    assert "optimizer.m_engine=split forces it" in why
    assert chosen.endswith(f"m=1, {2 * bound} chunks per batch, engine vmap (optimizer.m_engine=auto)")

    def split_must_not_run(*args, **kwargs):
        raise AssertionError("the split engine ran")

    monkeypatch.setattr(msam, "_SplitPasses", split_must_not_run)
    model = tiny_model()
    run(model, make_sam(model), 1, m=1, n=bound + 1)  # a direct train_step call decides the same way
    assert not torch.equal(model[5].weight, tiny_model()[5].weight)  # it trained


def test_auto_engine_takes_vmap_for_an_eager_cuda_model_and_split_when_compiled(caplog):
    """Measured on an H200 (results/benchmarks.md, eighth session): eager, vmap beat split at every
    chunk count tried (the eager split engine is host-bound there); compiled, split is the fastest.
    On the CPU split stays. A model split cannot run gets vmap, and the log says why."""
    import logging

    from sam_bench.engine.trainer import _m_sharpness_engine

    model = tiny_model()
    assert msam.resolve_engine(model, "auto", 8, compiled=False, device="cuda") == "vmap"
    assert msam.resolve_engine(model, "auto", 8, compiled=True, device="cuda") == "split"
    assert msam.resolve_engine(model, "auto", 8, compiled=False, device="cpu") == "split"
    assert msam.resolve_engine(model, "auto", 8) == "split"  # defaults: not compiled, the parameters' device (cpu)
    assert msam.resolve_engine(model, "split", 8, compiled=False, device="cuda") == "split"
    assert msam.resolve_engine(torch.compile(model), "auto", 8, device="cuda") == "split"  # the wrapper is compiled
    grouped = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(5))
    with caplog.at_level(logging.INFO, logger="sam_bench"):
        assert _m_sharpness_engine(model, "auto", 4, 32, False, "cuda") == "vmap"
        assert _m_sharpness_engine(model, "auto", 4, 32, True, "cuda") == "split"
        assert _m_sharpness_engine(grouped, "auto", 4, 32, False, "cpu") == "vmap"
    eager_why, eager, compiled, blocked_why, blocked = [r.getMessage() for r in caplog.records]
    assert eager_why.startswith("m-sharpness: engine auto takes vmap: the model runs eagerly on CUDA")
    assert eager_why.endswith("optimizer.m_engine=split forces it")
    assert eager.endswith("m=4, 8 chunks per batch, engine vmap (optimizer.m_engine=auto)")
    assert compiled.endswith("engine split (optimizer.m_engine=auto); its training steps run the compiled model")
    assert "the split engine cannot run this model: 1 (GroupNorm) is not Conv2d, Linear" in blocked_why
    assert "forces it" not in blocked_why
    assert blocked.endswith("engine vmap (optimizer.m_engine=auto)")


def test_trainer_warns_that_cuda_graphs_slow_the_compiled_split_engine(caplog):
    """compile mode reduce-overhead measured 2.8x slower than default for the split engine (H200):
    the run's log says so; other modes, and the vmap engine (eager steps), get no warning."""
    import logging

    from sam_bench.engine.trainer import _m_sharpness_engine

    with caplog.at_level(logging.INFO, logger="sam_bench"):
        _m_sharpness_engine(tiny_model(), "auto", 4, 32, True, "cuda", "reduce-overhead")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "trainer.compile_mode=default is faster" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sam_bench"):
        _m_sharpness_engine(tiny_model(), "auto", 4, 32, True, "cuda", "default")
        _m_sharpness_engine(tiny_model(), "vmap", 4, 32, True, "cuda", "reduce-overhead")
        _m_sharpness_engine(tiny_model(), "auto", None, 32, True, "cuda", "reduce-overhead")  # plain SAM
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("m", [2, 4])
def test_second_order_with_m_sharpness_matches_autograd_through_each_chunks_epsilon(m):
    """App. C.4 per chunk: each chunk's final gradient is the full gradient of its L(w + ε̂_c(w))
    (autograd through ε̂_c in the reference, float64), averaged over chunks. Engine auto takes vmap
    for it (the split engine's layers have no double backward)."""
    model = tiny_model()
    expected = ref_steps(weights(model), 3, second_order=True, m=m)
    run(model, make_sam(model, second_order=True), 3, m=m)
    assert_weights(model, expected)
    first_order = ref_steps(weights(tiny_model()), 3, m=m)
    assert max(float((p - q).abs().max()) for p, q in zip(first_order, expected)) > 1e-7  # the term matters


@pytest.mark.parametrize("bn_mode", ["both", "frozen"])
def test_second_order_with_m_sharpness_keeps_the_bn_state_of_first_order_m_sharpness(bn_mode):
    """The second-order path replaces the perturbed pass: with BN mode "both" its statistics still
    join the running ones, with "frozen" nothing moves; after one step the BN state equals the
    first-order m-SAM step's (the same passes at w and w + ε_c), while the weights differ."""
    a, b = tiny_model(), tiny_model()
    if bn_mode == "frozen":
        for mdl in (a, b):
            with torch.no_grad():
                mdl[1].running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(0))
    run(a, make_sam(a, second_order=True), 1, m=4, bn=bn_mode)
    run(b, make_sam(b), 1, m=4, bn=bn_mode)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(a[1], name), getattr(b[1], name), rtol=0, atol=1e-12, msg=name)
    assert int(a[1].num_batches_tracked) == (2 if bn_mode == "both" else 0)
    assert not torch.allclose(a[0].weight, b[0].weight, rtol=0, atol=1e-9)


def test_second_order_with_m_sharpness_logs_each_chunks_cosine_and_refuses_split_and_fp16():
    """sam/second_order_cosine under m: the cosine between the chunk means of the first-order and
    the full gradients (float64 reference); split is refused by name, as is fp16 loss scaling."""
    model = tiny_model()
    w = [t.detach() for t in weights(model)]
    x, y = batch(0)
    first, full = [torch.zeros_like(t) for t in w], [torch.zeros_like(t) for t in w]
    for c in range(2):
        xc, yc = x[4 * c:4 * c + 4], y[4 * c:4 * c + 4]
        wr = [t.clone().requires_grad_(True) for t in w]
        loss = lambda u: ref_loss(u, xc, yc) + 0.5 * WD * sum((t * t).sum() for t in u)  # noqa: E731,B023
        g = torch.autograd.grad(loss(wr), wr, create_graph=True)
        gn = torch.sqrt(sum((t * t).sum() for t in g))
        shifted = [a + RHO * b / gn for a, b in zip(wr, g)]
        full = [a + b / 2 for a, b in zip(full, torch.autograd.grad(loss(shifted), wr))]
        first = [a + b / 2 for a, b in zip(first, ref_grad([t.detach() for t in shifted], xc, yc))]
    expected = sum(float((a * b).sum()) for a, b in zip(first, full)) / (norm(first) * norm(full))
    opt = make_sam(model, second_order=True, diagnostics=True)
    run(model, opt, 1, m=4)
    assert opt.read_diagnostics()["sam/second_order_cosine"] == pytest.approx(expected, rel=1e-10, abs=0)
    with pytest.raises(ValueError, match="optimizer.m_engine=split cannot take the second-order term"):
        msam.resolve_engine(model, "split", 2, second_order=True)
    with pytest.raises(ValueError, match="second_order needs a double backward without loss scaling"):
        train_step(model, make_sam(model, second_order=True), x.float(), y, F.cross_entropy, NO_AMP,
                   scaler=LossScaler(torch.device("cpu")), m=4)


# ---------------------------------------------------------------- the optimizer as a library


def _three_params(seed_offset: int = 0):
    return [torch.randn(3, generator=torch.Generator().manual_seed(i + seed_offset), dtype=torch.float64).requires_grad_(True)
            for i in range(3)]


def _toggling_loss(a, b, c, second: bool):
    """a is used in both passes; b only in the first, c only in the later ones (same shapes, so a
    pairing by position would not even fail)."""
    x = torch.arange(1.0, 5.0, dtype=torch.float64)
    return ((a * x[:1]).sum() + ((c if second else b) * x[1:4]).sum()) ** 2 + (a ** 2).sum()


def test_gradients_are_paired_by_parameter_when_the_passes_use_different_ones():
    """Diagnostics' cosine, k-step ascent and the second-order term with parameters that get a
    gradient in one pass only: the clean and the later gradients are matched by parameter (a
    missing one is zero), and w comes back exactly."""
    a, b, c = _three_params()
    opt = SAM([a, b, c], torch.optim.SGD, rho=0.1, lr=1.0, diagnostics=True)
    _toggling_loss(a, b, c, False).backward()
    clean = torch.cat([a.grad, b.grad, torch.zeros(3, dtype=torch.float64)])
    opt.first_step(zero_grad=True)
    _toggling_loss(a, b, c, True).backward()
    sam = torch.cat([a.grad, torch.zeros(3, dtype=torch.float64), c.grad])
    opt.second_step()
    want = (clean @ sam / clean.norm() / sam.norm()).item()
    assert abs(opt.read_diagnostics()["sam/cosine"] - want) < 1e-12

    for kw in ({"ascent_steps": 2}, {"second_order": True}):
        a, b, c = _three_params()
        w0 = [t.detach().clone() for t in (a, b, c)]
        opt = SAM([a, b, c], torch.optim.SGD, rho=0.1, lr=0.0, **kw)  # lr 0: the step must leave w as it was
        _toggling_loss(a, b, c, False).backward()
        opt.first_step(zero_grad=True)
        if kw.get("ascent_steps"):
            _toggling_loss(a, b, c, True).backward()
            opt.ascent_step(zero_grad=True)
            eps = torch.cat([t.detach() - w for t, w in zip((a, b, c), w0)])
            assert eps.norm() <= 0.1 + 1e-12 and (c.detach() != w0[2]).any()  # c, gradient-less at first, moved too
        _toggling_loss(a, b, c, True).backward()
        opt.second_step(hvp=lambda u: [2 * t for t in u]) if kw.get("second_order") else opt.second_step()
        assert all(torch.equal(t.detach(), w) for t, w in zip((a, b, c), w0)), kw


@pytest.mark.parametrize("mode", ["loss", "decoupled"])
def test_a_param_group_added_later_behaves_like_one_given_at_construction(mode):
    """add_param_group (layers unfrozen for finetuning): SAM's rho and weight decay, split between the
    loss and the base optimizer as for the first groups; the same steps as constructing with both."""
    def train(later: bool):
        ps = _three_params(7)
        kw = dict(rho=0.1, weight_decay=1e-2, weight_decay_mode=mode, lr=0.1, momentum=0.9)
        if later:
            opt = SAM([ps[0]], torch.optim.SGD, **kw)
            opt.add_param_group({"params": ps[1:]})
        else:
            opt = SAM([{"params": [ps[0]]}, {"params": ps[1:]}], torch.optim.SGD, **kw)
        for _ in range(3):
            _toggling_loss(*ps, False).backward()
            opt.step(lambda: _toggling_loss(*ps, False).backward())
            opt.zero_grad()
        return ps, opt

    (want, opt_a), (got, opt_b) = train(False), train(True)
    assert all(torch.equal(x, y) for x, y in zip(want, got))
    assert {k: opt_b.param_groups[1][k] for k in ("rho", "l2", "weight_decay", "momentum")} == \
        {k: opt_a.param_groups[1][k] for k in ("rho", "l2", "weight_decay", "momentum")}
    assert opt_b.param_groups is opt_b.base_optimizer.param_groups and len(opt_b.param_groups) == 2


@pytest.mark.parametrize("kw,group", [
    ({"p": "inf"}, {"adaptive": True}),  # a group switching ASAM on meets the same checks as the flag
    ({"ascent_steps": 2}, {"adaptive": True}),
    ({"second_order": True, "adaptive": True}, {}),
    ({"second_order": True, "ascent_steps": 2}, {}),
])
def test_combinations_without_their_maths_are_refused(kw, group):
    a, b, _ = _three_params()
    with pytest.raises(ValueError):
        SAM([{"params": [a]}, {"params": [b], **group}], torch.optim.SGD, rho=0.1, lr=0.1, **kw)
    if group:  # a group added later is checked the same way
        opt = SAM([a], torch.optim.SGD, rho=0.1, lr=0.1, **kw)
        with pytest.raises(ValueError):
            opt.add_param_group({"params": [b], **group})


def test_sam_and_the_config_accept_the_same_variant_combinations():
    """One set of rules (variant_rules.sam_variant_conflict) for SAM's arguments and the config check."""
    import itertools

    from sam_bench.schema import validate

    for adaptive, p, k, second_order in itertools.product([False, True], ["2", "inf", "random"], [1, 2], [False, True]):
        kw = {"adaptive": adaptive, "p": p, "ascent_steps": k, "second_order": second_order}
        try:
            SAM([nn.Parameter(torch.ones(2))], torch.optim.SGD, rho=0.1, lr=0.1, **kw)
            sam_ok = True
        except ValueError:
            sam_ok = False
        try:
            validate(train_cfg(**kw))
            config_ok = True
        except ConfigError:
            config_ok = False
        assert sam_ok == config_ok, kw
        assert sam_ok == (not (k > 1 and (p == "random" or adaptive)) and not ((adaptive or second_order) and p != "2")
                          and not (second_order and (adaptive or k > 1))), kw


def test_build_optimizer_takes_every_default_from_the_schema():
    """The optimizer built from a default config has the schema's values (diagnostics on: the
    factory's own fallback said off), and a config without a field fails instead of guessing."""
    cfg = OmegaConf.structured(OptimizerConfig(name="sam"))
    opt = build_optimizer(cfg, tiny_model())
    default = OptimizerConfig(name="sam")
    assert opt.diagnostics is default.diagnostics is True
    assert (opt.p, opt.eta, opt.ascent_steps, opt.second_order) == (default.p, default.eta, default.ascent_steps, default.second_order)
    assert [g["adaptive"] for g in opt.param_groups] == [default.adaptive]
    partial = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "diagnostics"})
    with pytest.raises(Exception, match="diagnostics"):
        build_optimizer(partial, tiny_model())
