"""Error-vs-ρ plots as PNG bytes that are identical for identical inputs.

Uses the object-oriented Agg API (no pyplot global state) and strips the PNG's "Software"
metadata, so the bytes depend only on the data, matplotlib's version and its bundled font.
"""

from __future__ import annotations

import io

from sam_bench.report.collect import ci95
from sam_bench.report.sweeps import Sweep


def sweep_png(sweep: Sweep) -> bytes:
    """Test error (mean ± 95 % CI) against ρ, one line per optimizer/m; the ρ chosen on validation starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, groups in sweep.series.items():
        x = [g.rho for g in groups]
        y = [g.mean for g in groups]
        err = [ci95(g.errors) or 0.0 for g in groups]
        line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        chosen = sweep.chosen(label)
        if chosen is not None:
            ax.plot([chosen.rho], [chosen.mean], marker="*", markersize=16, linestyle="none",
                    color=line[0].get_color(), markeredgecolor="black")
    positive = [r for r in sweep.rhos if r > 0]
    if positive and max(positive) / min(positive) >= 100:  # decades of ρ (Fig. 6): log scale, ρ = 0 still drawn
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel("ρ")
    ax.set_ylabel("test error (%)")
    ax.set_title(sweep.name or sweep.id, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(title="★ = ρ chosen on validation", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
