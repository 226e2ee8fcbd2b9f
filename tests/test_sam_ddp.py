"""DDP SAM on 2 CPU processes (gloo): each rank perturbs with its own gradient, so 2-rank SAM equals
single-process m-sharpness with m = per-rank batch (weights and averaged BN statistics)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from sam_bench.engine.step import train_step
from sam_bench.optim import SAM, batchnorm_modules

N, M, STEPS = 8, 4, 2
VARIANTS = ("clean", "sync", "both", "k3", "sgd")
NO_AMP = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731


def model_and_opt(k: int = 1, rho: float = 0.05):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, weight_decay=5e-4, grad_clip=5.0, lr=0.1, momentum=0.9, nesterov=True,
              ascent_steps=k)
    return model, opt


def batch(step):
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for variant in VARIANTS:
            _train(rank, f"{out}_{variant}")
    finally:
        dist.destroy_process_group()


def _train(rank: int, out: str) -> None:
    """Train on this rank's half of each batch; save the model state to ``out.<rank>``. Variant
    "clean": BN statistics from the clean pass; "sync": synchronised ascent; "both": BN statistics
    from both passes; "k3": 3 projected ascent steps per rank (Table 11); "sgd": ρ = 0, one pass."""
    sync, both, k = out.endswith("_sync"), out.endswith("_both"), 3 if out.endswith("_k3") else 1
    model, _ = model_and_opt()
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)  # as the trainer: BN state averaged by the step
    opt = SAM(ddp.parameters(), torch.optim.SGD, rho=0.0 if out.endswith("_sgd") else 0.05, weight_decay=5e-4, grad_clip=5.0, lr=0.1, momentum=0.9, nesterov=True,
              ascent_steps=k)
    for s in range(STEPS):
        x, y = batch(s)
        sl = slice(rank * M, (rank + 1) * M)
        train_step(ddp, opt, x[sl], y[sl], F.cross_entropy, NO_AMP, None if both else batchnorm_modules(model), sync_perturbation=sync)
    torch.save(model.state_dict(), f"{out}.{rank}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """{variant: (rank-0 state, rank-1 state)} from one 2-process run (spawning is the slow part)."""
    out = str(tmp_path_factory.mktemp("ddp") / "state")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return {v: (torch.load(f"{out}_{v}.0"), torch.load(f"{out}_{v}.1")) for v in VARIANTS}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["clean", "both", "k3", "sgd"])
def test_two_rank_sam_equals_m_sharpness(ddp_results, variant):
    """Weights and BN running statistics; with BN mode "both" the perturbed pass's statistics are
    averaged over ranks too (as m-sharpness averages them over chunks); with k = 3 ascent steps
    each rank ascends on its own half as each chunk of m does. SGD: 2 ranks normalise BN each over
    its own half and average the running statistics, as one process with m = per-rank batch does
    (before, SGD never averaged them: each rank evaluated with its own)."""
    got, other = ddp_results[variant]
    model, opt = model_and_opt(3 if variant == "k3" else 1, rho=0.0 if variant == "sgd" else 0.05)
    for s in range(STEPS):
        x, y = batch(s)
        train_step(model, opt, x, y, F.cross_entropy, NO_AMP, None if variant == "both" else batchnorm_modules(model), m=M)
    for (name, want), a, b in zip(model.state_dict().items(), got.values(), other.values()):
        torch.testing.assert_close(a, want, rtol=0, atol=1e-10, msg=name)
        torch.testing.assert_close(b, want, rtol=0, atol=1e-10, msg=name)  # ranks agree
    if variant == "k3":  # the extra ascent steps changed the result
        assert max(float((a - b).abs().max()) for a, b in zip(got.values(), ddp_results["clean"][0].values())
                   if a.is_floating_point()) > 1e-8


@pytest.mark.slow
def test_sync_perturbation_differs_from_per_rank(ddp_results):
    """With synchronised ascent gradients the result is no longer m-sharpness (guard that the
    option does something and that the test above can fail)."""
    got, _ = ddp_results["sync"]
    model, opt = model_and_opt()
    for s in range(STEPS):
        x, y = batch(s)
        train_step(model, opt, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model), m=M)
    diff = max(float((a - b).abs().max()) for a, b in zip(got.values(), model.state_dict().values()) if a.is_floating_point())
    assert diff > 1e-8


def _frozen_worker(rank, world, port, out):
    """The DDP path of train_step (no_sync, preload_l2, BN averaging) on a 1-rank group, beside the
    plain step, with a parameter frozen after the optimizer was built."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        states = []
        for use_ddp in (False, True):
            model, opt = model_and_opt()
            model[0].bias.requires_grad_(False)
            net = nn.parallel.DistributedDataParallel(model) if use_ddp else model
            for s in range(STEPS):
                x, y = batch(s)
                train_step(net, opt, x, y, F.cross_entropy, NO_AMP, batchnorm_modules(model))
            states.append(model.state_dict())
        torch.save(states, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_step_leaves_a_frozen_parameter_alone_as_the_plain_step_does(tmp_path):
    """Under DDP the L2 term is put in p.grad before the perturbed backward (preload_l2): it went to
    every parameter, so one frozen after the optimizer was built moved by -lr·wd·w per step. Now only
    the parameters with a clean-pass gradient get it, and the DDP step equals the plain one."""
    out = str(tmp_path / "states")
    mp.spawn(_frozen_worker, args=(1, _free_port(), out), nprocs=1, join=True)
    plain, ddp = torch.load(out)
    model, _ = model_and_opt()
    torch.testing.assert_close(plain["0.bias"], model[0].bias.detach(), rtol=0, atol=0)
    for key in plain:
        torch.testing.assert_close(ddp[key], plain[key], rtol=0, atol=1e-12, msg=key)
    assert not torch.equal(plain["0.weight"], model[0].weight.detach())  # it trained
