"""Checkpoints of the full training state, written atomically and verified on load.

``checkpoint.pt`` is the newest; the one before it is kept as ``checkpoint.prev.pt`` so a file
damaged after its write (or a crash between the two renames) still leaves a good one to resume
from. Files hold plain containers and tensors only: ``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from sam_bench.errors import CheckpointError
from sam_bench.tracking.results import atomic_write_bytes

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
REQUIRED_KEYS = ("format", "epoch", "step", "model", "optimizer", "rng", "history", "config_hash")


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Serialise, write atomically, then rotate: the old newest becomes the previous."""
    buf = io.BytesIO()
    torch.save(state, buf)
    run_dir = Path(run_dir)
    newest, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    tmp_target = run_dir / ".checkpoint.next.pt"
    atomic_write_bytes(tmp_target, buf.getvalue())
    if newest.exists():
        os.replace(newest, previous)
    os.replace(tmp_target, newest)


def _read(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"missing keys {missing}")
    return state


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The most advanced readable checkpoint in ``run_dir``; None if there is none at all.

    Unreadable files (truncated, corrupt) are reported and skipped; if every file is
    unreadable, :class:`CheckpointError` says so rather than silently starting over.
    """
    run_dir = Path(run_dir)
    candidates = [p for p in (run_dir / CHECKPOINT, run_dir / ".checkpoint.next.pt", run_dir / PREVIOUS) if p.exists()]
    good, errors = [], []
    for path in candidates:
        try:
            good.append(_read(path))
        except Exception as e:  # truncated, corrupt, foreign file
            first_line = str(e).splitlines()[0] if str(e) else ""
            errors.append(f"{path} ({type(e).__name__}: {first_line})")
            log.warning("checkpoint %s is unreadable (%s: %s); using an older one if any", path, type(e).__name__, first_line)
    if good:
        return max(good, key=lambda s: (s["epoch"], s["step"]))
    if errors:
        raise CheckpointError(f"no readable checkpoint in {run_dir}: {'; '.join(errors)}. Delete the run directory to start over")
    return None


def check_config_matches(saved: dict, current: dict, run_dir: Path) -> None:
    """Refuse to resume a run whose semantic config differs; name the keys that differ."""
    diffs = sorted(_diff(saved, current))
    if diffs:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:8])
        raise CheckpointError(
            f"{run_dir} holds a checkpoint of a different config ({shown}); use another run directory "
            "(hydra.run.dir=...) or delete this one to start over"
        )


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]
