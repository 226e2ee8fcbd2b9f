"""TensorBoard HParams for ρ sweeps: one sub-run per (sweep, optimizer/m, ρ) under ``<out>/tensorboard``.

Written into the report directory, not into the runs, so the report never writes outside ``out``.
Event files carry wall-clock times, so this part is not byte-stable: it is off unless
``tensorboard=true`` (``sam-bench report tensorboard=true``; then ``tensorboard --logdir results/tensorboard``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from statistics import fmean

from sam_bench.report.collect import ci95
from sam_bench.report.paper import slug
from sam_bench.report.sweeps import Sweep


def write_hparams(sweeps: list[Sweep], out: Path) -> list[Path]:
    """``add_hparams(run_name=".")`` for every sweep point (so no timestamped sub-directory appears)."""
    from torch.utils.tensorboard import SummaryWriter

    root = Path(out) / "tensorboard"
    shutil.rmtree(root, ignore_errors=True)  # the report's own directory: a second report adds no second copy of each point
    written = []
    for s in sweeps:
        for label, groups in s.series.items():
            chosen = s.chosen(label)
            for g in groups:
                log_dir = root / s.id / f"{slug(label)}_rho{g.rho:g}"
                if log_dir in written:  # two groups at one (series, ρ): each its own point
                    log_dir = log_dir.with_name(f"{log_dir.name}_{sum(d.name.startswith(log_dir.name) for d in written)}")
                m = g.config.get("optimizer", {}).get("m")
                hparams = {"rho": g.rho, "optimizer": g.method, "m": -1 if m is None else int(m), "sweep": s.name or s.id}
                metrics = {"hparam/test_error": g.mean, "hparam/test_error_ci95": ci95(g.errors) or 0.0,
                           "hparam/n_seeds": float(len(g.runs)), "hparam/chosen_on_val": float(chosen is g)}
                if g.val_errors:
                    metrics["hparam/val_error"] = fmean(g.val_errors)
                with SummaryWriter(log_dir=str(log_dir)) as w:
                    w.add_hparams(hparams, metrics, run_name=".")
                written.append(log_dir)
    return written
