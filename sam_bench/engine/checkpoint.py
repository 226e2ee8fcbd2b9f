"""Checkpoints of the full training state, written atomically and verified on load.

``checkpoint.pt`` is the newest; the one before it is kept as ``checkpoint.prev.pt`` so a file
damaged after its write (or a crash between the two renames) still leaves a good one to resume
from. Files hold plain containers and tensors only: ``torch.load(weights_only=True)`` reads them.

``torch.load`` notices a truncated file but not a flipped byte inside tensor data, so every file
carries a SHA-256 of its content (``checksum``), recomputed on load.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from sam_bench.engine.faults import fault_point
from sam_bench.engine.rundir import own_directory_hint
from sam_bench.errors import CheckpointError
from sam_bench.tracking.results import WriteError, fix_for, fsync_dir

log = logging.getLogger(__name__)

FORMAT = 2
CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
NEXT = ".checkpoint.next.pt"
#: prefix of the lasting per-epoch copies (``trainer.keep_epochs``), see :func:`kept_name`
KEPT_PREFIX = "checkpoint_epoch"
REQUIRED_KEYS = ("format", "epoch", "step", "model", "optimizer", "rng", "history", "config_hash")


class CheckpointWriteError(CheckpointError, WriteError):
    """A checkpoint could not be written; the files already there are untouched."""


def write_failure(path: Path, error: OSError, run_dir: Path, checkpointing: bool = True) -> str:
    """The one line for a file of the run that could not be written: the file, the cause, the state
    of the checkpoints, and what re-running the same command then does."""
    if not checkpointing:
        state, rerun = "trainer.checkpoint=false keeps no checkpoint", "train again from epoch 1"
    elif checkpoint_files(run_dir):
        state, rerun = "the checkpoints already there are intact", "resume from them"
    else:
        state, rerun = "no checkpoint was written yet", "train from the start"
    return f"cannot write {path} ({error.strerror or error}); {state}: {fix_for(error)} and re-run the same command to {rerun}"


def content_digest(obj: Any) -> str:
    """SHA-256 of a nested structure of dicts, sequences, tensors and scalars (order-stable)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):  # torch.load may turn one into the other
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def _write_atomic(path: Path, data: bytes) -> None:
    """Temporary file in the same directory, fsync, rename: ``path`` is whole or absent."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            fault_point("checkpoint_partial")
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, file size limit: one line, no half-written temporary left
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(write_failure(path, e, path.parent)) from e


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep_as: str | None = None) -> Path:
    """Serialise with a checksum, write atomically, then rotate: the old newest becomes the previous.

    ``keep_as``: also write the same bytes under this name (a lasting copy that resuming reads only when
    the newest and previous are unreadable), before the rotation, so a crash cannot leave a resumable
    checkpoint without its copy."""
    state = {**state, "format": FORMAT}
    state["checksum"] = content_digest({k: v for k, v in state.items() if k != "checksum"})
    buf = io.BytesIO()
    torch.save(state, buf)
    run_dir = Path(run_dir)
    if keep_as is not None:
        _write_atomic(run_dir / keep_as, buf.getvalue())
    newest, previous, nxt = run_dir / CHECKPOINT, run_dir / PREVIOUS, run_dir / NEXT
    _write_atomic(nxt, buf.getvalue())
    try:  # the renames (an I/O error): whatever step it stops at, resuming finds a whole checkpoint
        fsync_dir(run_dir)
        fault_point("checkpoint_written")
        if newest.exists():
            os.replace(newest, previous)
        fault_point("checkpoint_rotated")
        os.replace(nxt, newest)
        fsync_dir(run_dir)
    except OSError as e:
        raise CheckpointWriteError(write_failure(newest, e, run_dir)) from e
    return newest


def complete_rotation(run_dir: Path, loaded: Path) -> Path:
    """Finish the rotation a kill interrupted when the checkpoint resumed from is the new one not yet
    renamed (``NEXT``): the newest becomes the previous, ``NEXT`` the newest, as
    :func:`save_checkpoint` would have ended. Returns where the loaded checkpoint now is."""
    run_dir = Path(run_dir)
    if Path(loaded).name != NEXT:
        return Path(loaded)
    newest = run_dir / CHECKPOINT
    if newest.exists():
        os.replace(newest, run_dir / PREVIOUS)
    os.replace(run_dir / NEXT, newest)
    fsync_dir(run_dir)
    return newest


def kept_name(epoch: int) -> str:
    """The lasting copy of the checkpoint at the end of ``epoch`` (``trainer.keep_epochs``)."""
    return f"{KEPT_PREFIX}{epoch:04d}.pt"


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete half-written temporaries left by a process killed mid-write (call under the run lock)."""
    # ".*.tmp": the next checkpoint's (.checkpoint.next.pt.<pid>.tmp) and every atomic_write_bytes one (.<name>.<random>.tmp)
    for pattern in (".*.tmp", f"{KEPT_PREFIX}*.pt.*.tmp"):
        for tmp in Path(run_dir).glob(pattern):
            tmp.unlink(missing_ok=True)


class ReadError(OSError):
    """The file could not be read (an I/O or permission error): its content may well be intact."""


class _CheckpointFile(io.FileIO):
    """A file whose read errors are :class:`ReadError`, told apart from what ``torch.load`` raises
    about the content (a truncated file is an OSError too: EINVAL, from a seek)."""

    def __init__(self, path: Path):
        try:
            super().__init__(path, "rb")
        except OSError as e:
            raise ReadError(e.errno, e.strerror, str(path)) from e

    def _reading(self, method, *args):
        try:
            return method(*args)
        except OSError as e:
            raise ReadError(e.errno, e.strerror, self.name) from e

    def read(self, size: int = -1) -> bytes:
        return self._reading(super().read, size)

    def readinto(self, b) -> int:
        return self._reading(super().readinto, b)

    def readall(self) -> bytes:
        return self._reading(super().readall)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify one file; raises :class:`ReadError` when it cannot be read (I/O error,
    permission), another exception on truncation, corruption or a foreign file."""
    with _CheckpointFile(path) as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"not a sam-bench checkpoint (a {type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"missing keys {missing}")
    if state["format"] >= 2:
        stored = state.get("checksum")
        actual = content_digest({k: v for k, v in state.items() if k != "checksum"})
        if stored != actual:
            raise ValueError(f"checksum mismatch (stored {str(stored)[:12]}, content {actual[:12]}): the file is damaged")
    return state


def checkpoint_files(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    return [p for p in (run_dir / CHECKPOINT, run_dir / NEXT, run_dir / PREVIOUS) if p.exists()]


def _read_or_why(path: Path) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(state, None, None) for a good file; else (None, why, how): ``how`` is "unreadable" (a
    :class:`ReadError` twice: a one-off error is read past; the file may well be intact) or
    "damaged" (its content: truncated, corrupt, foreign)."""
    for attempt in (1, 2):
        try:
            return read_checkpoint(path), None, None
        except ReadError as e:
            if attempt == 2:
                return None, f"cannot be read: {e.strerror or e}", "unreadable"
        except Exception as e:  # truncated, corrupt, foreign file
            first_line = str(e).splitlines()[0].split(". ")[0] if str(e) else ""  # torch's first sentence says it
            return None, f"{type(e).__name__}: {first_line}", "damaged"
    raise AssertionError("unreachable")


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The most advanced verified checkpoint in ``run_dir`` and its path; None if there is none.

    Damaged files (truncated, corrupt) and unreadable ones (an I/O or permission error) are reported
    and skipped; if every file is, :class:`CheckpointError` says so rather than silently starting
    over, and advises deleting the run directory only when every file is damaged.
    """
    good, damaged, unreadable = [], [], []
    for path in checkpoint_files(run_dir):
        state, why, how = _read_or_why(path)
        if state is not None:
            good.append((state, path))
            continue
        (unreadable if how == "unreadable" else damaged).append(f"{path} ({why})")
        log.warning("checkpoint %s is %s (%s); using an older one if any", path, how, why)
    if good:
        return max(good, key=lambda sp: (sp[0]["epoch"], sp[0]["step"]))
    if damaged or unreadable:
        for path in sorted(Path(run_dir).glob(f"{KEPT_PREFIX}*.pt"), reverse=True):  # trainer.keep_epochs copies, newest first
            state, _, _ = _read_or_why(path)
            if state is None:  # damaged or unreadable too: try the one before
                continue
            log.warning("no readable newest or previous checkpoint in %s; resuming from the kept copy %s", run_dir, path.name)
            return state, path
        if unreadable:  # not to be deleted: the files may be intact
            raise CheckpointError(f"no checkpoint in {run_dir} could be read: {'; '.join(unreadable + damaged)}. A file that "
                                  "cannot be read may be intact: fix the cause (its permissions, the disk) and re-run the "
                                  "same command to resume")
        raise CheckpointError(f"no readable checkpoint in {run_dir}: {'; '.join(damaged)}. Delete the run directory to start over")
    return None


def set_aside_damaged_newest(run_dir: Path, loaded: Path) -> None:
    """Resuming from an older file than ``checkpoint.pt`` means the newest was not read: when its
    content is damaged, rename it ``checkpoint.pt.damaged`` (``.damaged.1``, ... when that is taken:
    a file set aside is never overwritten) so the next save does not rotate it over the good file
    just used. A newest file that could not be read (an I/O or permission error) may be intact: it
    stays, and the next save makes it the previous one."""
    newest = Path(run_dir) / CHECKPOINT
    if Path(loaded) == newest or Path(loaded).name == NEXT or not newest.exists():
        return
    state, why, how = _read_or_why(newest)
    if how != "damaged":
        if how == "unreadable":
            log.warning("%s %s: left in place (not damaged, as far as is known)", newest, why)
        return
    aside = newest.with_name(f"{CHECKPOINT}.damaged")
    n = 0
    while aside.exists():
        n += 1
        aside = newest.with_name(f"{CHECKPOINT}.damaged.{n}")
    os.replace(newest, aside)
    fsync_dir(Path(run_dir))
    log.warning("%s is damaged (%s): kept as %s", newest, why, aside.name)


def check_config_matches(saved: dict, current: dict, run_dir: Path, what: str = "a checkpoint") -> None:
    """Refuse to resume a run whose semantic config differs; name the keys that differ."""
    diffs = sorted(_diff(saved, current))
    if diffs:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:8])
        raise CheckpointError(
            f"{run_dir} holds {what} of a different config ({shown}); use another run directory "
            f"({own_directory_hint()}) or delete this one to start over"
        )


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]
