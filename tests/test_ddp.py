"""torchrun with 2 CPU ranks (gloo): the trainer's DDP path equals single-process m-sharpness."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import sam_bench_cmd

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


def test_two_ranks_equal_single_process_m_sharpness_and_only_rank0_writes(cli_env, tmp_path):
    ddp = tmp_path / "ddp"
    out = run(torchrun_cmd(2) + ["train", *ARGS, f"hydra.run.dir={ddp}"], cli_env)
    run(sam_bench_cmd() + ["train", *ARGS, "optimizer.m=32", f"hydra.run.dir={tmp_path / 'm32'}"], cli_env)
    run(sam_bench_cmd() + ["train", *ARGS, f"hydra.run.dir={tmp_path / 'plain'}"], cli_env)
    w_ddp, w_m32, w_plain = weights(ddp), weights(tmp_path / "m32"), weights(tmp_path / "plain")
    # per-rank perturbation == m-sharpness with m = per-rank batch (fp32 rounding only) ...
    assert max_diff(w_ddp, w_m32) < 1e-5
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
