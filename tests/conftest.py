import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cli_env(tmp_path):
    """Environment for CLI subprocesses: runs and data under tmp_path, no TTY progress bars."""
    env = dict(os.environ)
    env.update(
        SAM_BENCH_RUNS=str(tmp_path / "runs"),
        SAM_BENCH_MULTIRUN=str(tmp_path / "multirun"),
        SAM_BENCH_DATA=str(tmp_path / "data"),
        PYTHONUNBUFFERED="1",
    )
    return env


def sam_bench_cmd() -> list[str]:
    """`python -m sam_bench` with the interpreter running the tests."""
    return [sys.executable, "-m", "sam_bench"]
