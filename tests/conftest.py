import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2` (README): one torch thread per worker, and per
    # CLI subprocess it starts (they inherit the variable); two workers of two threads each on two cores
    # ran the suite 10 % slower (9 min 8 s against 8 min 13 s, 2026-11-29)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS: torch reads it when it is imported)

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _same_torch_seed_for_every_test():
    """Each test starts from torch seed 0, whatever ran before it."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def compose_train():
    """``compose_train(overrides)``: the train config as ``sam-bench train <overrides>`` composes it (no run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sam_bench.cli import _register
    from sam_bench.paths import config_dir

    _register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield lambda overrides=(): compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()


@pytest.fixture
def restore_torch_globals():
    """fit() sets the thread count and deterministic mode process-wide; keep them local to a test
    (modules that call fit use it for every test: ``pytestmark = pytest.mark.usefixtures(...)``)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def cli_env_under(root: Path) -> dict:
    """Environment for CLI subprocesses: runs and data under ``root``, no TTY progress bars."""
    env = dict(os.environ)
    env.update(
        SAM_BENCH_RUNS=str(root / "runs"),
        SAM_BENCH_MULTIRUN=str(root / "multirun"),
        SAM_BENCH_DATA=str(root / "data"),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def cli_env(tmp_path):
    """Environment for CLI subprocesses: runs and data under tmp_path, no TTY progress bars."""
    return cli_env_under(tmp_path)


def sam_bench_cmd() -> list[str]:
    """`python -m sam_bench` with the interpreter running the tests."""
    return [sys.executable, "-m", "sam_bench"]


# ---- `sam-bench` in a pre-imported child -----------------------------------------------------------

#: What `python -m sam_bench` spends its start-up importing (torch, timm, torchvision, Hydra,
#: matplotlib): several seconds of every CLI subprocess. The forkserver imports it once.
CLI_PRELOAD = ["sam_bench.cli", "sam_bench.engine.trainer", "sam_bench.analysis.spectrum", "sam_bench.report"]


def _cli_child(args: list[str], env: dict, cwd: str | None, out: str, err: str) -> None:
    """In a child of the forkserver: `sam-bench <args>` under ``env``, stdout and stderr to files."""
    import io
    import logging
    import traceback

    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), write_through=True) for fd in (1, 2))
    code = 0
    try:
        from sam_bench.cli import main

        main(list(args))
    except SystemExit as e:  # as the interpreter turns it into an exit status
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(code)  # multiprocessing exits with it, after its own clean-up (no leaked semaphores)


def _cli_forkserver() -> multiprocessing.context.BaseContext:
    """The forkserver context, its server started (at the first forked run of a session) with the CLI's
    modules preloading. Not earlier: on two busy cores its import slows the tests it would overlap."""
    import multiprocessing.forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(CLI_PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return ctx


def _fit_child(cfg, run_dir: str, fault: str | None, env: dict) -> None:
    """In a child of the forkserver: ``fit(cfg, run_dir)`` under ``env``, dying at ``fault``
    (``SAM_BENCH_FAULT``) if given; exits 0, PREEMPTED_EXIT_CODE, 1 (an error, printed) or by the signal."""
    import traceback

    from sam_bench.engine.signals import PREEMPTED_EXIT_CODE, Preempted
    from sam_bench.engine.trainer import fit

    os.environ.clear()
    os.environ.update(env)
    if fault:
        os.environ["SAM_BENCH_FAULT"] = fault
    try:
        fit(cfg, run_dir)
    except Preempted:
        os._exit(PREEMPTED_EXIT_CODE)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def fit_forked(cfg, run_dir: Path, fault: str | None = None, timeout: float = 120) -> int:
    """``fit(cfg, run_dir)`` in a child of the forkserver (see :func:`sam_bench_forked` for why not a
    fork of the test process), with this process's environment, optionally dying at a fault point
    (``SAM_BENCH_FAULT``); its exit status (negative: killed by that signal)."""
    proc = _cli_forkserver().Process(target=_fit_child, args=(cfg, str(run_dir), fault, dict(os.environ)))
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise subprocess.TimeoutExpired(["fit", str(run_dir)], timeout)
    return proc.exitcode


def sam_bench_forked(args: list[str], env: dict, timeout: float = 300, cwd: str | None = None) -> subprocess.CompletedProcess:
    """`python -m sam_bench <args>` without the interpreter start-up: the same ``main()`` in a child of
    a forkserver that has imported the CLI's modules (once per test session: the first forked run
    waits for that import, the later ones start at once), with this environment,
    and its exit status (negative: killed by that signal), stdout and stderr as a CompletedProcess.

    The forkserver is a fresh interpreter that has run no torch op, so its children start as a new
    process does (torch's default thread count, no OpenMP pool, no test's global state, Python's
    default warning filters), which forking the test process itself would not give: a child forked
    after the test process ran a parallel op on two or more threads hangs in its own first one
    (libgomp). What it does not see is the
    start-up itself (an import error, a warning printed at import). So: for the runs a test sets up
    or compares with, repeats of a command, and error messages checked for their text; a test about
    the process (signals, one-line stderr, start-up) runs `sam_bench_cmd()` in a real subprocess."""
    ctx = _cli_forkserver()
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = ctx.Process(target=_cli_child, args=(list(args), dict(env), None if cwd is None else str(cwd), out, err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["sam-bench", *args], timeout)
        read = lambda path: Path(path).read_text() if os.path.exists(path) else ""  # noqa: E731
        return subprocess.CompletedProcess(["sam-bench", *args], proc.exitcode, read(out), read(err))
