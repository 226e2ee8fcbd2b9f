"""torchrun with 2 CPU ranks (gloo): the trainer's DDP path equals single-process m-sharpness."""

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import cli_env_under, sam_bench_cmd, sam_bench_forked

pytestmark = pytest.mark.slow

ARGS = ["dataset=synthetic", "dataset.train_size=128", "dataset.test_size=64", "model.kwargs.depth=10",
        "model.kwargs.width=1", "trainer.batch_size=64", "trainer.epochs=1", "trainer.progress=false"]


def torchrun_cmd(nproc: int) -> list[str]:
    exe = shutil.which("torchrun", path=str(__import__("pathlib").Path(sys.executable).parent)) or "torchrun"
    return [exe, "--standalone", f"--nproc_per_node={nproc}", "-m", "sam_bench"]


def run(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def weights(run_dir):
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    return {k: v for k, v in state.items() if "num_batches" not in k}


def max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def forked(args, env):
    """A single-process run a test compares with or starts from, in a pre-imported child (no start-up)."""
    proc = sam_bench_forked(args, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A finished single-process run of ARGS (plain SAM over the whole batch), which tests only read
    (or copy): made once for the module."""
    root = tmp_path_factory.mktemp("plain")
    forked(["train", *ARGS, f"hydra.run.dir={root / 'plain'}"], cli_env_under(root))
    return root / "plain"


@pytest.fixture(scope="module")
def clean_3_epochs(tmp_path_factory):
    """The uninterrupted 2-rank run of ARGS over 3 epochs, which the kill tests end equal to (made once)."""
    root = tmp_path_factory.mktemp("clean3")
    run(torchrun_cmd(2) + ["train", *ARGS, "trainer.epochs=3", f"hydra.run.dir={root / 'clean'}"], cli_env_under(root))
    return root / "clean"


def test_two_ranks_equal_single_process_m_sharpness_and_only_rank0_writes(cli_env, tmp_path, plain):
    ddp = tmp_path / "ddp"
    out = run(torchrun_cmd(2) + ["train", *ARGS, f"hydra.run.dir={ddp}"], cli_env)
    forked(["train", *ARGS, "optimizer.m=32", f"hydra.run.dir={tmp_path / 'm32'}"], cli_env)
    w_ddp, w_m32, w_plain = weights(ddp), weights(tmp_path / "m32"), weights(plain)
    # per-rank perturbation == m-sharpness with m = per-rank batch (fp32 rounding only; the float64
    # equality to 1e-10 is tests/test_sam_ddp.py) ... The rounding floor is measured, not guessed: the
    # same single-process m=32 run differs from itself by 1.5e-5 between 1 and 2 CPU threads
    # (OMP_NUM_THREADS=1: oneDNN sums the first conv's weight gradient in another order), while the
    # global perturbation below moves the weights by 8e-3.
    assert max_diff(w_ddp, w_m32) < 1e-4
    # ... and not the global perturbation of plain SAM over the whole batch
    assert max_diff(w_ddp, w_plain) > 1e-3
    # rank 0 alone writes: one result, one event file, one log line per epoch
    result = json.loads((ddp / "result.json").read_text())
    assert result["status"] == "complete" and result["steps"] == 2
    assert len(list((ddp / "tb").iterdir())) == 1
    assert (ddp / "train.log").read_text().count("epoch 1/1") == 1
    assert out.stdout.count("done: final test error") == 1


def test_m_must_match_the_per_rank_batch_under_torchrun(cli_env, tmp_path):
    proc = subprocess.run(torchrun_cmd(2) + ["train", *ARGS, "optimizer.m=16", f"hydra.run.dir={tmp_path / 'bad'}"],
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "optimizer.m=16 under torchrun" in proc.stdout + proc.stderr


def test_preempted_mid_epoch_under_torchrun_resumes_with_the_epochs_true_stats(cli_env, tmp_path):
    """SIGTERM to both ranks at step 2 of 4: the checkpoint holds the epoch's running loss and error
    summed over ranks, so the resumed epoch reports what the uninterrupted one does (it reported
    rank 0's part twice and lost rank 1's). Resuming the 2-rank run in one process is refused:
    the ranks set SAM's m. Each rank's RNGs (dropout, the random-direction generator) come back as
    that rank left them, so the weights end identical too."""
    args = [*ARGS, "dataset.train_size=256", "trainer.log_every_steps=1", "model.kwargs.dropout=0.3", "optimizer.p=random",
            f"hydra.run.dir={tmp_path / 'victim'}"]
    run(torchrun_cmd(2) + ["train", *args[:-1], f"hydra.run.dir={tmp_path / 'clean'}"], cli_env)
    stopped = subprocess.run(torchrun_cmd(2) + ["train", *args], env={**cli_env, "SAM_BENCH_FAULT": "step@2:TERM"},
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode != 0 and "preempted" in stopped.stderr, stopped.stderr[-2000:]
    state = torch.load(tmp_path / "victim" / "checkpoint.pt", weights_only=True)
    assert state["partial"]["epoch_step"] == 2 and state["partial"]["seen"] == 128  # 2 steps x 64 images, both ranks
    alone = sam_bench_forked(["train", *args], cli_env)  # single-process: no start-up needed to be refused
    assert alone.returncode == 2 and "trained by 2 process(es) and this command runs 1" in alone.stderr \
        and "torchrun --nproc_per_node=2" in alone.stderr, alone.stderr[-2000:]
    run(torchrun_cmd(2) + ["train", *args], cli_env)
    clean, victim = (json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1]) for d in ("clean", "victim"))
    assert victim["train_loss"] == pytest.approx(clean["train_loss"], rel=1e-6)
    assert victim["train_error"] == pytest.approx(clean["train_error"], rel=1e-9)
    assert max_diff(weights(tmp_path / "victim"), weights(tmp_path / "clean")) == 0.0


def test_sync_bn_without_cuda_is_a_config_error(cli_env, tmp_path):
    proc = subprocess.run(torchrun_cmd(2) + ["train", *ARGS, "trainer.sync_bn=true", f"hydra.run.dir={tmp_path / 'bad'}"],
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "trainer.sync_bn=true needs CUDA" in proc.stderr, proc.stderr[-2000:]
    assert "sam_bench/" not in proc.stderr  # one line per rank, no traceback of ours (torchrun prints its own)


def test_a_busy_run_directory_stops_every_rank_before_it_is_touched(cli_env, tmp_path):
    """Rank 0 cannot take the lock: rank 1 learns it too and leaves the directory alone (it went on
    and, among other things, deleted the running job's half-written temporaries)."""
    from sam_bench.engine.rundir import run_lock

    busy = tmp_path / "busy"
    busy.mkdir()
    planted = busy / ".checkpoint.next.pt.99999.tmp"  # the running job's checkpoint being written
    planted.write_bytes(b"in flight")
    with run_lock(busy):
        proc = subprocess.run(torchrun_cmd(2) + ["train", *ARGS, f"hydra.run.dir={busy}"], env=cli_env,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stderr.count("is in use by another sam-bench process") == 2, proc.stderr[-2000:]
    assert planted.read_bytes() == b"in flight" and not (busy / "checkpoint.pt").exists()


def test_a_single_process_run_is_not_taken_over_by_torchrun(cli_env, tmp_path, plain):
    """The number of ranks sets SAM's m, so it is part of the run: a finished single-process run rerun
    under torchrun (same directory) is refused, naming how it was launched, and its result is left
    as it was (before, torchrun relabelled it `ranks: 2` and the report averaged it with 2-rank runs)."""
    one = tmp_path / "one"
    shutil.copytree(plain, one)  # a finished single-process run of ARGS of its own
    before = (one / "result.json").read_bytes()
    proc = subprocess.run(torchrun_cmd(2) + ["train", *ARGS, f"hydra.run.dir={one}"], env=cli_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "trained by 1 process(es) and this command runs 2" in proc.stderr and "without torchrun" in proc.stderr
    assert (one / "result.json").read_bytes() == before


@pytest.mark.parametrize("overrides, message", [
    (["-m", "optimizer.m=32,16"], "optimizer.m=16 under torchrun: each of the 2 ranks perturbs with its own 32 examples"),
    (["optimizer.second_order=true"], "optimizer.second_order under torchrun is not supported"),
    (["trainer.batch_size=63"], "trainer.batch_size=63 is the global batch and must divide evenly over 2 ranks"),
])
def test_rank_dependent_checks_fail_before_anything_runs(cli_env, tmp_path, overrides, message):
    """What depends on the number of ranks (WORLD_SIZE, as torchrun sets it) is judged by the CLI's
    pre-check like every other value: one line, exit 2, before any sweep point trains (before, the
    first point of `-m optimizer.m=32,16` trained to completion and the second failed with a traceback)."""
    env = {**cli_env, "WORLD_SIZE": "2", "SAM_BENCH_MULTIRUN": str(tmp_path / "multirun")}
    proc = subprocess.run(sam_bench_cmd() + ["train", *ARGS, *overrides, f"hydra.run.dir={tmp_path / 'run'}"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "run" / "result.json").exists()


@pytest.mark.parametrize("fault", ["checkpoint_written@2", "checkpoint_rotated@2"])
def test_a_checkpoint_rotation_cut_by_a_kill_is_finished_by_rank_0_alone(cli_env, tmp_path, fault, clean_3_epochs):
    """Rank 0 killed between writing the next checkpoint and renaming it in (end of epoch 2 of 3):
    on resume every rank reads the checkpoint first and rank 0 alone finishes the renames (before,
    each rank did, and the second's renames lost checkpoint.pt or a rank resumed from another step
    and hung). The run ends as the uninterrupted one, with both checkpoints readable."""
    args = [*ARGS, "trainer.epochs=3"]
    victim = tmp_path / "victim"
    killed = subprocess.run(torchrun_cmd(2) + ["train", *args, f"hydra.run.dir={victim}"],
                            env={**cli_env, "SAM_BENCH_FAULT": fault}, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and not (victim / "result.json").exists()
    run(torchrun_cmd(2) + ["train", *args, f"hydra.run.dir={victim}"], cli_env)
    assert max_diff(weights(victim), weights(clean_3_epochs)) == 0.0
    epochs = {name: torch.load(victim / name, weights_only=True)["epoch"] for name in ("checkpoint.pt", "checkpoint.prev.pt")}
    assert epochs == {"checkpoint.pt": 3, "checkpoint.prev.pt": 2}


#: torchrun's entry for the test below: rank 0's checkpoint writes fail as on a full disk, then `sam-bench`
RANK0_DISK_FULL = """
import errno, os
if os.environ["RANK"] == "0":
    from sam_bench.engine import checkpoint as ckpt
    def no_space(path, data):
        raise ckpt.CheckpointWriteError(ckpt.write_failure(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path.parent))
    ckpt._write_atomic = no_space
from sam_bench.cli import main
main()
"""


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_at_once_with_its_line(cli_env, tmp_path):
    """Rank 0 cannot write the epoch-1 checkpoint (of 2): it stopped with its one line while rank 1 went
    on into the next step's all-reduce, where gloo failed it once rank 0's process was gone (a "Connection
    closed by peer" traceback), and NCCL would have held it until torchrun's SIGKILL. Now the ranks agree
    on the write: both stop at once, rank 1 with rank 0's line."""
    script = tmp_path / "rank0_disk_full.py"
    script.write_text(RANK0_DISK_FULL)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = subprocess.run([*torchrun_cmd(2)[:3], str(script), "train", *ARGS, "trainer.epochs=2", f"hydra.run.dir={run_dir}"],
                          env=cli_env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    line = (f"cannot write {run_dir / '.checkpoint.next.pt'} (No space left on device); no checkpoint was written yet: free "
            "space (or raise the quota) and re-run the same command to train from the start")
    assert proc.returncode != 0 and took < 120
    assert f"sam-bench: error: {line}\n" in proc.stderr, proc.stderr[-3000:]
    assert f"sam-bench: error: rank 0 stopped the run: {line}\n" in proc.stderr, proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr and "sam_bench/" not in proc.stderr  # no traceback of ours
    assert (run_dir / "train.log").read_text().count(line) == 1  # rank 0's; rank 1 logs no line of its own
