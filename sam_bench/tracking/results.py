"""Run outputs written atomically: ``metrics.jsonl`` (one line per epoch) and ``result.json``."""

from __future__ import annotations

import errno
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from sam_bench.errors import SamBenchError

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
#: written when training diverged: {"config_hash", "error"}; removed when the directory completes
DIVERGED_FILE = "diverged.json"


class WriteError(SamBenchError):
    """A file of the run could not be written (disk full, quota, I/O or permission error); the
    message names the file, the cause, and what re-running the command does."""


def fix_for(error: OSError) -> str:
    """What to do about ``error``, the OSError of a failed write, in a few words."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space (or raise the quota)"
    if error.errno == errno.EFBIG:
        return "raise the file size limit"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the run directory writable"
    return "fix the cause (the disk, the file system)"


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (mkstemp's is 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


#: temporaries get it before the rename, so results on a shared disk stay readable by the group
FILE_MODE = _file_mode()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` from the checkpointed history (so it never has stale lines)."""
    atomic_write_bytes(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history).encode())


def read_result(run_dir: Path) -> dict | None:
    """The run's result if it completed, else None."""
    path = Path(run_dir) / RESULT_FILE
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("status") == "complete" else None


def git_commit() -> str | None:
    """HEAD of the sam-bench checkout this code runs from (None for a wheel install)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    import hydra
    import timm
    import torch
    import torchvision

    import sam_bench

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "hydra": hydra.__version__,
        "sam_bench": sam_bench.__version__,
    }


def write_divergence(run_dir: Path, config_hash: str, error: str) -> None:
    """Record that training with this config diverged in ``run_dir`` (a re-run is told at once)."""
    atomic_write_json(Path(run_dir) / DIVERGED_FILE, {"config_hash": config_hash, "error": error})


def read_divergence(run_dir: Path) -> dict | None:
    """The run directory's divergence record, or None."""
    try:
        record = json.loads((Path(run_dir) / DIVERGED_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
