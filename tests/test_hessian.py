"""The Hessian spectrum (Fig. 3 left): H·v against an explicit float64 Hessian, Lanczos against
eigvalsh, kept epoch checkpoints, and `sam-bench hessian` end to end."""

from __future__ import annotations

import json
import subprocess

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from conftest import sam_bench_cmd, sam_bench_forked
import sam_bench.models  # noqa: F401  (registers the CIFAR models with timm)
from sam_bench.analysis.hessian import LossHessian, lanczos, top_eigenvalues
from sam_bench.data import load_arrays


def small_net() -> nn.Module:
    """Conv, BatchNorm (eval, non-trivial running statistics), tanh, linear: every kind of curvature."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


def batches_of(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)) for n in sizes]


def explicit_hessian(net: nn.Module, batches) -> torch.Tensor:
    """d²/dw² of the mean cross-entropy over all images of ``batches``, as one dense float64 matrix."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = flat.split([s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes)}
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    w = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return torch.autograd.functional.hessian(loss, w)


def test_hessian_vector_products_match_the_explicit_float64_hessian():
    net = small_net()
    batches = batches_of([5, 3])  # unequal batches: each must count by its share of the images
    h = explicit_hessian(net, batches)
    op = LossHessian(net, batches, nn.CrossEntropyLoss())
    assert op.dim == h.shape[0] and op.images == 8
    assert torch.allclose(h, h.T, atol=1e-12)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(op.dim, generator=g, dtype=torch.float64)
        assert torch.allclose(op(v), h @ v, rtol=0, atol=1e-10)
    # weights untouched, no gradient left behind
    assert all(p.grad is None for p in net.parameters())


def test_lanczos_top_eigenvalues_match_eigvalsh_and_respect_their_residual_bounds():
    net = small_net()
    batches = batches_of([6])
    h = explicit_hessian(net, batches)
    exact = torch.linalg.eigvalsh(h).flip(0)
    op = LossHessian(net, batches, nn.CrossEntropyLoss())
    v0 = torch.randn(op.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    full, _ = lanczos(op, v0, op.dim)  # the whole Krylov space: every eigenvalue Lanczos can see
    assert torch.allclose(full[:5], exact[:5], rtol=0, atol=1e-8)
    values, residuals = lanczos(op, v0, 20)  # a partial run: each Ritz value is within its bound of some eigenvalue
    for theta, r in zip(values, residuals):
        assert (exact - theta).abs().min() <= r + 1e-9
    assert abs(values[0] - exact[0]) < 1e-6 * exact[0]  # the top one has converged after 20 steps


def test_lanczos_stops_when_the_krylov_space_is_exhausted():
    diag = torch.tensor([5.0, 5.0, 3.0, 1.0, 3.0, 1.0, 5.0], dtype=torch.float64)  # three distinct eigenvalues
    calls = []

    def matvec(v):
        calls.append(1)
        return diag * v

    values, residuals = lanczos(matvec, torch.ones(7, dtype=torch.float64), 7)
    assert len(calls) == 3
    assert torch.allclose(values, torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64), atol=1e-12)
    assert residuals.max() < 1e-9


def test_top_eigenvalues_reports_ratio_and_convergence():
    net = small_net()
    op = LossHessian(net, batches_of([6]), nn.CrossEntropyLoss())
    exact = torch.linalg.eigvalsh(explicit_hessian(net, batches_of([6]))).flip(0)
    out = top_eigenvalues(op, k=3, iters=op.dim, seed=0)
    assert out["eigenvalues"] == sorted(out["eigenvalues"], reverse=True) and len(out["eigenvalues"]) == 3
    assert out["lambda_max"] == pytest.approx(exact[0].item(), rel=1e-9)
    assert out["lambda_max_over_lambda_3"] == pytest.approx((exact[0] / exact[2]).item(), rel=1e-7)
    assert out["converged"] == [True, True, True] and out["images"] == 6 and out["num_params"] == op.dim
    with pytest.raises(ValueError, match="top_k"):
        top_eigenvalues(op, k=0)


TINY = ["dataset=synthetic", "dataset.train_size=128", "dataset.test_size=64", "model.kwargs.depth=10", "model.kwargs.width=1",
        "trainer.batch_size=32", "trainer.eval_batch_size=64", "trainer.epochs=2", "trainer.progress=false", "optimizer=sam"]


def run(args, env, check=True, forked=False):
    """`sam-bench <args>` in a subprocess; ``forked``: in a pre-imported child (conftest.sam_bench_forked),
    for a run a test starts from and for more of a command the test has run for real already."""
    if forked:
        proc = sam_bench_forked(args, env)
    else:
        proc = subprocess.run(sam_bench_cmd() + args, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_hessian_command_on_a_kept_epoch_checkpoint(cli_env, tmp_path):
    run_dir = tmp_path / "optimizer=sam,seed=0"  # named as sam-bench names runs: "=" and "," in the path
    run(["train", *TINY, "trainer.keep_epochs=[1]", f"hydra.run.dir='{run_dir}'"], cli_env, forked=True)
    kept = run_dir / "checkpoint_epoch0001.pt"
    # after 2 epochs the previous checkpoint is epoch 1's: the kept copy is that file, byte for byte
    assert kept.read_bytes() == (run_dir / "checkpoint.prev.pt").read_bytes()
    assert not (run_dir / "checkpoint_epoch0002.pt").exists()

    out = run(["hessian", f"checkpoint={kept}", "images=0", "iters=6", "top_k=3", "batch_size=50"], cli_env).stdout  # unquoted
    result = json.loads((run_dir / "hessian_checkpoint_epoch0001.json").read_text())
    assert result["epoch"] == 1 and result["images"] == 128 and result["optimizer"] == "sam"
    from sam_bench.schema import experiment_hash
    assert result["experiment_hash"] == experiment_hash(json.loads((run_dir / "result.json").read_text())["config"])
    assert len(result["eigenvalues"]) == 3 and result["eigenvalues"] == sorted(result["eigenvalues"], reverse=True)
    assert result["lambda_max_over_lambda_3"] == pytest.approx(result["eigenvalues"][0] / result["eigenvalues"][2])
    assert "lambda_max" in out and str(run_dir / "hessian_checkpoint_epoch0001.json") in out
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where out= needs a directory: refused before any computation
    proc = run(["hessian", f"checkpoint={kept}", f"out={blocked / 'x.json'}"], cli_env, check=False, forked=True)
    assert proc.returncode == 2 and f"output directory {blocked} is not writable" in proc.stderr, proc.stderr
    assert "choose a writable place with out=/path/to/spectrum.json" in proc.stderr  # a file: not "out=/path/to/dir" (QA)

    # independently: the epoch-1 weights in eval mode on all 128 training images (order does not
    # change a mean) give the loss the command reports
    state = torch.load(kept, weights_only=True)
    model = timm.create_model("wide_resnet_cifar", depth=10, width=1, num_classes=10)
    model.load_state_dict(state["model"])
    from omegaconf import OmegaConf

    ds = OmegaConf.create(state["config"]["dataset"])
    x, y, _, _ = load_arrays(ds)
    mean, std = (torch.tensor(list(v)).view(1, -1, 1, 1) for v in (ds.mean, ds.std))
    with torch.no_grad():
        loss = F.cross_entropy(model.eval()((x.float() / 255 - mean) / std), y).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.slow
def test_hessian_command_bad_input_is_one_line(cli_env, tmp_path):
    proc = run(["hessian"], cli_env, check=False)  # a real process; the rest in pre-imported children
    assert proc.returncode == 2 and "checkpoint=... is missing" in proc.stderr
    proc = run(["hessian", f"checkpoint={tmp_path / 'nope.pt'}"], cli_env, check=False, forked=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run(["hessian", f"checkpoint={tmp_path / 'empty'}"], cli_env, check=False, forked=True)
    assert proc.returncode == 2 and "holds no checkpoint" in proc.stderr
    proc = run(["hessian", f"checkpoint={tmp_path / 'nope.pt'}", "top_k=5", "iters=3"], cli_env, check=False, forked=True)
    assert proc.returncode == 2 and "iters >= top_k" in proc.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    proc = run(["hessian", f"checkpoint={tmp_path / 'junk.pt'}"], cli_env, check=False, forked=True)
    assert proc.returncode == 2 and "not a readable sam-bench checkpoint" in proc.stderr


def test_streamed_datasets_are_refused_with_the_reason():
    from sam_bench.analysis.spectrum import training_images
    from sam_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="in-memory datasets .* this checkpoint trained on imagenet"):
        training_images({"dataset": {"name": "imagenet"}}, 100, 10, 0, torch.device("cpu"), None)


def fake_spectrum(path, arch, dataset, optimizer, rho, epoch, eigenvalues, converged=True, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    k = len(eigenvalues)
    spectrum = {"arch": arch, "dataset": dataset, "optimizer": optimizer, "rho": rho, "epoch": epoch, "images": 5000,
                "eigenvalues": eigenvalues, "lambda_max": eigenvalues[0], f"lambda_max_over_lambda_{k}": eigenvalues[0] / eigenvalues[-1], **extra}
    if converged is not None:
        spectrum["converged"] = [converged] * k
    path.write_text(json.dumps(spectrum))


def test_report_puts_spectra_beside_fig3_left(tmp_path):
    from sam_bench.report import write_report

    runs = tmp_path / "runs"
    fake_spectrum(runs / "sgd_s0" / "hessian_checkpoint_epoch0300.json", "wrn40_10_nobn", "cifar10", "sgd", 0.0, 300, [20.0, 8, 6, 4, 2.0])
    fake_spectrum(runs / "sgd_s1" / "hessian_checkpoint_epoch0300.json", "wrn40_10_nobn", "cifar10", "sgd", 0.0, 300, [30.0, 9, 7, 5, 2.5])
    fake_spectrum(runs / "sgd_s1" / "hessian_checkpoint_epoch0050.json", "wrn40_10_nobn", "cifar10", "sgd", 0.0, 50, [10.0, 9, 7, 5, 4.0])
    fake_spectrum(runs / "sam_a" / "hessian_checkpoint_epoch0001.json", "wrn40_10_nobn", "cifar10", "sam", 0.05, 1, [18.0, 9, 8, 7, 5.0])
    fake_spectrum(runs / "sam_b" / "hessian_checkpoint_epoch0001.json", "wrn40_10_nobn", "cifar10", "sam", 0.1, 1, [12.0, 9, 8, 7, 5.0])
    fake_spectrum(runs / "other" / "hessian_checkpoint.json", "wrn_mini", "synthetic", "sam", 0.05, 2, [3.0, 1.5], converged=None)
    (runs / "broken").mkdir()
    (runs / "broken" / "hessian_checkpoint.json").write_text("{not json")
    write_report([str(runs)], str(tmp_path / "out"))
    md = (tmp_path / "out" / "hessian.md").read_text()
    assert "| SGD | 300 | 24.2 | 25 (2) | 11.4 | 11 (2) |" in md  # means over the two seeds: 25 and (10 + 12) / 2
    assert "| SGD | 1 | 62.9 | — | 2.5 | — |" in md and "| SGD | 50 | 12.5 | 10 (1) | 1.7 | 2.5 (1) |" in md
    assert "| SAM | 1 | 18.6 | several ρ (0.05, 0.1): see the list |" in md  # two experiments are not averaged
    grouped = md.split("## By experiment")[1].split("## Every spectrum")[0]
    assert "| None | wrn40_10_nobn | cifar10 | sgd | 0.0 | 300 | 5000 | 25 ± 7.07 | 11 ± 1.41 (5) | 2 |" in grouped  # std of 20, 30
    assert grouped.count("| sam | 0.05 |") == 2 and "| sam | 0.1 | 1 | 5000 | 12 | 2.4 (5) | 1 |" in grouped
    sgd_epochs = [line.split(" | ")[5] for line in grouped.splitlines() if "| wrn40_10_nobn | cifar10 | sgd |" in line]
    assert sgd_epochs == ["50", "300"]  # numeric order, not "300" before "50"
    listed = md.split("## Every spectrum measured")[1]
    assert listed.count("hessian_") == 6 and "broken" not in listed
    assert "| wrn_mini | synthetic | sam | 0.05 | 2 | 5000 | 3, 1.5 | 2 | — |" in listed  # no convergence record: not claimed
    assert "5 of 5" in listed
    assert "[Hessian spectra, Fig. 3 left](hessian.md): 6 spectra" in (tmp_path / "out" / "README.md").read_text()


def test_a_spectrum_measured_again_is_not_another_training_seed(tmp_path):
    """The README's convergence check (lanczos_seed=1 on the same checkpoint) gives a second file
    for one training run: the mean over training seeds counts that run once."""
    from sam_bench.report import write_report

    runs = tmp_path / "runs"
    args = ("wrn40_10_nobn", "cifar10", "sgd", 0.0, 300)
    fake_spectrum(runs / "s0" / "hessian_checkpoint_epoch0300.json", *args, [20.0, 8, 6, 4, 2.0], training_seed=0, lanczos_seed=0)
    fake_spectrum(runs / "s0" / "hessian_again.json", *args, [20.5, 8, 6, 4, 2.0], training_seed=0, lanczos_seed=1)
    fake_spectrum(runs / "s1" / "hessian_checkpoint_epoch0300.json", *args, [30.0, 9, 7, 5, 2.5], training_seed=1, lanczos_seed=0)
    write_report([str(runs)], str(tmp_path / "out"))
    md = (tmp_path / "out" / "hessian.md").read_text()
    assert "| SGD | 300 | 24.2 | 25 (2) | 11.4 | 11 (2) |" in md  # seeds 0 and 1, the restart not counted
    grouped = md.split("## By experiment")[1].split("## Every spectrum")[0]
    assert "| 25 ± 7.07 | 11 ± 1.41 (5) | 2 |" in grouped
    assert md.split("## Every spectrum measured")[1].count("hessian_") == 3  # every file still listed


def test_spectra_of_one_name_with_other_settings_are_other_experiments(tmp_path):
    """Runs of one experiment name that differ in a setting other than the seed (here the lr, so
    another experiment_hash) are never averaged together, in the paper's panel or the grouped table;
    the seeds of one experiment still are."""
    from sam_bench.report import write_report
    from sam_bench.schema import experiment_hash

    def config(lr, seed):
        return {"name": "fig3/hessian", "optimizer": {"name": "sgd", "lr": lr, "rho": 0.0}, "seed": seed}

    assert experiment_hash(config(0.1, 0)) == experiment_hash(config(0.1, 1)) != experiment_hash(config(0.05, 0))
    runs = tmp_path / "runs"
    args = ("wrn40_10_nobn", "cifar10", "sgd", 0.0, 300)
    for lr, seed, lam in ((0.1, 0, 20.0), (0.1, 1, 30.0), (0.05, 0, 100.0)):
        fake_spectrum(runs / f"lr{lr}_s{seed}" / "hessian_checkpoint_epoch0300.json", *args, [lam, 8, 6, 4, 2.0],
                      name="fig3/hessian", training_seed=seed, experiment_hash=experiment_hash(config(lr, seed)))
    write_report([str(runs)], str(tmp_path / "out"))
    md = (tmp_path / "out" / "hessian.md").read_text()
    h1, h2 = experiment_hash(config(0.1, 0)), experiment_hash(config(0.05, 0))
    assert f"| SGD | 300 | 24.2 | several configurations ({', '.join(sorted((h1, h2)))}): see the list |" in md
    grouped = md.split("## By experiment")[1].split("## Every spectrum")[0]
    assert f"| fig3/hessian [{h1}] | wrn40_10_nobn | cifar10 | sgd | 0.0 | 300 | 5000 | 25 ± 7.07 |" in grouped
    assert f"| fig3/hessian [{h2}] | wrn40_10_nobn | cifar10 | sgd | 0.0 | 300 | 5000 | 100 |" in grouped


def test_sgd_spectra_whatever_their_rho_are_one_experiment(tmp_path):
    """SGD ignores optimizer.rho (and the SAM-only keys), so SGD runs launched with other rho values
    are one experiment in hessian.md, as in the error tables; SAM runs at other rho are not."""
    from sam_bench.report import write_report
    from sam_bench.schema import experiment_hash

    def config(name, rho, seed, **extra):
        return {"name": "fig3/hessian", "optimizer": {"name": name, "lr": 0.1, "rho": rho, **extra}, "seed": seed}

    assert experiment_hash(config("sgd", 0.05, 0)) == experiment_hash(config("sgd", 0.1, 1, p="inf", ascent_steps=3)) \
        == experiment_hash(config("sgd", 0.0, 2, diagnostics=True))
    assert experiment_hash(config("sam", 0.05, 0)) != experiment_hash(config("sam", 0.1, 0))
    assert experiment_hash(config("sgd", 0.05, 0, m=32)) != experiment_hash(config("sgd", 0.05, 0))  # BN per chunk of m
    runs = tmp_path / "runs"
    for rho, seed, lam in ((0.05, 0, 20.0), (0.1, 1, 30.0)):  # as spectrum.py records them: rho as configured
        fake_spectrum(runs / f"rho{rho}_s{seed}" / "hessian_checkpoint_epoch0300.json", "wrn40_10_nobn", "cifar10", "sgd",
                      rho, 300, [lam, 8, 6, 4, 2.0], name="fig3/hessian", method="sgd", training_seed=seed,
                      experiment_hash=experiment_hash(config("sgd", rho, seed)))
    write_report([str(runs)], str(tmp_path / "out"))
    md = (tmp_path / "out" / "hessian.md").read_text()
    assert "several configurations" not in md
    assert "| SGD | 300 | 24.2 | 25 (2) |" in md


def test_spectra_hashed_before_and_after_experiment_hash_changed_are_one_experiment(tmp_path):
    """The report computes each spectrum's experiment from its run's config (result.json, else
    .hydra/config.yaml) when it is there, so a file written when experiment_hash was defined otherwise
    (here "5900bc0912b7") groups with a newer file of another seed of the same experiment."""
    from sam_bench.report import write_report
    from sam_bench.schema import experiment_hash

    runs = tmp_path / "runs"
    config = {"name": "x", "optimizer": {"name": "sam", "lr": 0.1, "rho": 0.05, "diagnostics": True}}
    for seed, lam, stored in ((0, 20.0, "5900bc0912b7"), (1, 30.0, None)):
        run_dir = runs / f"s{seed}"
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "config.yaml").write_text(json.dumps({**config, "seed": seed}))  # JSON is YAML
        fake_spectrum(run_dir / "hessian_checkpoint_epoch0300.json", "wrn40_10_nobn", "cifar10", "sam", 0.05, 300,
                      [lam, 8, 6, 4, 2.0], name="x", method="sam", training_seed=seed, checkpoint=str(run_dir / "checkpoint_epoch0300.pt"),
                      experiment_hash=stored or experiment_hash({**config, "seed": seed}))
    write_report([str(runs)], str(tmp_path / "out"))
    md = (tmp_path / "out" / "hessian.md").read_text()
    assert "| SAM | 300 |" in md and "25 (2)" in md and "several configurations" not in md


def test_a_spectrum_from_before_experiment_hash_is_not_another_seed_of_its_run(tmp_path):
    """A file written before spectra recorded experiment_hash, beside newer ones of the same
    training run (a convergence check measured later): the paper's panel counts that run once."""
    from sam_bench.report import write_report

    runs = tmp_path / "runs"
    args = ("wrn40_10_nobn", "cifar10", "sgd", 0.0, 300)
    fake_spectrum(runs / "s0" / "hessian_old.json", *args, [20.0, 8, 6, 4, 2.0], name="x", training_seed=0, lanczos_seed=0)
    fake_spectrum(runs / "s0" / "hessian_new.json", *args, [20.5, 8, 6, 4, 2.0], name="x", training_seed=0, lanczos_seed=1,
                  experiment_hash="abc")
    fake_spectrum(runs / "s1" / "hessian_new.json", *args, [30.0, 9, 7, 5, 2.5], name="x", training_seed=1, lanczos_seed=0,
                  experiment_hash="abc")
    write_report([str(runs)], str(tmp_path / "out"))
    assert "| SGD | 300 | 24.2 | 25 (2) | 11.4 | 11 (2) |" in (tmp_path / "out" / "hessian.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hessian_on_cuda_in_float32_matches_the_float64_explicit_hessian():
    """On CUDA the products run in float32 with TF32 off (exact_float32): the top eigenvalues of a
    conv net match the float64 CPU eigvalsh to float32 accuracy (on the CPU in float32: 8e-8)."""
    from sam_bench.analysis.hessian import exact_float32

    net = small_net()
    batches = batches_of([64, 32])
    exact = torch.linalg.eigvalsh(explicit_hessian(net, batches)).flip(0)
    cuda_batches = [(x.float().cuda(), y.cuda()) for x, y in batches]
    with exact_float32():
        out = top_eigenvalues(LossHessian(net.float().cuda(), cuda_batches, nn.CrossEntropyLoss()), k=3, iters=40)
    assert torch.allclose(torch.tensor(out["eigenvalues"], dtype=torch.float64), exact[:3], rtol=1e-4, atol=0)


# --- the analysis of a checkpoint in-process (fast: a checkpoint of an untrained tiny model) ---

FAST = ["dataset=synthetic", "dataset.train_size=40", "dataset.test_size=20", "dataset.image_size=8", "model=wrn",
        "model.kwargs.depth=10", "model.kwargs.width=1", "optimizer=sam"]


@pytest.fixture
def write_checkpoint(tmp_path):
    """write_checkpoint(run_dir, partial=None, model_kwargs=None): a verified checkpoint as sam-bench
    train writes it, of an untrained tiny WRN (the config says depth 10 unless ``model_kwargs``
    changes what it says, not the weights); ``partial``: the accumulators of a mid-epoch one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from sam_bench.cli import _register
    from sam_bench.engine import checkpoint as ckpt
    from sam_bench.models import build_model
    from sam_bench.paths import config_dir

    _register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        config = OmegaConf.to_container(compose(config_name="train", overrides=FAST), resolve=True, enum_to_str=True)
    GlobalHydra.instance().clear()

    def write(run_dir, partial=None, model_kwargs=None, epoch=3, step=30, **extra):
        model = build_model(config["model"]["arch"], 10, 3, **config["model"]["kwargs"])
        saved = {**config, "model": {**config["model"], "kwargs": {**config["model"]["kwargs"], **(model_kwargs or {})}}}
        run_dir.mkdir(parents=True, exist_ok=True)
        return ckpt.save_checkpoint(run_dir, {"epoch": epoch, "step": step, "partial": partial, "model": model.state_dict(),
                                              "optimizer": {}, "rng": {}, "history": [], "train_time": 0.0, "config": saved,
                                              "config_hash": "x", **extra})
    return write


def hessian_cfg(checkpoint, **overrides):
    from omegaconf import OmegaConf

    return OmegaConf.create({"checkpoint": str(checkpoint), "images": 8, "batch_size": 8, "top_k": 1, "iters": 2, "seed": 0,
                             "lanczos_seed": 0, "device": "cpu", "data_root": None, "out": None, **overrides})


def test_a_mid_epoch_checkpoint_is_recorded_and_said_as_such(write_checkpoint, tmp_path):
    from sam_bench.analysis.spectrum import describe, hessian_spectrum

    newest = write_checkpoint(tmp_path / "run", partial={"epoch_step": 7, "seen": 0, "loss_sum": torch.zeros(()),
                                                         "correct": torch.zeros((), dtype=torch.long), "time_s": 0.0}, step=37)
    result = hessian_spectrum(hessian_cfg(tmp_path / "run"))
    assert result["checkpoint"] == str(newest)
    written = json.loads((tmp_path / "run" / "hessian_checkpoint.json").read_text())
    assert written["epoch"] == 3 and written["step"] == 37 and written["mid_epoch"] is True and written["epoch_step"] == 7
    assert "epoch 3 + 7 steps" in describe(result) and "mid-epoch" in describe(result)

    write_checkpoint(tmp_path / "end")  # an epoch's end: partial None
    result = hessian_spectrum(hessian_cfg(tmp_path / "end"))
    assert result["mid_epoch"] is False and result["epoch_step"] is None
    assert "epoch 3 (step 30" in describe(result) and "mid-epoch" not in describe(result)


def test_a_checkpoint_without_compute_version_is_measured_with_a_warning(write_checkpoint, tmp_path, capsys):
    """A checkpoint written before compute_version existed may come from code with the old strided
    padding (another function): the spectrum is measured, with a warning saying so; the version of a
    newer checkpoint is recorded in the JSON."""
    from sam_bench.analysis.spectrum import hessian_spectrum
    from sam_bench.schema import COMPUTE_VERSION

    write_checkpoint(tmp_path / "old")
    assert hessian_spectrum(hessian_cfg(tmp_path / "old"))["compute_version"] is None
    assert "records no compute_version" in capsys.readouterr().err
    write_checkpoint(tmp_path / "new", compute_version=COMPUTE_VERSION)
    assert hessian_spectrum(hessian_cfg(tmp_path / "new"))["compute_version"] == COMPUTE_VERSION
    assert "compute_version" not in capsys.readouterr().err


def test_a_mid_epoch_spectrum_stands_for_no_epoch_in_the_report(tmp_path):
    """The newest checkpoint of a preempted run (3 epochs + 27 steps) beside the kept copy of epoch 3:
    the paper's panel and the per-epoch mean take the epoch's end only, whichever file sorts first."""
    from sam_bench.report.spectra import find_spectra, one_per_training_seed, spectra_markdown

    runs = tmp_path / "runs"
    args = ("wrn40_10_nobn", "cifar10", "sgd", 0.0, 300)
    common = dict(training_seed=0, lanczos_seed=0, method="sgd", experiment_hash="abc")
    fake_spectrum(runs / "s0" / "hessian_checkpoint.json", *args, [99.0, 8, 6, 4, 2.0], step=3027, mid_epoch=True, epoch_step=27,
                  checkpoint=str(runs / "s0" / "checkpoint.pt"), **common)
    fake_spectrum(runs / "s0" / "hessian_checkpoint_epoch0300.json", *args, [20.0, 8, 6, 4, 2.0], step=3000, mid_epoch=False,
                  epoch_step=None, checkpoint=str(runs / "s0" / "checkpoint_epoch0300.pt"), **common)
    spectra = find_spectra([str(runs)])
    assert [s["path"].endswith("epoch0300.json") for s in one_per_training_seed(spectra)] == [True]
    md = spectra_markdown(spectra)
    assert "| SGD | 300 | 24.2 | 20 (1) | 11.4 | 10 (1) |" in md  # the epoch's end only, not a mean with 99
    grouped = md.split("## By experiment")[1].split("## Every spectrum")[0]
    assert "| sgd | 0.0 | 300 | 5000 | 20 | 10 (5) | 1 |" in grouped
    assert "| sgd | 0.0 | 300 + 27 steps | 5000 | 99 | 49.5 (5) | 1 |" in grouped
    listed = md.split("## Every spectrum measured")[1]
    assert "| 300 + 27 steps |" in listed and listed.count("hessian_") == 2

    # files from before mid_epoch was recorded: the same run directory at the same epoch and a higher step is past its end
    old = tmp_path / "old"
    for name, step, top in (("checkpoint", 3027, 99.0), ("checkpoint_epoch0300", 3000, 20.0)):
        fake_spectrum(old / "s0" / f"hessian_{name}.json", *args, [top, 8, 6, 4, 2.0], step=step,
                      checkpoint=str(old / "s0" / f"{name}.pt"), **common)
    md = spectra_markdown(find_spectra([str(old)]))
    assert "| SGD | 300 | 24.2 | 20 (1) | 11.4 | 10 (1) |" in md and "| 300 + 27 steps |" in md.split("## Every spectrum measured")[1]


def test_a_negative_smallest_eigenvalue_gives_no_ratio():
    class Diagonal:  # H = diag(3, 2, -1): λ_3 < 0
        params = [torch.zeros(3, dtype=torch.float64)]
        dim, images = 3, 1

        def __call__(self, v):
            return torch.tensor([3.0, 2.0, -1.0], dtype=torch.float64) * v

    out = top_eigenvalues(Diagonal(), k=3, iters=3)
    assert out["eigenvalues"] == pytest.approx([3.0, 2.0, -1.0])
    assert out["lambda_max_over_lambda_3"] is None  # not -3
    from sam_bench.analysis.spectrum import describe

    shown = describe({**out, "residuals": [0.0] * 3, "converged": [True] * 3, "arch": "a", "dataset": "d", "optimizer": "sgd",
                      "rho": 0.0, "epoch": 1, "step": 10, "seconds": 0.0, "loss": 1.0, "grad_norm": 1.0, "out": "x.json"})
    assert "lambda_max/lambda_3 n/a (lambda_3 <= 0" in shown


def test_a_recorded_null_ratio_is_left_out_of_the_report_as_lambda_k_not_positive(tmp_path):
    from sam_bench.report.spectra import find_spectra, spectra_markdown

    runs = tmp_path / "runs"
    args = ("wrn40_10_nobn", "cifar10", "sgd", 0.0, 300)
    fake_spectrum(runs / "s0" / "hessian_a.json", *args, [20.0, 8, 6, 4, 2.0], training_seed=0)
    fake_spectrum(runs / "s1" / "hessian_a.json", *args, [30.0, 8, 6, 4, -0.5], training_seed=1, lambda_max_over_lambda_5=None)
    md = spectra_markdown(find_spectra([str(runs)]))
    assert "| SGD | 300 | 24.2 | 25 (2) | 11.4 | 10 (1); 1 left out (λ_k ≤ 0) |" in md


def test_negative_images_are_refused(write_checkpoint, tmp_path):
    from sam_bench.analysis.spectrum import hessian_spectrum
    from sam_bench.errors import ConfigError

    write_checkpoint(tmp_path / "run")
    with pytest.raises(ConfigError, match="images must be >= 0"):
        hessian_spectrum(hessian_cfg(tmp_path / "run", images=-5))
    assert not list((tmp_path / "run").glob("hessian_*.json"))


def test_a_run_directory_without_a_readable_checkpoint_is_no_advice_to_delete_it(write_checkpoint, tmp_path):
    from sam_bench.analysis.spectrum import read_any_checkpoint
    from sam_bench.errors import CheckpointError

    good = write_checkpoint(tmp_path / "good")
    half = tmp_path / "half"
    half.mkdir()
    (half / "checkpoint.pt").write_bytes(good.read_bytes()[:20000])  # the only checkpoint, half-written
    with pytest.raises(CheckpointError) as e:
        read_any_checkpoint(half)
    said = str(e.value)
    assert "delete" not in said.lower() and "no readable checkpoint in" in said and "checkpoint.pt: damaged or incomplete" in said
    assert "checkpoint_epoch*.pt" in said


def test_a_file_that_is_no_checkpoint_is_said_so_without_torch_advice(tmp_path):
    from sam_bench.analysis.spectrum import read_any_checkpoint
    from sam_bench.errors import CheckpointError

    foreign = tmp_path / "result.json"
    foreign.write_text('{"config": {}}')
    with pytest.raises(CheckpointError) as e:
        read_any_checkpoint(foreign)
    said = str(e.value)
    assert f"{foreign} is not a readable sam-bench checkpoint: not a sam-bench checkpoint" in said and "weights_only" not in said
    pickled = tmp_path / "pickled.pt"
    torch.save({"a": nn.Linear(1, 1)}, pickled)  # a torch file with a module: weights_only refuses it
    with pytest.raises(CheckpointError) as e:
        read_any_checkpoint(pickled)
    assert "not a sam-bench checkpoint" in str(e.value) and "weights_only" not in str(e.value)


def test_weights_that_do_not_fit_the_config_are_one_line_naming_the_mismatch(write_checkpoint, tmp_path):
    from sam_bench.analysis.spectrum import hessian_spectrum
    from sam_bench.errors import CheckpointError, SamBenchError

    other = write_checkpoint(tmp_path / "other", model_kwargs={"depth": 16})  # weights of depth 10, config says 16
    with pytest.raises(SamBenchError) as e:
        hessian_spectrum(hessian_cfg(tmp_path / "other"))
    said = str(e.value)
    assert isinstance(e.value, CheckpointError) and "\n" not in said
    assert f"the weights in {other} do not fit the model its config describes" in said and "missing key 'blocks." in said
