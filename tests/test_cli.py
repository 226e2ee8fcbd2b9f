"""The CLI end to end in subprocesses: train, multirun, report, resume, bad input. Runs a test sets
up or compares with, repeats, and messages checked for their text run main() in pre-imported forked
children (conftest.sam_bench_forked); the help, one-line bad-input and kill checks, real processes."""

import csv
import io
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import sam_bench_cmd, sam_bench_forked

pytestmark = pytest.mark.slow

TINY = [
    "dataset=synthetic",
    "dataset.train_size=256",
    "dataset.test_size=128",
    "model=wrn",
    "model.kwargs.depth=10",
    "model.kwargs.width=1",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=64",
    "trainer.epochs=2",
    "trainer.progress=false",
]


def run(args, env, check=True, timeout=300, cwd=None, forked=False):
    """`sam-bench <args>` in a subprocess; ``forked``: in a pre-imported child (conftest.sam_bench_forked),
    for the runs a test sets up or compares with, and repeats of a command the test ran already."""
    if forked:
        proc = sam_bench_forked(args, env, timeout=timeout, cwd=cwd)
    else:
        proc = subprocess.run(sam_bench_cmd() + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_help_lists_commands(cli_env):
    out = run(["--help"], cli_env).stdout
    assert "train" in out and "report" in out
    hydra_help = run(["train", "--help"], cli_env).stdout
    assert "optimizer: asam, sam, sgd" in hydra_help and "dataset: cifar10, cifar100, cifar100_noisy, cifar10_noisy, fashion_mnist, fgvc_aircraft" in hydra_help
    assert hydra_help.startswith("usage: sam-bench train")


@pytest.mark.parametrize("command, keys", [("report", ["runs:", "out: results", "tensorboard: false"]),
                                           ("hessian", ["checkpoint: ???", "images: ", "top_k: 5"])])
def test_report_and_hessian_help_show_their_own_keys_not_train_groups(cli_env, command, keys):
    out = run([command, "--help"], cli_env).stdout
    assert out.startswith(f"usage: sam-bench {command}")
    assert all(key in out for key in keys), out
    assert "Configuration groups" not in out and "optimizer: asam" not in out and "experiment/paper" not in out


def test_cfg_job_prints_composed_config(cli_env):
    out = run(["train", "--cfg", "job", "optimizer=sgd", "optimizer.lr=0.3"], cli_env).stdout
    assert "name: sgd" in out and "lr: 0.3" in out and "rho: 0.0" in out


def test_train_writes_result_and_artifacts(cli_env, tmp_path):
    one = tmp_path / "a=1,b=2"  # unquoted: a run directory named like Hydra's (the CLI quotes it)
    run(["train", *TINY, f"hydra.run.dir={one}"], cli_env)
    result = json.loads((one / "result.json").read_text())
    assert result["status"] == "complete" and result["epochs"] == 2 and result["steps"] == 16
    assert 0 <= result["final_test_error"] <= 100
    for key in ("config", "seed", "git_commit", "versions", "device", "wall_time_s", "images_per_s", "peak_memory_mb"):
        assert key in result
    assert result["config"]["optimizer"]["name"] == "sam" and result["device"] == "cpu"
    lines = (one / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert (one / "checkpoint.pt").exists() and any((one / "tb").iterdir())
    # re-running a finished run does nothing and says so
    again = run(["train", *TINY, f"hydra.run.dir={one}"], cli_env, forked=True)
    assert "nothing to do" in again.stdout


def test_multirun_sgd_and_sam_then_report(cli_env, tmp_path):
    run(["train", "-m", *TINY, "trainer.epochs=1", "optimizer=sgd,sam", "optimizer.rho=0.1"], cli_env, forked=True)  # the report's input
    results = sorted((tmp_path / "multirun").rglob("result.json"))
    assert len(results) == 2
    by_name = {json.loads(p.read_text())["config"]["optimizer"]["name"]: json.loads(p.read_text()) for p in results}
    assert by_name["sgd"]["config"]["optimizer"]["rho"] == 0.0  # SGD ignores rho
    assert by_name["sam"]["config"]["optimizer"]["rho"] == 0.1
    out_dir = tmp_path / "results"
    rep = run(["report", f"runs=[{tmp_path / 'multirun'}]", f"out={out_dir}"], cli_env)
    table = (out_dir / "summary.md").read_text()
    assert table in rep.stdout  # the printed table is summary.md (an `or "| synthetic |" in stdout` let any table pass)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "synthetic" in line]
    assert len(rows) == 2
    assert any("| sgd | 0 |" in r for r in rows) and any("| sam | 0.1 |" in r for r in rows)
    assert (out_dir / "summary.csv").read_text().count("\n") == 3
    # the run directories themselves, unquoted, though their names hold '=' and ','
    run_dirs = sorted(p.parent for p in results)
    assert all("=" in d.name and "," in d.name for d in run_dirs), run_dirs
    run(["report", f"runs=[{run_dirs[0]},{run_dirs[1]}]", f"out={tmp_path / 'both'}"], cli_env)
    assert (tmp_path / "both" / "summary.csv").read_text() == (out_dir / "summary.csv").read_text()
    run(["report", f"runs={run_dirs[0]}", f"out={tmp_path / 'single'}"], cli_env)  # one directory, no list
    assert (tmp_path / "single" / "summary.csv").read_text().count("\n") == 2
    # a comma list with a name that is no directory is still split at its commas
    missing = run(["report", f"runs=[{tmp_path / 'x=1'},{tmp_path / 'y=2'}]", f"out={tmp_path / 'none'}"], cli_env, check=False)
    assert missing.returncode == 2 and f"'{tmp_path / 'x=1'}', '{tmp_path / 'y=2'}'" in missing.stderr


def test_rho_sweep_with_a_validation_split_is_chosen_on_it_by_the_report(cli_env, tmp_path):
    """The trainer records the final validation (and, above 5 classes, top-5) errors in result.json,
    and the report marks the ρ with the lowest one: the paper's protocol, end to end."""
    run(["train", "-m", *TINY, "trainer.epochs=1", "optimizer.rho=0.05,0.5", "dataset.val_size=64", "dataset.num_classes=10"], cli_env,
        forked=True)
    files = sorted((tmp_path / "multirun").rglob("result.json"))
    results = [json.loads(p.read_text()) for p in files]
    assert len(results) == 2
    for path, r in zip(files, results):
        last = json.loads((path.parent / "metrics.jsonl").read_text().splitlines()[-1])
        assert (r["final_val_error"], r["final_val_loss"], r["final_test_top5_error"]) == \
            (last["val_error"], last["val_loss"], last["test_top5_error"])
        assert 0 <= r["final_test_top5_error"] <= r["final_test_error"]
    chosen = min(results, key=lambda r: (r["final_val_error"], r["config"]["optimizer"]["rho"]))["config"]["optimizer"]["rho"]
    run(["report", f"runs=[{tmp_path / 'multirun'}]", f"out={tmp_path / 'out'}"], cli_env)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "sweeps.csv").read_text())))
    assert {(float(r["rho"]), r["chosen"]) for r in rows} == {(0.05, "1" if chosen == 0.05 else "0"), (0.5, "1" if chosen == 0.5 else "0")}


def test_killed_run_resumes_to_the_same_result(cli_env, tmp_path):
    args = [*TINY, "trainer.epochs=3"]  # killed after epoch 1's checkpoint, with two epochs to go
    run(["train", *args, f"hydra.run.dir={tmp_path / 'clean'}"], cli_env, forked=True)  # the reference
    victim = tmp_path / "victim"
    proc = subprocess.Popen(sam_bench_cmd() + ["train", *args, f"hydra.run.dir={victim}"], env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (victim / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (victim / "result.json").exists(), "the run finished before it could be killed"
    resumed = run(["train", *args, f"hydra.run.dir={victim}"], cli_env, forked=True)  # the kill was of a real process
    assert "resuming" in resumed.stdout
    clean = json.loads((tmp_path / "clean" / "result.json").read_text())
    again = json.loads((victim / "result.json").read_text())
    assert again["final_test_error"] == clean["final_test_error"]
    assert again["final_test_loss"] == clean["final_test_loss"]
    assert [json.loads(x) ["train_loss"] for x in (victim / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(x)["train_loss"] for x in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "override,message",
    [
        ("model=resnet9000", "Could not find 'model/resnet9000'"),
        ("dataset=imagenet21k", "Could not find 'dataset/imagenet21k'"),
        ("optimizer.rho=-0.1", "optimizer.rho=-0.1 is negative"),
        ("optimizer.rho=abc", "Value 'abc' of type 'str' could not be converted to Float"),
        ("optimizer.rhoo=0.1", "Key 'rhoo' not in 'OptimizerConfig'"),
        ("trainer.batch_size=100000", "exceeds the 256 training images"),
        ("trainer.device=cuda", "CUDA is not available"),
    ],
)
def test_bad_input_fails_with_a_clear_message(cli_env, tmp_path, override, message):
    if override == "trainer.device=cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is present")
    proc = run(["train", *TINY, override, f"hydra.run.dir={tmp_path / 'bad'}"], cli_env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sam-bench: error: "), proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["-m", "optimizer=sgd,sam", "optimizer.rhoo=0.1,0.2"], "Key 'rhoo' not in 'OptimizerConfig' (no such key; did you mean optimizer.rho?"),
        # an unknown key gets the likely one: same last part elsewhere, else a sibling spelt alike
        (["model.depth=10"], "(no such key; did you mean model.kwargs.depth? `sam-bench train --help` lists every key)"),
        (["trainer.epoch=3"], "did you mean trainer.epochs?"),
        (["seeed=1"], "did you mean seed?"),
        (["nosuchkey=1"], "Key 'nosuchkey' not in 'TrainConfig' (no such key; `sam-bench train --help` lists every key)"),
        # a keyword the model config does not list: passed to the constructor with +
        (["model.kwargs.dropuot=0.1"], "Key 'dropuot' is not in struct (no such key; did you mean model.kwargs.dropout? "
         "+model.kwargs.dropuot=0.1 passes it to the model's constructor as an extra keyword; `sam-bench train --help` lists every key)"),
        (["model=resnet9000"], "choose one of: "),
        (["optimizer.rho=[1,"], "cannot parse the overrides"),
        (["hydra/launcher=nosuch"], "Could not find 'hydra/launcher/nosuch'; choose one of: basic,"),
        # every point of a sweep is composed and validated, not only the first
        (["-m", "optimizer=sgd,nosuch"], "Could not find 'optimizer/nosuch'; choose one of: asam, sam, sgd (sweep point optimizer=nosuch)"),
        (["-m", "optimizer.m=4,3", "trainer.batch_size=36,32"], "must be >= 1 and divide trainer.batch_size=32 (the per-device batch is split into chunks of m examples); pick a divisor or optimizer.m=null (sweep point optimizer.m=3 trainer.batch_size=32)"),
        (["-m", "seed=0,1,2,3,4,5,6,7,8", "optimizer.rho=0.05,-1"], "is negative: rho is a radius, use a value >= 0 (paper grid: 0.01-0.5) (sweep point seed=0 optimizer.rho=-1)"),
        # a pair that fails together in a sweep of more than 16 points: each pair is checked, not each value alone
        (["-m", "seed=0,1,2,3,4", "optimizer.m=null,32", "trainer.batch_size=64,48"],
         "optimizer.m=32 must be >= 1 and divide trainer.batch_size=48 (the per-device batch is split into chunks of m examples); "
         "pick a divisor or optimizer.m=null (sweep point seed=0 optimizer.m=32 trainer.batch_size=48)"),
        # a key added with + is checked against the schema too (it trained with the default rho)
        (["+optimizer.rhoo=0.1"], "optimizer.rhoo is not a key of the config (a + override adds keys unchecked); did you mean optimizer.rho?"),
        # the model is built (on the meta device) for every distinct model of the sweep before any point trains
        (["-m", "model.kwargs.depth=10,11"], "WideResNet depth must be 6n+4 (10, 16, 22, 28, 40, ...), got 11 (sweep point model.kwargs.depth=11)"),
        (["model.arch=nonexistent_net"], "model.arch='nonexistent_net' is not a registered model"),
        # several values without -m: one line that says to add -m (Hydra's message is five lines, exit 1)
        (["optimizer.rho=0.1,0.2"], "optimizer.rho=0.1,0.2 gives several values: add -m to train each (sam-bench train -m ...)"),
        (["seed=range(3)"], "seed=range(3) gives several values: add -m"),
        # a group without '=' (the next word was meant as its key): said so, not a quoting hint
        (["optimizer", "rho=0.1"], "'optimizer' lacks '=': choose an option of the optimizer group with optimizer=<option> "
         "(one of: asam, sam, sgd), or set one of its keys with optimizer.rho=0.1 (no space)"),
        (["experiment"], "'experiment' lacks '=': choose an option of the experiment group with experiment=<option> "
         "(one of: fmnist_quickstart, paper/<name>)"),
        # Hydra refuses --cfg with -m by a traceback
        (["-m", "optimizer=sgd,sam", "--cfg", "job"], "--cfg cannot be combined with -m/--multirun (Hydra does one or the other); drop -m"),
        # a preset's own grid (hydra.sweeper.params: Fig. 6's p x rho) is checked too
        (["-m", "experiment=paper/fig6_p_norm_cifar10", "optimizer.adaptive=true"], "optimizer.adaptive and optimizer.second_order "
         "are defined for optimizer.p=2 only (sweep point optimizer.p=inf optimizer.rho=1e-06)"),
        # a paper preset without its paper/ prefix: the hint used to list fmnist_quickstart only
        (["experiment=table4_resnet32_noise20_cifar10"], "choose one of: fmnist_quickstart; or a paper preset, "
         "experiment=paper/<name> (e.g. paper/table4_resnet32_noise20_cifar10)"),
    ],
)
def test_composition_errors_are_one_line_before_anything_runs(cli_env, tmp_path, args, message):
    """A bad override, in a sweep too, fails before any run starts: one line, exit 2, no run dir."""
    proc = run(["train", *TINY, *args, f"hydra.run.dir={tmp_path / 'bad'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
               cli_env, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "sweep").exists()


needs_no_cuda = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="refused only where CUDA is absent")


@needs_no_cuda
@pytest.mark.parametrize("args,message", [
    (["-m", "trainer.precision=fp32,fp16"], "trainer.precision=fp16 needs CUDA (float16 autocast is GPU-only here); use "
     "trainer.precision=fp32 or bf16 on the CPU (sweep point trainer.precision=fp16)"),
    (["-m", "trainer.device=cpu,cuda"], "trainer.device=cuda but CUDA is not available (torch.cuda.is_available() is False); "
     "use trainer.device=auto or cpu (sweep point trainer.device=cuda)"),
    # --cfg job applies the run's checks: it printed these configs (exit 0)
    (["--cfg", "job", "trainer.device=cuda"], "trainer.device=cuda but CUDA is not available"),
    (["--cfg=job", "trainer.precision=fp16"], "trainer.precision=fp16 needs CUDA"),
])
def test_cuda_only_settings_fail_before_any_point_trains(cli_env, tmp_path, args, message):
    """The fp32 point trained, then the fp16 one failed in the trainer: the preflight asks the trainer's own
    resolve_device/resolve_precision for each point."""
    proc = run(["train", *TINY, *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"], cli_env, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert proc.stdout == "" and not (tmp_path / "sweep").exists()


def test_a_sweep_point_without_its_files_fails_before_any_point_trains(cli_env, tmp_path):
    """dataset=synthetic,cifar10 dataset.download=false trained the synthetic point, then cifar10 failed."""
    proc = run(["train", "-m", *TINY, "dataset=synthetic,cifar10", "dataset.download=false", f"data_root={tmp_path / 'empty'}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}"], cli_env, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"{tmp_path / 'empty' / 'cifar-10-batches-py' / 'data_batch_1'} is missing" in lines[0]
    assert lines[0].endswith("or run with dataset.download=true (sweep point dataset=cifar10)")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("args,message", [
    (["--cfg=job", "-m"], "--cfg cannot be combined with -m/--multirun (Hydra does one or the other); drop -m"),
    (["--multi", "--cfg", "job"], "--cfg cannot be combined with -m/--multirun"),
    (["--multirun", "--info"], "--info cannot be combined with -m/--multirun; drop -m"),
    (["--cfg", "job", "--run"], "--cfg cannot be combined with --run (Hydra does one or the other); drop one"),
    (["-r", "--info", "defaults"], "--info cannot be combined with --run"),
])
def test_two_of_hydras_modes_are_one_line(cli_env, args, message):
    """Hydra refuses --run/--multirun/--cfg/--info together with a ValueError traceback; only `-m ... --cfg`
    was caught, not --cfg=job, abbreviations (--multi) or --run."""
    proc = run(["train", "optimizer=sgd", *args], cli_env, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_no_command_prints_the_usage_on_stderr_and_exits_2(cli_env):
    proc = run([], cli_env, check=False)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.startswith("usage: sam-bench <command>")


def test_missing_dataset_names_directory_file_and_url(cli_env, tmp_path):
    proc = run(["train", "dataset=cifar10", "dataset.download=false", f"data_root={tmp_path / 'empty'}",
                f"hydra.run.dir={tmp_path / 'bad'}"], cli_env, check=False, forked=True)  # the message's text
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert str(tmp_path / "empty" / "cifar-10-batches-py" / "data_batch_1") in line
    assert "cifar-10-python.tar.gz" in line and "Traceback" not in proc.stderr


def test_unknown_command(cli_env):
    proc = run(["trian"], cli_env, check=False)
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr


def test_a_refused_resume_names_the_keys_and_leaves_the_run_described_as_it_was(cli_env, tmp_path):
    """Re-running a directory with another config is refused (exit 2, the keys named); Hydra has
    already rewritten .hydra/config.yaml and overrides.yaml by then, so the trainer puts the run's
    own back (the report names unfinished runs from config.yaml)."""
    import yaml

    run_dir = tmp_path / "r"
    run(["train", *TINY, "trainer.epochs=1", "name=first", f"hydra.run.dir={run_dir}"], cli_env, forked=True)
    (run_dir / "result.json").unlink()  # as if it had been stopped before finishing
    proc = run(["train", *TINY, "trainer.epochs=1", "name=second", "optimizer.rho=0.2", f"hydra.run.dir={run_dir}"], cli_env, check=False,
               forked=True)  # Hydra rewrites .hydra/ in-process all the same
    assert proc.returncode == 2 and "optimizer.rho: 0.05 -> 0.2" in proc.stderr, proc.stderr[-2000:]
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert saved["name"] == "first" and saved["optimizer"]["rho"] == 0.05
    command = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())  # the command that trained it
    assert "name=first" in command and not any(o.startswith("optimizer.rho") for o in command)
    hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert "name=first" in hydra_cfg["overrides"]["task"] and "name=second" not in hydra_cfg["overrides"]["task"]


@pytest.mark.parametrize("args,message", [
    (["optimizer.rho=-1"], "optimizer.rho=-1.0 is negative"),
    (["optimizer.rho=abc"], "Value 'abc' of type 'str' could not be converted to Float"),
    (["optimizer=sma"], "Could not find 'optimizer/sma'; choose one of: asam, sam, sgd"),
    (["+trainer.epochz=3"], "trainer.epochz is not a key of the config"),
])
@pytest.mark.parametrize("flag", [["--cfg", "job"], ["--info", "defaults"]])
def test_cfg_and_info_validate_the_overrides_they_print(cli_env, args, message, flag):
    """--cfg job printed a config that would fail (exit 0), or Hydra's multi-line report (exit 1)."""
    proc = run(["train", *args, *flag], cli_env, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_an_empty_run_directory_is_refused(cli_env, tmp_path):
    """hydra.run.dir= (empty) wrote checkpoint.pt and result.json into the current directory."""
    proc = run(["train", *TINY, "hydra.run.dir="], cli_env, check=False, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "sam-bench: error: hydra.run.dir is empty: the run would write its checkpoints into the current directory; give a "
        "directory, e.g. hydra.run.dir=runs/mine (hydra.run.dir=. for the current one)"], proc.stderr
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "result.json").exists()


@pytest.mark.parametrize("command", ["report", "hessian"])
def test_multirun_is_refused_for_report_and_hessian(cli_env, tmp_path, command):
    """report -m made multirun/<date>/<time>/ inside the default run root, which the report then read."""
    proc = run([command, "-m"], cli_env, check=False, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(f"sam-bench: error: -m/--multirun sweeps training runs; sam-bench {command} runs once: drop -m")
    assert list(tmp_path.iterdir()) == []


def test_an_engine_the_model_cannot_take_fails_before_anything_runs(cli_env, tmp_path):
    """optimizer.m_engine=split with a layer it cannot split (EfficientNet's BatchNormAct2d) failed in
    the trainer, after the data (and here the pretrained weights) were loaded: the preflight builds the
    model on the meta device, without weights, and asks the engine."""
    proc = run(["train", "dataset=synthetic", "model=efficientnet_b7", "optimizer.m=16", "optimizer.m_engine=split",
                "trainer.batch_size=32", f"hydra.run.dir={tmp_path / 'bad'}"], cli_env, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines == ["sam-bench: error: optimizer.m_engine=split cannot run this model: bn1 "
                                              "(BatchNormAct2d) is not Conv2d, Linear or BatchNorm1d/2d; use optimizer.m_engine=auto or vmap"], proc.stderr
    assert not (tmp_path / "bad").exists()


def test_a_presets_rho_over_the_chosen_optimizers_is_warned_about(cli_env):
    """experiment=<paper preset> optimizer=asam trains with the preset's rho (merged after the group):
    one warning line; the config is as it was. No warning for sam (the preset's own group), sgd (rho unused)
    or an explicit optimizer.rho."""
    preset = "experiment=paper/table1_wrn28_10_200ep_basic_cifar10"
    proc = run(["train", preset, "optimizer=asam", "--cfg", "job"], cli_env)
    assert proc.stderr.strip() == ("sam-bench: warning: experiment=paper/table1_wrn28_10_200ep_basic_cifar10 sets optimizer.rho=0.05, "
                                   "which replaces optimizer=asam's own rho=0.5; add optimizer.rho=0.5 to train with asam's")
    assert "  rho: 0.05\n" in proc.stdout and "  adaptive: true\n" in proc.stdout
    for other in (["optimizer=sam"], ["optimizer=sgd"], ["optimizer=asam", "optimizer.rho=0.5"]):
        assert "warning" not in run(["train", preset, *other, "--cfg", "job"], cli_env).stderr, other


def test_a_relative_data_root_is_taken_from_where_the_command_ran_under_job_chdir(cli_env, tmp_path):
    """With hydra.job.chdir=true the job runs in its run directory: a relative data_root (the default
    `data`) was read, downloaded and extracted there, once per run."""
    env = {**cli_env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("SAM_BENCH_DATA")  # the default data_root, `data`
    proc = run(["train", "dataset=cifar10", "dataset.download=false", "hydra.job.chdir=true", "hydra.run.dir=run"],
               env, check=False, cwd=tmp_path)
    assert proc.returncode == 2
    assert str(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1") in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "run" / "data").exists()


def test_report_with_the_default_roots_says_nothing_of_a_missing_one(cli_env, tmp_path):
    """The quick start sweeps (multirun/) and reports with the default runs=[runs,multirun]: a missing
    runs/ is no typo and was warned about in summary.md; a root the user names still is."""
    run(["train", "-m", *TINY, "trainer.epochs=1", "seed=0"], cli_env)  # into tmp_path/multirun
    proc = run(["report", "out=results/quickstart"], cli_env, cwd=tmp_path)
    assert "does not exist" not in proc.stderr and "Warning" not in (tmp_path / "results" / "quickstart" / "summary.md").read_text()
    assert "| synthetic |" in proc.stdout
    named = run(["report", "runs=[runs,multirun]", "out=results/named"], cli_env, cwd=tmp_path)
    assert "run root runs does not exist: skipped (check runs=[...])" in (tmp_path / "results" / "named" / "summary.md").read_text()
    assert "run root runs does not exist" in named.stderr


def test_report_reads_the_run_roots_train_wrote_to(cli_env, tmp_path):
    """train writes under $SAM_BENCH_RUNS / $SAM_BENCH_MULTIRUN; report's default roots are the same
    (they were the literal runs/ and multirun/ of the working directory: nothing found)."""
    run(["train", *TINY, "trainer.epochs=1"], cli_env)  # into tmp_path/runs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run(["report", "out=out"], cli_env, cwd=elsewhere)
    assert "| synthetic |" in proc.stdout, proc.stdout + proc.stderr


def test_version(cli_env):
    from importlib import metadata

    import sam_bench

    proc = run(["--version"], cli_env)
    assert proc.stdout.strip() == f"sam-bench {sam_bench.__version__} (torch {metadata.version('torch')}, hydra-core {metadata.version('hydra-core')})"


def test_report_into_a_read_only_directory_is_one_line(cli_env, tmp_path):
    """An existing out= directory on a read-only file system ended in an OSError traceback (the check
    was only mkdir's). As root a chmod does not stop writes: /proc/self takes no new file from anyone."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    (tmp_path / "runs").mkdir()
    proc = run(["report", f"runs=[{tmp_path / 'runs'}]", "out=/proc/self"], cli_env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sam-bench: error: cannot write the report into out=/proc/self ("), proc.stderr


def test_an_error_line_reaches_stderr_in_one_write(monkeypatch):
    """Under torchrun the ranks share one stderr pipe: print's two writes (the line, then its newline) let
    rank 0's line land between rank 1's and its newline, and the two lines ran together (CI, test_ddp)."""
    from sam_bench import cli

    writes = []

    class Recording(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    monkeypatch.setattr(cli.sys, "stderr", Recording())
    with pytest.raises(SystemExit):
        cli._fail("cannot write x (No space left on device)", status=1)
    assert writes == ["sam-bench: error: cannot write x (No space left on device)\n"]
