"""SAM against an independent float64 reference written from the paper / official code."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sam_bench.engine.step import train_step
import sam_bench.optim.sam as sam_module
from sam_bench.optim import SAM, batchnorm_modules
from sam_reference import LR, MOMENTUM, RHO, WD, batch, ref_grad, tiny_model, weights


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ---- the reference (sam_reference.py): plain tensors, hand-written forward and Nesterov SGD ----

def ref_sam_steps(w, steps: int, rho: float, mode: str, clip: float | None):
    """Algorithm 1 of the paper with the official code's details, float64."""
    w = [t.detach().clone() for t in w]
    v = [torch.zeros_like(t) for t in w]
    for s in range(steps):
        x, y = batch(s)
        l2 = WD if mode == "loss" else 0.0
        if rho > 0:
            g = ref_grad(w, x, y, l2)
            norm = math.sqrt(sum(float((t * t).sum()) for t in g))
            eps = [rho * t / norm for t in g]
            g = ref_grad([a + e for a, e in zip(w, eps)], x, y, l2)
        else:
            g = ref_grad(w, x, y, l2)
        if clip is not None:
            norm = math.sqrt(sum(float((t * t).sum()) for t in g))
            g = [t * min(1.0, clip / norm) for t in g]
        if mode == "decoupled":
            g = [t + WD * a for t, a in zip(g, w)]
        for i in range(len(w)):  # Nesterov: v <- mu v + g ; w <- w - lr (g + mu v)
            v[i] = MOMENTUM * v[i] + g[i]
            w[i] = w[i] - LR * (g[i] + MOMENTUM * v[i])
    return w


def run_optimizer(model, steps: int, rho: float, mode: str, clip: float | None):
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, weight_decay=WD, weight_decay_mode=mode,
              grad_clip=clip, lr=LR, momentum=MOMENTUM, nesterov=True)
    bn = batchnorm_modules(model)
    for s in range(steps):
        x, y = batch(s)
        train_step(model, opt, x, y, F.cross_entropy, lambda: torch.autocast("cpu", enabled=False), bn)
    return opt


@pytest.mark.parametrize("mode", ["loss", "decoupled"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_sam_matches_float64_reference(mode, clip):
    model = tiny_model()
    expected = ref_sam_steps(weights(model), steps=4, rho=RHO, mode=mode, clip=clip)
    run_optimizer(model, steps=4, rho=RHO, mode=mode, clip=clip)
    for got, want in zip(weights(model), expected):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-10)


def test_clipping_is_active_in_the_clip_test():
    """Guard for the test above: a 0.5 clip must actually change the trajectory."""
    model = tiny_model()
    a = ref_sam_steps(weights(model), 2, RHO, "loss", None)
    b = ref_sam_steps(weights(model), 2, RHO, "loss", 0.5)
    assert max(float((x - y).abs().max()) for x, y in zip(a, b)) > 1e-4


def test_rho_zero_is_torch_sgd_bit_for_bit():
    model_a, model_b = tiny_model(), tiny_model()
    sam = SAM(model_a.parameters(), torch.optim.SGD, rho=0.0, weight_decay=WD, lr=LR, momentum=MOMENTUM, nesterov=True)
    sgd = torch.optim.SGD(model_b.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD)
    assert not sam.two_pass
    for s in range(5):
        x, y = batch(s)
        train_step(model_a, sam, x, y, F.cross_entropy, lambda: torch.autocast("cpu", enabled=False))
        sgd.zero_grad()
        F.cross_entropy(model_b(x), y).backward()
        sgd.step()
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)


def test_rho_zero_matches_reference_sgd():
    model = tiny_model()
    expected = ref_sam_steps(weights(model), steps=3, rho=0.0, mode="loss", clip=5.0)
    run_optimizer(model, steps=3, rho=0.0, mode="loss", clip=5.0)
    for got, want in zip(weights(model), expected):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-12)


def test_bn_running_stats_come_from_the_clean_pass_only():
    model = tiny_model()
    clean = copy.deepcopy(model).train()
    x, y = batch(0)
    clean(x)  # the clean pass alone
    run_optimizer(model, steps=1, rho=RHO, mode="loss", clip=None)
    bn, ref = model[1], clean[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    assert bn.track_running_stats  # restored after the perturbed pass


def test_zero_gradient_gives_zero_perturbation_not_nan():
    p = nn.Parameter(torch.ones(3))
    opt = SAM([p], torch.optim.SGD, rho=0.05, lr=0.1)
    p.grad = torch.zeros(3)
    opt.first_step()
    assert torch.equal(p.detach(), torch.ones(3))
    p.grad = torch.zeros(3)
    opt.second_step()
    assert torch.isfinite(p).all()


def test_weights_restored_exactly_before_the_base_step():
    p = nn.Parameter(torch.tensor([0.3, -1.7, 2.2]))
    w0 = p.detach().clone()
    opt = SAM([p], torch.optim.SGD, rho=0.5, lr=0.0)  # lr 0: the step must leave w unchanged
    p.grad = torch.tensor([1.0, 2.0, -0.5])
    opt.first_step(zero_grad=True)
    assert not torch.equal(p.detach(), w0)
    p.grad = torch.tensor([0.1, 0.1, 0.1])
    opt.second_step()
    assert torch.equal(p.detach(), w0)


def test_perturbation_has_norm_rho_over_all_parameters():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = SAM([{"params": [a]}, {"params": [b]}], torch.optim.SGD, rho=0.2, lr=0.1)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    opt.first_step()
    assert torch.allclose(a.detach(), torch.tensor([0.12, 0.0]))
    assert torch.allclose(b.detach(), torch.tensor([0.0, 0.16, 0.0]))


def test_state_dict_carries_momentum_and_resumes_identically():
    model_a = tiny_model()
    opt_a = run_optimizer(model_a, steps=2, rho=RHO, mode="loss", clip=5.0)
    sd = copy.deepcopy(opt_a.state_dict())
    assert any("momentum_buffer" in s for s in sd["base_optimizer"]["state"].values())
    model_b = copy.deepcopy(model_a)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, rho=RHO, weight_decay=WD, grad_clip=5.0, lr=LR, momentum=MOMENTUM, nesterov=True)
    opt_b.load_state_dict(sd)
    for model, opt in ((model_a, opt_a), (model_b, opt_b)):
        x, y = batch(7)
        train_step(model, opt, x, y, F.cross_entropy, lambda: torch.autocast("cpu", enabled=False), batchnorm_modules(model))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_param_groups_are_shared_with_the_base_optimizer():
    p = nn.Parameter(torch.ones(2))
    opt = SAM([p], torch.optim.SGD, rho=0.05, lr=0.1)
    opt.param_groups[0]["lr"] = 0.01
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.01


def test_step_with_closure_equals_first_and_second_step():
    model_a, model_b = tiny_model(), tiny_model()
    kw = dict(rho=RHO, weight_decay=WD, lr=LR, momentum=MOMENTUM, nesterov=True)
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, **kw)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, **kw)
    x, y = batch(0)
    F.cross_entropy(model_a(x), y).backward()
    opt_a.step(lambda: F.cross_entropy(model_a(x), y).backward())
    F.cross_entropy(model_b(x), y).backward()
    opt_b.first_step(zero_grad=True)
    F.cross_entropy(model_b(x), y).backward()
    opt_b.second_step(zero_grad=True)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_bad_arguments_are_rejected():
    p = [nn.Parameter(torch.ones(1))]
    with pytest.raises(ValueError, match="rho"):
        SAM(p, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="weight_decay_mode"):
        SAM(p, torch.optim.SGD, weight_decay_mode="sometimes", lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        SAM(p, torch.optim.SGD, rho=0.1, lr=0.1).step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norms_of_half_precision_tensors_are_float32(dtype):
    """global_norm/chunk_norms accumulate fp16/bf16 tensors in float32 and return float32, not a
    norm rounded to the tensors' own dtype (bf16: 32.5 for 32.544)."""
    g = torch.Generator().manual_seed(0)
    ts = [(torch.randn(50, 20, generator=g) * 1.3).to(dtype), (torch.randn(3, 7, generator=g)).to(dtype)]
    want = math.sqrt(sum(float((t.double() ** 2).sum()) for t in ts))
    got = sam_module.global_norm(ts)
    assert got.dtype == torch.float32
    assert abs(float(got) - want) <= 1e-6 * want
    stacked = [t.reshape(1, *t.shape).expand(4, *t.shape) * torch.arange(1, 5).view(4, 1, 1).to(dtype) for t in ts]
    per_chunk = sam_module.chunk_norms(stacked, 4)
    want_chunks = [math.sqrt(sum(float((t[c].double() ** 2).sum()) for t in stacked)) for c in range(4)]
    assert per_chunk.dtype == torch.float32
    for a, b in zip(per_chunk.tolist(), want_chunks):
        assert abs(a - b) <= 1e-6 * b


def test_norms_of_float64_tensors_stay_float64_next_to_half_ones():
    """A float64 norm is never rounded to float32, also in a list that mixes dtypes (the bf16 part,
    small here, has a float32 norm; rounding the float64 part to float32 would be off by ~1e-8)."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(40, generator=g, dtype=torch.float64) * 1e-3 + 1.0
    half = (torch.randn(30, generator=g) * 1e-4).bfloat16()
    want = math.sqrt(float((wide**2).sum()) + float((half.double() ** 2).sum()))
    for ts in ([wide, half], [half, wide]):
        got = sam_module.global_norm(ts)
        assert got.dtype == torch.float64
        assert abs(float(got) - want) <= 1e-12 * want
    alone = sam_module.global_norm([wide])
    assert alone.dtype == torch.float64 and abs(float(alone) - math.sqrt(float((wide**2).sum()))) <= 1e-15 * float(alone)
    per_chunk = sam_module.chunk_norms([wide.reshape(2, 20), half.reshape(2, 15)], 2)
    assert per_chunk.dtype == torch.float64
    for c in range(2):
        want_c = math.sqrt(float((wide.reshape(2, 20)[c] ** 2).sum()) + float((half.reshape(2, 15)[c].double() ** 2).sum()))
        assert abs(float(per_chunk[c]) - want_c) <= 1e-12 * want_c


class _CpuTensorsMade(TorchDispatchMode):
    """Records every op that returns a CPU tensor (with the parameters elsewhere: a host-device copy)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += [str(func) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        return out


@pytest.mark.parametrize("with_grad", [False, True])
def test_a_step_creates_no_cpu_tensor_for_parameters_elsewhere(with_grad):
    """The zeros of a step where no parameter has a gradient (‖g‖, ‖ε‖, the norms of the diagnostics)
    are made on the parameters' device: a CPU tensor would be copied to the GPU (a sync). Meta stands
    in for CUDA. Also: such a step runs (it failed on an empty foreach list with diagnostics on)."""
    p, q = nn.Parameter(torch.ones(3, device="meta")), nn.Parameter(torch.ones(2, device="meta"))
    opt = SAM([p, q], torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, diagnostics=True, grad_clip=1.0)
    assert opt.grad_norm.device.type == "meta"
    with _CpuTensorsMade() as made:
        for _ in range(2):
            for half_step in (opt.first_step, opt.second_step):
                if with_grad:
                    p.grad = torch.ones(3, device="meta")
                half_step(zero_grad=True)
    assert made.ops == []
    assert opt.grad_norm.device.type == "meta" and opt._diag.device.type == "meta"


def test_a_step_without_any_gradient_reports_zero_gradient_norm():
    """‖g‖ of a first pass in which nothing got a gradient is 0, not the previous step's value."""
    p = nn.Parameter(torch.ones(3))
    opt = SAM([p], torch.optim.SGD, rho=0.05, lr=0.1, diagnostics=True)
    p.grad = torch.full((3,), 2.0)
    opt.first_step(zero_grad=True)
    assert float(opt.grad_norm) > 0
    opt.second_step(zero_grad=True)
    opt.first_step(zero_grad=True)
    assert float(opt.grad_norm) == 0.0
    opt.second_step(zero_grad=True)
    assert opt.read_diagnostics()["sam/grad_norm"] == pytest.approx(math.sqrt(12) / 2)


def test_step_with_a_closure_refuses_second_order_before_any_pass():
    """step(closure) cannot compute the Hessian-vector product: it says so, and where to go,
    before the closure runs or a weight moves."""
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = SAM([p], torch.optim.SGD, rho=0.05, lr=0.1, second_order=True)
    p.grad = torch.tensor([0.5, 0.5])
    calls = []
    with pytest.raises(ValueError, match=r"second_order=True .*step\.train_step"):
        opt.step(lambda: calls.append(1))
    assert calls == [] and torch.equal(p.detach(), torch.tensor([1.0, -2.0]))


def test_the_optimizer_imports_without_hydra():
    """sam_bench.optim is a library a user drops into their own loop: importing it (and the m-sharpness
    step) must not pull in Hydra, OmegaConf or the config schema."""
    import subprocess
    import sys

    code = ("import sys, sam_bench.optim, sam_bench.optim.msam, sam_bench.engine.step; "
            "print(sorted(m for m in ('hydra', 'omegaconf', 'sam_bench.schema') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
