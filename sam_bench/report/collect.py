"""Find runs under one or more roots and group those that differ only by seed."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from sam_bench.schema import semantic_config
from sam_bench.tracking.results import RESULT_FILE


@dataclass
class Group:
    """Runs with the same semantic config except the seed (one result per seed)."""

    config: dict
    runs: list[dict] = field(default_factory=list)

    @property
    def errors(self) -> list[float]:
        return [r["final_test_error"] for r in self.runs]

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n-1); None for a single run."""
        return statistics.stdev(self.errors) if len(self.runs) > 1 else None


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def find_runs(roots: list[str]) -> tuple[list[dict], list[str]]:
    """(complete results, incomplete run directories) under ``roots``, in a stable order."""
    complete, incomplete = [], []
    run_dirs: set[Path] = set()
    for root in roots:
        root_path = Path(root)
        if not root_path.exists():
            continue
        for marker in ("result.json", "checkpoint.pt", ".hydra/config.yaml"):
            run_dirs.update(p.parent if marker != ".hydra/config.yaml" else p.parent.parent for p in root_path.rglob(marker))
    for run_dir in sorted(run_dirs):
        try:
            result = json.loads((run_dir / RESULT_FILE).read_text())
        except (OSError, ValueError):
            result = None
        ok = (
            isinstance(result, dict)
            and result.get("status") == "complete"
            and isinstance(result.get("final_test_error"), (int, float))
            and math.isfinite(result["final_test_error"])
        )
        if ok:
            result["run_dir"] = str(run_dir)
            complete.append(result)
        elif (run_dir / ".hydra").exists() or (run_dir / "checkpoint.pt").exists() or result is not None:
            incomplete.append(str(run_dir))
    return complete, incomplete


def group_runs(results: list[dict]) -> list[Group]:
    """Group by semantic config without the seed; one run per seed (the latest)."""
    groups: dict[str, Group] = {}
    for r in results:
        cfg = semantic_config(r["config"], drop=("seed",))
        cfg = semantic_config(cfg)
        key = json.dumps(cfg, sort_keys=True, default=str)
        g = groups.setdefault(key, Group(config=cfg))
        same_seed = [x for x in g.runs if x["seed"] == r["seed"]]
        if same_seed:
            if r.get("finished_at", "") <= same_seed[0].get("finished_at", ""):
                continue
            g.runs.remove(same_seed[0])
        g.runs.append(r)
    for g in groups.values():
        g.runs.sort(key=lambda r: r["seed"])
    return [groups[k] for k in sorted(groups)]
