"""The run directory: writable, and owned by one process at a time.

Two processes training into the same directory would interleave checkpoints and metrics; the
second one therefore fails at once (``fcntl.flock`` on ``.lock``, released by the kernel when
the holder exits or dies, so a killed run never leaves a stale lock behind). ``sam-bench train``
takes it before Hydra writes the command's ``.hydra/`` files into the directory, and the trainer
takes it over from there.

Hydra writes those files before any code of ours can look at the directory in a sweep point (in
``run_job``, before the ``on_job_start`` callbacks) and on every rank under torchrun, so a command
the trainer refuses there (another config's run) would leave its files describing a run it never
trained. The run that owns the directory therefore records its own in :data:`OWNER_FILE` once the
trainer's checks passed (:func:`claim_hydra_files`), and a command refused or failing before that
point puts them back (:func:`restore_hydra_files`), in every launch mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from hydra.experimental.callback import Callback

from sam_bench.errors import ConfigError

LOCK_FILE = ".lock"
#: the ``.hydra/`` files of the run that owns the directory, as its command's Hydra wrote them (JSON:
#: file name -> text, null for one that did not exist), which a refused command puts back
OWNER_FILE = ".hydra_owner.json"

log = logging.getLogger("sam_bench")


def ensure_writable(run_dir: Path, key: str = "hydra.run.dir", example: str = "/path/to/dir") -> None:
    """Create ``run_dir`` and prove a file can be written there, or say which key to change (to
    ``example``: a directory, or for a key naming a file, a file)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise ConfigError(
            f"output directory {run_dir} is not writable ({e.strerror or type(e).__name__}); "
            f"choose a writable place with {key}={example}"
        ) from None


def own_directory_hint() -> str:
    """How to give this command its own run directory: ``hydra.run.dir=...`` for a single run, the
    sweep's keys for a point of a ``-m`` sweep (where ``hydra.run.dir`` changes nothing)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return "hydra.sweep.dir=... or hydra.sweep.subdir=..."
    except Exception:  # noqa: BLE001 - no Hydra config (fit called directly): a single run's key
        pass
    return "hydra.run.dir=..."


def _lock_or_refuse(f, run_dir: Path) -> None:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        raise ConfigError(
            f"{run_dir} is in use by another sam-bench process (pid {holder}); wait for it to finish, "
            f"or give this run its own directory with {own_directory_hint()}"
        ) from None


#: the files Hydra writes into ``<run dir>/.hydra/`` before the job runs
HYDRA_FILES = ("config.yaml", "overrides.yaml", "hydra.yaml")

#: lock files this process took before Hydra wrote the command's ``.hydra/`` files (by the run
#: directory's real path), for :func:`run_lock` to take over
_early_locks: dict[str, Any] = {}
#: the ``.hydra/`` files of those directories as they were before Hydra rewrote them (None: absent)
_hydra_before: dict[str, dict[str, bytes | None]] = {}
#: this command's ``.hydra/`` files, noted when :func:`run_lock` began, until :func:`claim_hydra_files`
_hydra_mine: dict[str, dict[str, bytes | None]] = {}


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


def read_hydra_files(run_dir: Path) -> dict[str, bytes | None]:
    """``run_dir``'s ``.hydra/`` :data:`HYDRA_FILES` as they are now (None for one that does not exist)."""
    files = {}
    for name in HYDRA_FILES:
        try:
            files[name] = (Path(run_dir) / ".hydra" / name).read_bytes()
        except OSError:
            files[name] = None
    return files


def lock_before_hydra(run_dir: Path) -> None:
    """Take ``run_dir``'s lock (ConfigError if a running sam-bench holds it) before Hydra writes this
    command's ``.hydra/`` files there, and note those files as they are. The trainer's
    :func:`run_lock` takes the lock over, so no other command gets in between (a lock taken only
    once the trainer ran, seconds later, let a second command rewrite a running job's ``.hydra/``);
    a command the trainer refuses puts the noted files back (:func:`restore_hydra_files`)."""
    run_dir = Path(run_dir)
    _early_locks[_key(run_dir)] = _take_lock(run_dir)
    _hydra_before[_key(run_dir)] = read_hydra_files(run_dir)


def _owner_files(run_dir: Path) -> dict[str, bytes | None] | None:
    """The files :data:`OWNER_FILE` records; None when there is none (a directory no run has claimed
    yet, or one of a version before the record) or it cannot be read."""
    try:
        saved = json.loads((Path(run_dir) / OWNER_FILE).read_text())
        # surrogateescape: the bytes as Hydra wrote them, whatever they are
        return {name: None if saved[name] is None else saved[name].encode("utf-8", "surrogateescape") for name in HYDRA_FILES}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_owner_files(run_dir: Path, files: dict[str, bytes | None]) -> None:
    from sam_bench.tracking.results import atomic_write_bytes

    text = {name: None if data is None else data.decode("utf-8", "surrogateescape") for name, data in files.items()}
    atomic_write_bytes(Path(run_dir) / OWNER_FILE, (json.dumps(text, indent=1) + "\n").encode())


def _put_back(run_dir: Path, files: dict[str, bytes | None]) -> None:
    """Make ``.hydra/``'s :data:`HYDRA_FILES` ``files`` (None: absent), rewriting only those that differ
    (each atomically); the folder goes when none was there and nothing else is in it."""
    from sam_bench.tracking.results import atomic_write_bytes

    hydra_dir = Path(run_dir) / ".hydra"
    now = read_hydra_files(run_dir)
    for name, data in files.items():
        if data == now[name]:
            continue
        if data is None:
            (hydra_dir / name).unlink(missing_ok=True)
        else:
            hydra_dir.mkdir(exist_ok=True)
            atomic_write_bytes(hydra_dir / name, data)
    if not any(files.values()) and hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
        hydra_dir.rmdir()


def restore_hydra_files(run_dir: Path) -> bool:
    """Put back ``run_dir``'s ``.hydra/`` files, which this command's Hydra rewrote before the trainer
    could refuse it: as the CLI noted them (:func:`lock_before_hydra`, a single run), else as the run
    that owns the directory recorded them (:data:`OWNER_FILE`: a sweep point, torchrun, a submitit
    job). False when neither is known (a directory of an older version, or no run has claimed it).
    Rank 0 alone calls it, once every rank is inside the trainer (past ``init_process_group``, so past
    Hydra's writing): no rank writes them again after it."""
    run_dir = Path(run_dir)
    files = _hydra_before.get(_key(run_dir))
    if files is None:
        files = _owner_files(run_dir)
    if files is None:
        return False
    if (run_dir / ".hydra").is_dir():  # else this command wrote none (hydra.output_subdir=null): nothing to undo
        try:
            _put_back(run_dir, files)
        except OSError as e:  # the refusal is the news: say this, and let it be told
            log.warning("could not put back %s/.hydra/ as it was (%s)", run_dir, e.strerror or e)
    return True


def claim_hydra_files(run_dir: Path) -> None:
    """This command passed the trainer's checks: ``run_dir`` is its run now. Record its ``.hydra/``
    files (as they were when it took the lock) in :data:`OWNER_FILE`, for a command refused there
    later to put back, and rewrite ``.hydra/`` with them where a command refused meanwhile (a sweep
    point meeting the busy directory before this claim) put back the previous owner's. Once per
    :func:`run_lock`; a no-op without one (torchrun's other ranks)."""
    mine = _hydra_mine.pop(_key(run_dir), None)
    if mine is None:
        return
    try:
        if _owner_files(run_dir) != mine:
            _write_owner_files(run_dir, mine)
        _put_back(run_dir, mine)
    except OSError as e:  # the run itself can go on; only a later refused command's clean-up is at stake
        log.warning("could not record %s/.hydra/ in %s (%s): a command refused there later may leave its own",
                    run_dir, OWNER_FILE, e.strerror or e)


def remove_unowned_leftovers(run_dir: Path) -> None:
    """Remove ``run_dir`` when it holds only what this command's CLI and Hydra wrote before the trainer
    refused or failed (``.lock``, ``.hydra/``, an empty ``train.log``) and no run owns it: a bad setting
    found while training was being set up (a precision the device lacks, missing data) left such a
    directory, which the report then listed for good as an unfinished run (QA). Anything else there
    (another file, a non-empty log) keeps it all; the working directory itself is never removed."""
    run_dir = Path(run_dir)
    try:
        if run_dir.resolve() == Path.cwd().resolve():
            return
        if not {p.name for p in run_dir.iterdir()} <= {LOCK_FILE, ".hydra", "train.log"}:  # OWNER_FILE too keeps it
            return
        hydra_dir = run_dir / ".hydra"
        if hydra_dir.is_dir() and not {p.name for p in hydra_dir.iterdir()} <= set(HYDRA_FILES):
            return
        if (run_dir / "train.log").exists() and (run_dir / "train.log").stat().st_size:
            return
        for name in HYDRA_FILES:
            (hydra_dir / name).unlink(missing_ok=True)
        if hydra_dir.is_dir():
            hydra_dir.rmdir()
        for name in ("train.log", LOCK_FILE):  # the lock goes with the directory (its holder, this process, is leaving)
            (run_dir / name).unlink(missing_ok=True)
        run_dir.rmdir()
    except OSError:  # best effort: the refusal is the news
        pass


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the duration of the block; fail fast if taken.
    A lock this process took already (:func:`lock_before_hydra`) is taken over, not taken again.

    Keeps the directory's ``.hydra/`` files those of the run that owns it: refused by the lock, or
    leaving the block with an exception before :func:`claim_hydra_files` (a refusal, a bad setting,
    a crash before training), this command puts the owner's back (:func:`restore_hydra_files`);
    leaving it normally (finished, or nothing to do) it claims the directory."""
    run_dir = Path(run_dir)
    key = _key(run_dir)
    f = _early_locks.pop(key, None)
    if f is None:
        try:
            f = _take_lock(run_dir)
        except ConfigError:  # a sweep point or torchrun: Hydra has rewritten the running job's files
            restore_hydra_files(run_dir)
            raise
    _hydra_mine[key] = read_hydra_files(run_dir)
    try:
        yield
    except BaseException:
        if key in _hydra_mine:  # it never owned the directory
            if (run_dir / OWNER_FILE).exists():  # another run's: its files go back
                restore_hydra_files(run_dir)
            else:
                remove_unowned_leftovers(run_dir)
        raise
    else:
        claim_hydra_files(run_dir)
        start_run_log(run_dir)
    finally:
        _hydra_mine.pop(key, None)
        _hydra_before.pop(key, None)
        f.close()  # closing the descriptor releases the lock


class RunLogHandler(logging.FileHandler):
    """``<run dir>/train.log`` (conf/hydra/job_logging/sam_bench.yaml), written from when this command
    owns the run directory on. Hydra opens the job's log before the trainer has looked at the directory,
    so the records are held until then: a command refused there (another config's run; a busy directory
    in a sweep or under torchrun) adds no line to that run's log. Held records are written, in order and
    with their own times, when the run takes the directory over (:func:`start_run_log`); at the end
    (close) of a command that never did, only where no run owns the directory (:data:`OWNER_FILE`) and
    the directory is still there (:func:`remove_unowned_leftovers` removes a refused first run's)."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None) -> None:
        super().__init__(filename, mode, encoding, delay=True)  # delay: a refused command does not even open it
        self._held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self._held is None:
            super().emit(record)
        else:
            self._held.append(record)

    def write_held(self) -> None:
        """Write the held records and every later one as it comes."""
        self.acquire()
        try:
            held, self._held = self._held, None
            for record in held or ():
                super().emit(record)
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            run_dir = Path(self.baseFilename).parent
            if self._held and run_dir.is_dir() and not (run_dir / OWNER_FILE).exists():
                self.write_held()
            self._held = None  # else another run's directory (its log is not this command's), or none left
        finally:
            self.release()
        super().close()


def start_run_log(run_dir: Path) -> None:
    """This process trains ``run_dir`` (its checks passed): its :class:`RunLogHandler` writes from now on.
    A no-op without one (``fit`` called outside the CLI)."""
    key = _key(run_dir)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogHandler) and _key(Path(handler.baseFilename).parent) == key:
            handler.write_held()


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
