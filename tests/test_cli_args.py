"""How the CLI reads its command line before Hydra does: overrides on both sides of a flag, the flags
left to Hydra, and the device of `sam-bench hessian`. In-process checks of the argument lists, and a few
commands end to end (tests/test_cli.py's helpers)."""

import json
import subprocess

import pytest

from conftest import sam_bench_cmd, sam_bench_forked
from sam_bench import cli


@pytest.mark.parametrize("args,moved", [
    (["optimizer=sam", "-m", "seed=0,1"], ["optimizer=sam", "seed=0,1", "-m"]),
    (["a=1", "--cfg", "job", "b=2"], ["a=1", "b=2", "--cfg", "job"]),
    (["a=1", "--cfg=job", "b=2", "--resolve"], ["a=1", "b=2", "--cfg=job", "--resolve"]),
    (["a=1", "-cp", "conf", "b=2", "--config-name", "other", "c=3"], ["a=1", "b=2", "c=3", "-cp", "conf", "--config-name", "other"]),
    (["a=1", "--info", "searchpath", "b=2"], ["a=1", "b=2", "--info", "searchpath"]),
    (["a=1", "--experimental-rerun", "config.pickle", "b=2"], ["a=1", "b=2", "--experimental-rerun", "config.pickle"]),
    (["a=1", "--multi", "b=2"], ["a=1", "b=2", "--multi"]),  # an abbreviation, as Hydra's parser takes it
    # a flag's value spelt like an override stays with its flag (the first 'a=1' is the override)
    (["a=1", "--package", "a=1", "b=2", "-m"], ["a=1", "b=2", "--package", "a=1", "-m"]),
    # flags first would hand the bare --info 'a=1' for its value: the overrides go first
    (["a=1", "-p", "trainer", "b=2", "--info"], ["a=1", "b=2", "-p", "trainer", "--info"]),
    # what Hydra reads as it is, is left as it is
    (["runs=[runs,multirun]", "out=results"], ["runs=[runs,multirun]", "out=results"]),
    (["-m", "a=1", "b=2"], ["-m", "a=1", "b=2"]),
    (["a=1", "b=2", "--info"], ["a=1", "b=2", "--info"]),
    (["--cfg", "job", "a=1"], ["--cfg", "job", "a=1"]),
])
def test_overrides_on_both_sides_of_a_flag_are_put_first(args, moved):
    """Hydra's parse_args refused `a=1 -m b=2` with a multi-line usage error; the intermixed parse
    reads it as meant, and the arguments are handed on in an order parse_args reads the same."""
    hydra_args = cli._hydra_args(args)
    assert cli._overrides_first(args, hydra_args, "train") == moved
    assert cli._hydra_args(moved, intermixed=False) == hydra_args


def test_an_order_hydra_would_read_otherwise_is_one_line(monkeypatch, capsys):
    """The guard: should the overrides be placed wrongly, the command is refused, not run otherwise."""
    monkeypatch.setattr(cli, "_override_positions", lambda args: [])
    args = ["optimizer=sam", "-m", "seed=0,1"]
    with pytest.raises(SystemExit) as exit_:
        cli._overrides_first(args, cli._hydra_args(args), "train")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "sam-bench: error: cannot pass 'optimizer=sam -m seed=0,1' on to Hydra in this order; put the flags before the "
        "overrides: sam-bench train -m a=1 b=2"]


def preflight(monkeypatch, command: str, args: list[str]) -> list[str]:
    """sys.argv[1:] as `sam-bench <command> <args>`'s preflight leaves it for @hydra.main."""
    monkeypatch.setattr(cli.sys, "argv", [f"sam-bench {command}", *args])
    cli._preflight(command)
    return cli.sys.argv[1:]


def test_report_overrides_reach_hydra_as_given(monkeypatch, tmp_path):
    args = [f"runs=['{tmp_path}']", f"out='{tmp_path / 'out'}'", "tensorboard=true"]
    assert preflight(monkeypatch, "report", args) == args
    assert preflight(monkeypatch, "report", [args[0], "--cfg", "job", *args[1:]]) == [*args, "--cfg", "job"]


@pytest.mark.parametrize("args", [["--help"], ["optimizer=sgd", "--hydra-help"], ["-cn", "report", "seed=0"],
                                  ["--shell-completion"], ["nosuchkey=1", "--run"]])
def test_flags_hydra_answers_itself_are_left_to_it(monkeypatch, args):
    """--help, another config, --run, ...: the overrides beside them are not composed (nosuchkey=1 passes)."""
    assert preflight(monkeypatch, "train", args) == args


@pytest.mark.parametrize("args,message", [
    (["optimizer=sgd", "-m", "seed=0,1", "--cfg", "job"], "--cfg cannot be combined with -m/--multirun"),
    (["optimizer=sgd", "-m", "optimizer.rhoo=0.1"], "Key 'rhoo' not in 'OptimizerConfig'"),  # the override after -m is checked
    (["optimizer=sgd", "--cfg", "job", "optimizer", "rho=0.1"], "'optimizer' lacks '='"),
])
def test_the_overrides_after_a_flag_are_checked(monkeypatch, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        preflight(monkeypatch, "train", args)
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and message in err[0], err


def test_hessian_on_cuda_is_refused_where_there_is_none(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli._hessian_device_problem("cuda") == ("device=cuda but CUDA is not available (torch.cuda.is_available() is False); "
                                                   "use device=auto or cpu")
    assert cli._hessian_device_problem("cpu") is None and cli._hessian_device_problem("auto") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli._hessian_device_problem("cuda") is None


SMALL = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=64", "model=wrn", "model.kwargs.depth=10",
         "model.kwargs.width=1", "trainer.batch_size=32", "trainer.eval_batch_size=64", "trainer.epochs=1", "trainer.progress=false"]


@pytest.mark.slow
def test_a_sweep_with_overrides_before_and_after_m_trains_each_point(cli_env, tmp_path):
    proc = sam_bench_forked(["train", "optimizer=sgd", *SMALL, "-m", "seed=0,1", "hydra/launcher=basic"], cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "multirun").rglob("result.json"))]
    assert sorted(r["seed"] for r in results) == [0, 1]
    assert all(r["config"]["optimizer"]["name"] == "sgd" and r["status"] == "complete" for r in results)


@pytest.mark.slow
def test_cfg_job_between_overrides_prints_them_all(cli_env):
    proc = sam_bench_forked(["train", "optimizer=sgd", "--cfg", "job", "optimizer.lr=0.3"], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "name: sgd" in proc.stdout and "lr: 0.3" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="refused only where CUDA is absent")
def test_hessian_on_cuda_without_it_is_one_line_before_anything_loads(cli_env, tmp_path):
    """It failed after the checkpoint was loaded, naming trainer.device (no key of hessian's)."""
    proc = subprocess.run([*sam_bench_cmd(), "hessian", f"checkpoint={tmp_path / 'none.pt'}", "device=cuda"], env=cli_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "sam-bench: error: device=cuda but CUDA is not available (torch.cuda.is_available() is False); use device=auto or cpu"], proc.stderr
