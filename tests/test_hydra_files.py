"""A command refused in another run's directory leaves that run's ``.hydra/`` files byte for byte,
in every launch mode: a single run (tests/test_reliability.py), a sweep point and torchrun (here).
Hydra writes a sweep point's files in ``run_job`` before any callback, and every torchrun rank writes
them, so only the record of the run that owns the directory (rundir.OWNER_FILE) can put them back."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import cli_env_under, sam_bench_forked
from sam_bench.engine import checkpoint as ckpt
from sam_bench.engine.rundir import OWNER_FILE, _lock_or_refuse, claim_hydra_files, restore_hydra_files, run_lock
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
