"""The run directory: writable, and owned by one process at a time.

Two processes training into the same directory would interleave checkpoints and metrics; the
second one therefore fails at once (``fcntl.flock`` on ``.lock``, released by the kernel when
the holder exits or dies, so a killed run never leaves a stale lock behind). ``sam-bench train``
takes it before Hydra writes the command's ``.hydra/`` files into the directory, and the trainer
takes it over from there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from hydra.experimental.callback import Callback

from sam_bench.errors import ConfigError

LOCK_FILE = ".lock"


def ensure_writable(run_dir: Path, key: str = "hydra.run.dir") -> None:
    """Create ``run_dir`` and prove a file can be written there, or say which key to change."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise ConfigError(
            f"output directory {run_dir} is not writable ({e.strerror or type(e).__name__}); "
            f"choose a writable place with {key}=/path/to/dir"
        ) from None


def _lock_or_refuse(f, run_dir: Path) -> None:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        raise ConfigError(
            f"{run_dir} is in use by another sam-bench process (pid {holder}); wait for it to finish, "
            "or give this run its own directory with hydra.run.dir=..."
        ) from None


#: the files Hydra writes into ``<run dir>/.hydra/`` before the job runs
HYDRA_FILES = ("config.yaml", "overrides.yaml", "hydra.yaml")

#: lock files this process took before Hydra wrote the command's ``.hydra/`` files (by the run
#: directory's real path), for :func:`run_lock` to take over
_early_locks: dict[str, Any] = {}
#: the ``.hydra/`` files of those directories as they were before Hydra rewrote them (None: absent)
_hydra_before: dict[str, dict[str, bytes | None]] = {}


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


def _write_pid(f) -> None:
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()


def _take_lock(run_dir: Path):
    """The open lock file of ``run_dir``, locked by this process with its pid written in it
    (ConfigError, the file closed, if a running sam-bench holds it)."""
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        _lock_or_refuse(f, run_dir)
    except BaseException:
        f.close()
        raise
    _write_pid(f)
    return f


def lock_before_hydra(run_dir: Path) -> None:
    """Take ``run_dir``'s lock (ConfigError if a running sam-bench holds it) before Hydra writes this
    command's ``.hydra/`` files there, and note those files as they are. The trainer's
    :func:`run_lock` takes the lock over, so no other command gets in between (a lock taken only
    once the trainer ran, seconds later, let a second command rewrite a running job's ``.hydra/``);
    a command the trainer refuses puts the noted files back (:func:`hydra_files_before`)."""
    run_dir = Path(run_dir)
    _early_locks[_key(run_dir)] = _take_lock(run_dir)
    before = {}
    for name in HYDRA_FILES:
        try:
            before[name] = (run_dir / ".hydra" / name).read_bytes()
        except OSError:
            before[name] = None
    _hydra_before[_key(run_dir)] = before


def hydra_files_before(run_dir: Path) -> dict[str, bytes | None] | None:
    """``run_dir``'s ``.hydra/`` files as they were before Hydra wrote this command's (None for one that
    did not exist); None when this process did not note them (no :func:`lock_before_hydra`: a
    sweep point, torchrun, or :func:`~sam_bench.engine.trainer.fit` called directly)."""
    return _hydra_before.get(_key(run_dir))


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the duration of the block; fail fast if taken.
    A lock this process took already (:func:`lock_before_hydra`) is taken over, not taken again."""
    f = _early_locks.pop(_key(run_dir), None) or _take_lock(Path(run_dir))
    try:
        yield
    finally:
        f.close()  # closing the descriptor releases the lock


class OutputDirCheck(Callback):
    """Hydra callback: check the output directory before Hydra creates it (and fails with a traceback)."""

    def _check(self, config: Any, key: str) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        HydraConfig.instance().set_config(config)  # lets ${hydra:...} in the directory resolve
        directory = Path(str(OmegaConf.select(config, key)))
        try:
            ensure_writable(directory, key)
            if key == "hydra.run.dir" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
                # (under torchrun the ranks learn it together inside the trainer, so that every rank says so:
                # one rank leaving here first would have torchrun kill the others mid-sentence)
                lock_before_hydra(directory)
        except ConfigError as e:
            print(f"sam-bench: error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
