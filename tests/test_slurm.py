"""Hydra's submitit launcher (the SLURM path) with submitit's local executor: a job preempted with
SIGUSR2 (submitit's preemption signal) checkpoints, is requeued, resumes, and ends bit-identical to
an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import sam_bench_cmd, sam_bench_forked

pytestmark = pytest.mark.slow

TINY = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=128", "model.kwargs.depth=10",
        "model.kwargs.width=1", "trainer.batch_size=32", "trainer.epochs=3", "trainer.progress=false",
        "trainer.checkpoint_every_steps=4"]


def test_preempted_submitit_job_requeues_and_resumes_identically(cli_env, tmp_path):
    clean = tmp_path / "clean"
    reference = sam_bench_forked(["train", *TINY, f"hydra.run.dir={clean}"], cli_env)  # the uninterrupted run, no start-up
    assert reference.returncode == 0, reference.stderr[-2000:]
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(sam_bench_cmd() + ["train", "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", *TINY],
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, ckpt = time.time() + 120, None
    while time.time() < deadline and ckpt is None:
        found = [p for p in sweep.glob("*/checkpoint.pt")] if sweep.exists() else []
        ckpt = found[0] if found else None
        time.sleep(0.05)
    assert ckpt is not None, "no checkpoint appeared"
    run_dir = ckpt.parent
    job_pid = int((run_dir / ".lock").read_text().split()[0])  # the job process holds the run lock
    os.kill(job_pid, signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    log = (run_dir / "train.log").read_text()
    assert "resuming" in log, log
    assert not (run_dir / "result.json").read_text() == ""
    got = json.loads((run_dir / "result.json").read_text())
    want = json.loads((clean / "result.json").read_text())
    assert got["status"] == "complete" and got["steps"] == want["steps"] == 24  # 3 epochs of 8; preempted after the first 4
    assert (got["final_test_error"], got["final_test_loss"]) == (want["final_test_error"], want["final_test_loss"])
    lines = lambda d: [json.loads(x)["train_loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(run_dir) == lines(clean)


def test_project_slurm_launcher_config_composes(cli_env):
    out = subprocess.run(sam_bench_cmd() + ["train", "--cfg", "hydra", "hydra/launcher=slurm"], env=cli_env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "SlurmLauncher" in out and "signal_delay_s: 120" in out and "gpus_per_node: 1" in out


def test_a_diverged_job_fails_under_the_submitit_launcher_and_the_others_still_run(cli_env, tmp_path):
    """Under a launcher that runs each point as a job of its own, a diverged point fails its job
    (the launcher then reports it and the command exits non-zero) instead of being skipped where
    the launching process never hears of it."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(sam_bench_cmd() + ["train", "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}",
                                             "hydra.sweep.subdir=${hydra.job.num}", *TINY, "trainer.epochs=1",
                                             "trainer.log_every_steps=1", "optimizer=sgd", "optimizer.grad_clip=null",
                                             "optimizer.lr=0.01,1e30"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "non-finite training loss or gradient" in proc.stdout + proc.stderr
    assert json.loads((sweep / "0" / "result.json").read_text())["status"] == "complete"
    assert not (sweep / "1" / "result.json").exists()


def test_the_slurm_launcher_off_a_cluster_is_one_line(cli_env, tmp_path):
    """Without sbatch/srun on PATH, submitit's refusal was a traceback after the sweep had started."""
    env = {**cli_env, "PATH": os.path.dirname(sys.executable)}  # no SLURM tools, whatever this machine has
    proc = subprocess.run(sam_bench_cmd() + ["train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", *TINY,
                                             "optimizer=sgd,sam", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "sam-bench: error: hydra/launcher=slurm submits SLURM jobs, but sbatch and srun are not on PATH: run the command on the "
        "cluster's login node, or try the sweep on this machine with hydra/launcher=submitit_local (sweep point optimizer=sgd)"], proc.stderr
    assert not (tmp_path / "sweep").exists()
