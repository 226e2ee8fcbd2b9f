"""The run directory: writable, and owned by one process at a time.

Two processes training into the same directory would interleave checkpoints and metrics; the
second one therefore fails at once (``fcntl.flock`` on ``.lock``, released by the kernel when
the holder exits or dies, so a killed run never leaves a stale lock behind).
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


def refuse_if_in_use(run_dir: Path) -> None:
    """Fail (ConfigError) if a running sam-bench holds ``run_dir``'s lock; takes nothing. Called before
    Hydra writes the command's ``.hydra/`` files there, which would overwrite the running job's."""
    path = Path(run_dir) / LOCK_FILE
    if path.is_file():
        with open(path, "a+") as f:  # closing releases the probe's lock at once
            _lock_or_refuse(f, run_dir)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the duration of the block; fail fast if taken."""
    path = Path(run_dir) / LOCK_FILE
    f = open(path, "a+")
    try:
        _lock_or_refuse(f, run_dir)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
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
                refuse_if_in_use(directory)
        except ConfigError as e:
            print(f"sam-bench: error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
