"""``sam-bench report``: collect finished runs and regenerate the summary tables."""

from __future__ import annotations

from pathlib import Path

from sam_bench.errors import ConfigError
from sam_bench.report.collect import find_runs, group_runs
from sam_bench.report.tables import markdown, to_csv
from sam_bench.tracking.results import atomic_write_bytes

__all__ = ["write_report"]


def write_report(roots: list[str], out: str) -> str:
    """Write ``summary.md`` and ``summary.csv`` under ``out``; return the Markdown text."""
    if not any(Path(r).exists() for r in roots):
        raise ConfigError(f"none of the run roots {roots} exists; pass runs=[DIR,...] with the directories your runs went to")
    results, incomplete = find_runs(roots)
    groups = group_runs(results)
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the report directory out={out} ({e}); pass a writable out=DIR") from e
    text = "# sam-bench summary\n\nFinal-epoch test error over seeds; runs grouped when they differ only by seed.\n\n" + markdown(groups, incomplete)
    atomic_write_bytes(out_dir / "summary.md", text.encode())
    atomic_write_bytes(out_dir / "summary.csv", to_csv(groups).encode())
    return text
