"""A command refused in another run's directory leaves that run's ``.hydra/`` files byte for byte,
in every launch mode: a single run (tests/test_reliability.py), a sweep point and torchrun (here).
Hydra writes a sweep point's files in ``run_job`` before any callback, and every torchrun rank writes
them, so only the record of the run that owns the directory (rundir.OWNER_FILE) can put them back.
Nor does it add a line to that run's train.log (rundir.RunLogHandler)."""

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, cli_env_under, sam_bench_forked
from sam_bench.engine import checkpoint as ckpt
from sam_bench.engine.rundir import (
    OWNER_FILE,
    RunLogHandler,
    _lock_or_refuse,
    claim_hydra_files,
    remove_unowned_leftovers,
    restore_hydra_files,
    run_lock,
    start_run_log,
)
from sam_bench.engine.signals import PREEMPTED_EXIT_CODE

TINY = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32", "model=wrn", "model.kwargs.depth=10",
        "model.kwargs.width=1", "trainer.batch_size=32", "trainer.eval_batch_size=32", "trainer.epochs=1",
        "trainer.progress=false", "trainer.num_threads=1"]


def hydra_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}


def sweep_point(sweep: Path, *overrides: str) -> list[str]:
    """`train -m` of one point whose directory is ``sweep/fixed`` whatever its overrides."""
    return ["train", "-m", *TINY, *overrides, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=fixed"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished sweep point (checkpoint and result.json) of optimizer.lr=0.1, made once; tests copy it."""
    root = tmp_path_factory.mktemp("finished")
    proc = sam_bench_forked(sweep_point(root / "sweep", "optimizer.lr=0.1"), cli_env_under(root))
    assert proc.returncode == 0, proc.stderr
    return root / "sweep" / "fixed"


@pytest.fixture(scope="module")
def preempted(tmp_path_factory) -> Path:
    """The same sweep point stopped after its first step (a checkpoint, no result), made once."""
    root = tmp_path_factory.mktemp("preempted")
    proc = sam_bench_forked(sweep_point(root / "sweep", "optimizer.lr=0.1"), {**cli_env_under(root), "SAM_BENCH_FAULT": "step@1:TERM"})
    assert proc.returncode == PREEMPTED_EXIT_CODE and not (root / "sweep" / "fixed" / "result.json").exists(), proc.stderr
    return root / "sweep" / "fixed"


def copy_of(run: Path, tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    shutil.copytree(run, sweep / "fixed")
    return sweep


def test_a_run_records_its_hydra_files_as_hydra_wrote_them(finished):
    recorded = json.loads((finished / OWNER_FILE).read_text())
    assert {name: text.encode() for name, text in recorded.items()} == hydra_files(finished)


@pytest.mark.parametrize("by", ["checkpoint", "result", "unfinished"])
def test_a_refused_sweep_point_leaves_the_hydra_files_as_they_were(request, tmp_path, by):
    """config.yaml was rebuilt from the checkpoint (resolved: not the file Hydra wrote), and on result.json
    (no checkpoint left) overrides.yaml and hydra.yaml stayed the refused command's (QA)."""
    sweep = copy_of(request.getfixturevalue("preempted" if by == "unfinished" else "finished"), tmp_path)
    if by == "result":
        for path in ckpt.checkpoint_files(sweep / "fixed"):
            path.unlink()
    before = hydra_files(sweep / "fixed")
    proc = sam_bench_forked(sweep_point(sweep, "optimizer.lr=0.05"), cli_env_under(tmp_path))
    what = "the finished result (result.json)" if by == "result" else "a checkpoint"
    assert proc.returncode == 2 and f"holds {what} of a different config (optimizer.lr: 0.1 -> 0.05)" in proc.stderr, proc.stderr
    assert "use another run directory (hydra.sweep.dir=... or hydra.sweep.subdir=...)" in proc.stderr  # not hydra.run.dir
    assert hydra_files(sweep / "fixed") == before


def test_a_sweep_point_refused_on_a_busy_directory_leaves_its_hydra_files(finished, tmp_path):
    sweep = copy_of(finished, tmp_path)
    before = hydra_files(sweep / "fixed")
    with open(sweep / "fixed" / ".lock", "a+") as held:  # a running job holds it (a plain flock: no claim of ours)
        _lock_or_refuse(held, sweep / "fixed")
        proc = sam_bench_forked(sweep_point(sweep, "optimizer.lr=0.05"), cli_env_under(tmp_path))
    assert proc.returncode == 2 and "is in use by another sam-bench process" in proc.stderr, proc.stderr
    assert "its own directory with hydra.sweep.dir=... or hydra.sweep.subdir=..." in proc.stderr
    assert hydra_files(sweep / "fixed") == before


@pytest.mark.slow
def test_a_torchrun_refusal_leaves_the_hydra_files_as_they_were(finished, tmp_path):
    """Every rank's Hydra rewrites the files and none notes them first; rank 0 puts them back once all
    ranks are in the trainer (here: a single-process run that a 2-rank command may not continue)."""
    from test_ddp import torchrun_cmd

    run = copy_of(finished, tmp_path) / "fixed"
    before = hydra_files(run)
    proc = subprocess.run(torchrun_cmd(2) + ["train", *TINY, "optimizer.lr=0.1", f"hydra.run.dir={run}"],
                          env=cli_env_under(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "trained by 1 process(es) and this command runs 2" in proc.stderr, proc.stderr[-2000:]
    assert hydra_files(run) == before


# ---------------------------------------------------------------- the record itself, in-process


def write_hydra(run_dir: Path, label: str) -> dict[str, bytes]:
    files = {name: f"{label}'s {name}\n".encode() for name in ("config.yaml", "overrides.yaml", "hydra.yaml")}
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (run_dir / ".hydra" / name).write_bytes(data)
    return files


def test_a_run_puts_its_files_back_when_a_command_refused_before_its_claim_left_the_previous_owners(tmp_path):
    """A sweep point meeting the busy directory before the running job's checks passed could only put
    back the previous owner's files; the job's claim then recorded those as its own."""
    owner = write_hydra(tmp_path, "owner")
    with run_lock(tmp_path):
        claim_hydra_files(tmp_path)
    mine = write_hydra(tmp_path, "this run")  # Hydra's, for the next command
    with run_lock(tmp_path):
        write_hydra(tmp_path, "refused")  # a sweep point refused by the lock ...
        assert restore_hydra_files(tmp_path) and hydra_files(tmp_path) == owner  # ... puts back what it knows
        claim_hydra_files(tmp_path)  # the checks passed
        assert hydra_files(tmp_path) == mine
        write_hydra(tmp_path, "refused later")
        restore_hydra_files(tmp_path)
        assert hydra_files(tmp_path) == mine


def test_a_command_failing_before_its_claim_puts_the_owners_files_back(tmp_path):
    """Not only the trainer's refusals: a bad setting or a crash before the checks passed, too."""
    owner = write_hydra(tmp_path, "owner")
    with run_lock(tmp_path):
        pass  # finished (or had nothing to do): claimed on leaving
    write_hydra(tmp_path, "failing")
    with pytest.raises(RuntimeError), run_lock(tmp_path):
        raise RuntimeError("the data could not be read")
    assert hydra_files(tmp_path) == owner


# ---------------------------------------------------------------- train.log


@pytest.mark.parametrize("launch", ["run", "sweep point"])
def test_a_refused_command_adds_no_line_to_the_runs_train_log(tmp_path, launch):
    """Hydra opens train.log before the trainer checks the directory: the refused command's lines (here
    "rho ignored", logged before the config check) were appended to the other run's log (QA)."""
    def command(*overrides: str) -> list[str]:
        if launch == "run":
            return ["train", *TINY, *overrides, f"hydra.run.dir={tmp_path / 'sweep' / 'fixed'}"]
        return sweep_point(tmp_path / "sweep", *overrides)

    env = cli_env_under(tmp_path)
    assert sam_bench_forked(command("optimizer=sgd"), env).returncode == 0
    log_file = tmp_path / "sweep" / "fixed" / "train.log"
    before = log_file.read_bytes()
    refused = sam_bench_forked(command("optimizer=sgd", "optimizer.rho=0.1", "optimizer.lr=0.05"), env)
    assert refused.returncode == 2 and "of a different config (optimizer.lr: 0.1 -> 0.05)" in refused.stderr, refused.stderr
    assert "optimizer.rho=0.1 ignored" in refused.stdout  # it did log a line, on the console alone
    assert log_file.read_bytes() == before
    again = sam_bench_forked(command("optimizer=sgd", "optimizer.rho=0.1"), env)  # the same run: its log goes on
    assert again.returncode == 0, again.stderr
    after = log_file.read_text()
    assert after.startswith(before.decode()) and after.splitlines()[-1].endswith("; nothing to do")


def test_a_killed_run_has_logged_its_lines_as_it_went(tmp_path):
    """Held lines are written as soon as the checks pass, not when the command ends: a run killed
    mid-epoch (no clean-up, no logging shutdown) has its header line in train.log."""
    run = tmp_path / "r"
    killed = sam_bench_forked(["train", *TINY, f"hydra.run.dir={run}"], {**cli_env_under(tmp_path), "SAM_BENCH_FAULT": "step@1"})
    assert killed.returncode == -9, killed.stderr
    assert "synthetic | wide_resnet_cifar" in (run / "train.log").read_text()
    assert "| 1 epoch x 2 steps, batch 32 |" in (run / "train.log").read_text()  # not "1 epochs" (QA)


def _log_into(run_dir: Path) -> tuple[logging.Logger, RunLogHandler]:
    handler = RunLogHandler(str(run_dir / "train.log"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger()
    logger.addHandler(handler)
    return logger, handler


@pytest.fixture
def info_level():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    yield
    root.setLevel(level)


def test_the_run_log_holds_its_lines_until_the_run_owns_the_directory(tmp_path, info_level):
    logger, handler = _log_into(tmp_path)
    try:
        logger.info("built the data")
        assert not (tmp_path / "train.log").exists()  # not even opened: a refused command never touches it
        start_run_log(tmp_path)
        logger.info("epoch 1")
        assert (tmp_path / "train.log").read_text() == "built the data\nepoch 1\n"
    finally:
        logger.removeHandler(handler)
        handler.close()


@pytest.mark.parametrize("owned", [False, True])
def test_a_command_that_never_owned_the_directory_leaves_its_lines_only_where_no_run_owns_it(tmp_path, info_level, owned):
    """A first run that failed before its checks passed keeps its lines; in another run's directory none are written."""
    if owned:
        (tmp_path / "train.log").write_text("the owner's line\n")
        (tmp_path / OWNER_FILE).write_text("{}")
    logger, handler = _log_into(tmp_path)
    logger.info("a line before the failure")
    logger.removeHandler(handler)
    handler.close()
    assert (tmp_path / "train.log").read_text() == ("the owner's line\n" if owned else "a line before the failure\n")


# ---------------------------------------------------------------- what a refused first command leaves


def test_a_command_refused_before_it_trained_leaves_no_run_directory(tmp_path):
    """Data found missing once training is being set up (or fp16 on a CPU): the directory held only
    .lock and .hydra/, and the report listed it for good as an unfinished run (QA)."""
    run = tmp_path / "runs" / "r"
    system = tmp_path / "system"  # gzip files that are there but unreadable: the CLI's check before Hydra runs looks no further
    system.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (system / f"{name}.gz").write_bytes(b"not gzip")
    proc = sam_bench_forked(["train", *TINY, "dataset=fashion_mnist", f"dataset.system_dir={system}", "dataset.download=false",
                             "optimizer=sgd", "optimizer.rho=0.1", f"hydra.run.dir={run}"], cli_env_under(tmp_path))
    assert proc.returncode == 2 and "cannot decompress" in proc.stderr, proc.stderr
    assert not run.exists() and (tmp_path / "runs").is_dir()
    # its held log line ("rho ignored", logged before the data was looked for) is not written into the removed directory
    assert "optimizer.rho=0.1 ignored" in proc.stdout and "Logging error" not in proc.stderr, proc.stderr


def test_leftovers_are_removed_only_when_they_are_all_the_directory_holds(tmp_path):
    (tmp_path / "fresh").mkdir()
    with pytest.raises(ValueError), run_lock(tmp_path / "fresh"):
        write_hydra(tmp_path / "fresh", "refused")
        raise ValueError("fp16 needs CUDA")
    assert not (tmp_path / "fresh").exists()
    for extra in ("metrics.jsonl", "train.log", ".hydra/notes.txt", OWNER_FILE):  # something else: all of it is kept
        run = tmp_path / extra.replace("/", "_")
        write_hydra(run, "refused")
        (run / extra).write_text("kept\n")
        remove_unowned_leftovers(run)
        assert (run / extra).read_text() == "kept\n" and (run / ".hydra" / "config.yaml").exists(), extra
    write_hydra(tmp_path / "cwd", "refused")
    os.chdir(tmp_path / "cwd")  # (pytest's monkeypatch-free chdir is undone below)
    try:
        remove_unowned_leftovers(Path("."))
        assert (tmp_path / "cwd" / ".hydra").is_dir()
    finally:
        os.chdir(REPO)
