"""Table 11's sharpness estimate against an independent float64 reference."""

import copy
import contextlib

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from sam_bench.analysis.sharpness import estimate_sharpness
from sam_bench.engine.step import RngReplay
from sam_bench.optim.sam import SAM

RHO, L2 = 0.8, 5e-3


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 5)).double()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (12,), generator=g)) for _ in range(3)]


def reference(model: nn.Module, data, steps: int) -> float:
    """err(w+ε) − err(w) (%) per batch, averaged: ε by `steps` projected ascent steps on CE + L2/2·‖w‖²,
    every forward in train mode from the same RNG state, BN statistics of the batch, nothing updated."""
    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def forward(params, x, state):
        torch.set_rng_state(state)
        return functional_call(model, (params, {n: b.clone() for n, b in buffers.items()}), (x,))

    def direction(params, x, y, state):
        ps = {n: params[n].clone().requires_grad_(True) for n in names}
        loss = nn.functional.cross_entropy(forward(ps, x, state), y)
        grads = torch.autograd.grad(loss, [ps[n] for n in names])
        grads = [g + L2 * ps[n].detach() for g, n in zip(grads, names)]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        return [RHO * g / norm for g in grads]

    gaps = []
    for x, y in data:
        state = torch.get_rng_state()
        eps = direction(w, x, y, state)
        for _ in range(steps - 1):
            step = direction({n: w[n] + e for n, e in zip(names, eps)}, x, y, state)
            eps = [e + s for e, s in zip(eps, step)]
            norm = torch.sqrt(sum((e * e).sum() for e in eps))
            eps = [e * min(1.0, RHO / norm.item()) for e in eps]
        err = lambda params: (forward(params, x, state).argmax(1) != y).double().mean().item()  # noqa: E731
        gaps.append(100.0 * (err({n: w[n] + e for n, e in zip(names, eps)}) - err(w)))  # RNG left one forward on
    return sum(gaps) / len(gaps)


def test_sharpness_matches_the_reference_and_leaves_the_model_as_it_was():
    for steps in (1, 2, 3):
        model = tiny_model()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, weight_decay=L2, ascent_steps=steps, lr=0.1, momentum=0.9)
        x, y = batches()[0]
        nn.functional.cross_entropy(model(x), y).backward()  # give the base optimizer a momentum buffer
        opt.step(lambda: nn.functional.cross_entropy(model(x), y).backward())
        before = copy.deepcopy(model.state_dict())
        momentum = {k: v["momentum_buffer"].clone() for k, v in opt.base_optimizer.state.items()}

        torch.manual_seed(7)
        want = reference(model, batches(), steps)
        torch.manual_seed(7)
        total, count = estimate_sharpness(model, opt, batches(), nn.CrossEntropyLoss(), contextlib.nullcontext, RngReplay(torch.device("cpu")))
        assert count == 3
        assert abs(total.item() / count - want) < 1e-10, (steps, total.item() / count, want)
        assert want != 0.0  # the perturbation changes some predictions: the comparison is not vacuous
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), steps  # weights and BN statistics
        assert all(torch.equal(momentum[k], v["momentum_buffer"]) for k, v in opt.base_optimizer.state.items())
        assert all(p.grad is None for p in model.parameters())


def test_m_sharpness_runs_measure_each_chunk_of_m_as_its_own_batch():
    """With m = 4 of 12, each chunk gets its own ε and BN statistics: the reference on the chunks."""
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, weight_decay=L2, lr=0.1)
    chunks = [(x[i:i + 4], y[i:i + 4]) for x, y in batches() for i in range(0, 12, 4)]
    torch.manual_seed(7)
    want = reference(model, chunks, 1)
    torch.manual_seed(7)
    total, count = estimate_sharpness(model, opt, batches(), nn.CrossEntropyLoss(), contextlib.nullcontext, RngReplay(torch.device("cpu")), m=4)
    assert count == 9 and abs(total.item() / count - want) < 1e-10
    torch.manual_seed(7)
    whole = estimate_sharpness(model, opt, batches(), nn.CrossEntropyLoss(), contextlib.nullcontext, RngReplay(torch.device("cpu")))
    assert whole[1] == 3 and abs(whole[0].item() / 3 - want) > 1e-6  # the chunking changes the figure


def test_a_run_with_final_sharpness_fills_table11(tmp_path):
    """trainer.final_sharpness=true: result.json gets final_sharpness, and the report puts it (and
    the test error) in Table 11's row for the run's number of ascent steps."""
    import json

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sam_bench.cli import _register
    from sam_bench.engine.trainer import fit
    from sam_bench.paths import config_dir
    from sam_bench.report import write_report

    _register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "dataset=synthetic", "dataset.train_size=128", "dataset.test_size=64", "model=wrn", "model.kwargs.depth=10",
            "model.kwargs.width=1", "trainer.batch_size=32", "trainer.epochs=1", "trainer.progress=false",
            "optimizer.ascent_steps=2", "trainer.final_sharpness=true", "name=table11/k2/cifar10"])
    GlobalHydra.instance().clear()
    result = fit(cfg, tmp_path / "runs" / "r")
    assert isinstance(result["final_sharpness"], float)
    assert json.loads((tmp_path / "runs" / "r" / "result.json").read_text())["final_sharpness"] == result["final_sharpness"]
    # the Table 11 cells read final_test_error and final_sharpness from such a run ...
    from sam_bench.report.collect import find_runs, group_runs
    from sam_bench.report.paper import layouts
    from sam_bench.report.tables import measure

    (row,) = [cells for label, cells in next(lay for lay in layouts() if lay.id == "table11").rows if label == ("2",)]
    error_cell, sharpness_cell = row[0], row[1]
    by_key = {error_cell.key: group_runs(find_runs([str(tmp_path / "runs")])[0])}
    assert measure(error_cell, by_key).values == [result["final_test_error"]]
    assert measure(sharpness_cell, by_key).values == [result["final_sharpness"]]
    # ... but this tiny synthetic one is not the preset's experiment: the report names it below the table instead
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    table = (tmp_path / "out" / "table11.md").read_text()
    assert "runs named `table11/k2/cifar10` that change the preset" in table


class Shake(nn.Module):
    """Stands for a Shake-Shake/ShakeDrop layer: only its ``true_gradient`` flag matters here."""

    def __init__(self):
        super().__init__()
        self.true_gradient = False

    def forward(self, x):
        return x


def test_the_model_leaves_with_the_modes_and_true_gradient_it_came_with():
    for bn_frozen in (False, True):
        model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), Shake(), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 5),
                              Shake()).double()
        model.eval()  # an evaluation model ...
        model[4].train()  # ... with one module in training mode (flags are per module, not the model's)
        model[2].true_gradient = True  # and two shake layers in different states
        modes = [m.training for m in model.modules()]
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, weight_decay=L2, lr=0.1)
        estimate_sharpness(model, opt, batches(), nn.CrossEntropyLoss(), contextlib.nullcontext,
                           RngReplay(torch.device("cpu")), bn_frozen=bn_frozen)
        assert [m.training for m in model.modules()] == modes, bn_frozen
        assert model[2].true_gradient is True and model[6].true_gradient is False


def test_the_shake_layers_run_with_true_gradient_on_during_the_estimate():
    seen = []

    class Watch(Shake):
        def forward(self, x):
            seen.append((self.true_gradient, self.training))
            return x

    model = nn.Sequential(nn.Linear(6, 5), Watch()).double().eval()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    estimate_sharpness(model, opt, batches()[:1], nn.CrossEntropyLoss(), contextlib.nullcontext)
    assert seen and all(s == (True, True) for s in seen)
    assert model[1].true_gradient is False and not model.training


def test_an_estimate_interrupted_between_ascent_and_restore_leaves_the_weights_at_w():
    """A Ctrl-C (or any error) in the perturbed pass: the weights go back to w, not left at w + ε."""
    calls = []

    class StopOnThird(nn.Module):
        def forward(self, x):
            calls.append(1)
            if len(calls) == 3:  # clean pass, second ascent pass (k = 2), then the pass at w + ε
                raise KeyboardInterrupt
            return x

    model = nn.Sequential(nn.Linear(6, 5), StopOnThird()).double()
    w = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, ascent_steps=2)
    with pytest.raises(KeyboardInterrupt):
        estimate_sharpness(model, opt, batches()[:1], nn.CrossEntropyLoss(), contextlib.nullcontext)
    assert len(calls) == 3 and all(torch.equal(p, a) for p, a in zip(model.parameters(), w))
    assert all(p.grad is None for p in model.parameters())
