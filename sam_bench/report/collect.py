"""Find runs under one or more roots and group those that differ only by seed.

A run directory is any directory holding ``result.json``, ``checkpoint.pt`` or ``.hydra/config.yaml``:
this covers single runs (``runs/<overrides>``), Hydra multirun sweeps (``multirun/<overrides>``) and
SLURM jobs launched with ``hydra/launcher=submitit_slurm`` (the job directories hold the same files;
submitit's own ``.submitit/`` logs are not run directories and are ignored).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sam_bench.schema import grouping_config, method_label
from sam_bench.tracking.results import METRICS_FILE, RESULT_FILE, read_divergence

log = logging.getLogger(__name__)

# Two-sided 95 % Student-t quantiles t_{0.975, df} for df = 1..30 (standard tables). Hard-coded so
# the report needs no scipy and gives the same bytes everywhere; larger df use a Cornish-Fisher
# expansion around z (error < 1e-4 for df > 30).
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
Z975 = 1.959964


def t975(df: int) -> float:
    """Student-t 0.975 quantile with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("a confidence interval needs at least two runs (df >= 1)")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def ci95(values: list[float]) -> float | None:
    """Half-width t_{0.975,n-1}·s/√n of the 95 % confidence interval of the mean (the paper's ±)."""
    if len(values) < 2:
        return None
    return t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


@dataclass
class Group:
    """Runs with the same semantic config except the seed (one result per seed)."""

    config: dict
    runs: list[dict] = field(default_factory=list)
    repeats: int = 0  # runs left out because they repeat a seed in ``runs`` (SGD of a ρ sweep, a re-run)

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

    def values(self, key: str) -> list[float] | None:
        """``key`` of every run's result, or None unless every run recorded a finite number."""
        vals = [r.get(key) for r in self.runs]
        if not vals or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            return None
        return [float(v) for v in vals]

    @property
    def val_errors(self) -> list[float] | None:
        """Final validation errors (runs with ``dataset.val_size`` set record ``final_val_error``)."""
        return self.values("final_val_error")

    @property
    def name(self) -> str:
        return str(self.config.get("name") or "")

    @property
    def method(self) -> str:
        """``sgd``, ``sam``, ``asam``, ``sam+k=3``, ... (:func:`sam_bench.schema.method_label`)."""
        return method_label(self.config.get("optimizer", {}))

    @property
    def rho(self) -> float:
        """The radius the run used: SGD is SAM with ρ = 0 whatever ``optimizer.rho`` says."""
        opt = self.config.get("optimizer", {})
        return 0.0 if opt.get("name") == "sgd" else float(opt.get("rho", 0.0))

    @property
    def cell_key(self) -> str:
        """``name@method``; a name that names a variant of a cell (``...@sgd2x``) is the key itself,
        for runs of the variant's method only (a SAM run of the 2×-epochs SGD preset fills nothing)."""
        variant = self.name.partition("@")[2]
        if variant and VARIANT_METHODS.get(variant) == self.method:
            return self.name
        return f"{self.name}@{self.method}"


#: The method of each cell variant a preset name may carry after ``@``.
VARIANT_METHODS = {"sgd2x": "sgd"}


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


#: The files whose directory is a run directory (``.hydra/config.yaml``: its grandparent).
RUN_MARKERS = ("result.json", "checkpoint.pt", ".hydra/config.yaml")


def root_problems(roots: list[str], check_empty: bool = True) -> list[str]:
    """One line per run root that is not a directory (a typo in ``runs=[...]``) or, with ``check_empty``
    (roots the user named), holds no run directory (a typo'd or wrong directory), also logged."""
    problems = []
    for root in roots:
        path = Path(root)
        if not path.is_dir():
            what = "does not exist" if not path.exists() else "is not a directory"
        elif check_empty and not _holds_a_run(path):
            what = f"holds no run directory (no {', '.join(RUN_MARKERS[:-1])} or {RUN_MARKERS[-1]} under it)"
        else:
            continue
        problems.append(f"run root {root} {what}: skipped (check runs=[...])")
        log.warning("sam-bench report: %s", problems[-1])
    return problems


def _holds_a_run(root: Path) -> bool:
    """Whether any run marker lies under ``root`` (stops at the first one found)."""
    return any(True for marker in RUN_MARKERS for _ in root.rglob(marker))


def _run_dirs(roots: list[str]) -> list[Path]:
    """Every run directory under ``roots``, once each even when roots overlap (compared resolved;
    the path shown is the first one found)."""
    found: dict[Path, Path] = {}
    for root in roots:
        root_path = Path(root)
        if not root_path.is_dir():
            continue
        for marker in RUN_MARKERS:
            for p in sorted(root_path.rglob(marker)):
                run_dir = p.parent if marker != ".hydra/config.yaml" else p.parent.parent
                found.setdefault(run_dir.resolve(), run_dir)
    return sorted(found.values())


def read_result(run_dir: Path) -> tuple[dict | None, str]:
    """(result, "") for a finished run directory; (None, why not) otherwise."""
    path = Path(run_dir) / RESULT_FILE
    if not path.exists():
        return None, f"no {RESULT_FILE}: not finished{progress(Path(run_dir))}"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{RESULT_FILE} unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    problem = result_problem(result)
    return (None, problem) if problem else (result, "")


def progress(run_dir: Path) -> str:
    """'; E of N epochs done' for an unfinished run (E: the last epoch its metrics.jsonl holds, N: its
    config's trainer.epochs), so a run killed early reads apart from one about to finish; '' when
    neither is known."""
    done, total = _epochs_done(run_dir / METRICS_FILE), _epochs_planned(run_config(str(run_dir)))
    if total is None:
        return "" if done is None else f"; {done} epochs done"
    return f"; {done or 0} of {total} epochs done"


def _epochs_done(metrics: Path) -> int | None:
    """The highest ``epoch`` in ``metrics.jsonl`` (one line per finished epoch); None without one."""
    try:
        lines = metrics.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    epochs = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and not isinstance(record["epoch"], bool):
            epochs.append(record["epoch"])
    return max(epochs, default=None)


def _epochs_planned(config: dict | None) -> int | None:
    """``trainer.epochs`` of a run's config; None when it has none."""
    trainer = config.get("trainer") if config else None
    epochs = trainer.get("epochs") if isinstance(trainer, dict) else None
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None


def result_problem(result: object) -> str:
    """Why a parsed result.json cannot be averaged, or ''."""
    if not isinstance(result, dict):
        return f"{RESULT_FILE} is not a JSON object"
    if result.get("status") != "complete":
        return f"status {result.get('status')!r}, not 'complete'"
    error = result.get("final_test_error")
    if not isinstance(error, (int, float)) or isinstance(error, bool) or not math.isfinite(error):
        return f"final_test_error is {error!r}, not a finite number"
    lacking = [k for k, ok in (("config", isinstance(result.get("config"), dict)), ("seed", isinstance(result.get("seed"), int)))
               if not ok]
    if lacking:
        return f"{RESULT_FILE} lacks {' and '.join(lacking)}"
    return _damage(result)


def _damage(result: dict) -> str:
    """Why the fields the report reads besides the error and seed cannot be read (a hand-edited or
    damaged file), or ''. A result.json the trainer wrote always passes."""
    config = result["config"]
    wrong = [f"config.{k} is {config[k]!r}, not a mapping" for k in ("dataset", "model", "optimizer", "trainer")
             if k in config and not isinstance(config[k], dict)]
    # each key that may be absent, with its type; null is allowed where an older version wrote it
    for key, kind, what, nullable in (("finished_at", str, "a time", False), ("compute_version", int, "an integer", True),
                                      ("train_time_s", (int, float), "a number", True), ("world_size", int, "an integer", True),
                                      ("ranks", int, "an integer", True)):
        holder = config if key == "ranks" else result
        if key not in holder or (holder[key] is None and nullable):
            continue
        if not isinstance(holder[key], kind) or isinstance(holder[key], bool):
            wrong.append(f"{'config.' if holder is config else ''}{key} is {holder[key]!r}, not {what}")
    if wrong:
        return f"{RESULT_FILE}: {wrong[0]}"
    try:  # what grouping reads of the config
        grouping_config(config, result.get("compute_version"))
        opt = config.get("optimizer", {})
        method_label(opt)
        if opt.get("name") != "sgd":
            float(opt.get("rho", 0.0))
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        return f"{RESULT_FILE}: its config cannot be read ({type(e).__name__}: {e})"
    return ""


def find_runs(roots: list[str]) -> tuple[list[dict], list[str]]:
    """(complete results, incomplete run directories) under ``roots``, in a stable order."""
    complete, incomplete = [], []
    for run_dir in _run_dirs(roots):
        result, _ = read_result(run_dir)
        if result is not None:
            result["run_dir"] = str(run_dir)
            complete.append(result)
        elif (run_dir / ".hydra").exists() or (run_dir / "checkpoint.pt").exists() or (run_dir / RESULT_FILE).exists():
            incomplete.append(str(run_dir))
    return complete, incomplete


def failure_note(run_dir: str) -> str:
    """' (<why>)': ' (diverged: <where>)' for a run directory whose training diverged, else why
    its result cannot be averaged (not finished, unreadable, not finite, ...)."""
    record = read_divergence(Path(run_dir))
    if record:
        return f" (diverged: {str(record.get('error')).split(';')[0]})"
    _, why = read_result(Path(run_dir))
    return f" ({why})" if why else ""


def run_config(run_dir: str) -> dict | None:
    """The config of a (possibly unfinished) run: its ``result.json``'s, else Hydra's saved one."""
    for path in (Path(run_dir) / RESULT_FILE, Path(run_dir) / ".hydra" / "config.yaml"):
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        config = data.get("config") if isinstance(data, dict) and path.name == RESULT_FILE else data
        if isinstance(config, dict):
            return config
    return None


def run_name(run_dir: str) -> str:
    """The experiment ``name`` of a (possibly unfinished) run, read from its config (:func:`run_config`)."""
    return str((run_config(run_dir) or {}).get("name") or "")


def group_runs(results: list[dict]) -> list[Group]:
    """Group by semantic config without the seed; one run per seed (the latest)."""
    groups: dict[str, Group] = {}
    for r in results:
        cfg = grouping_config(r["config"], r.get("compute_version"))
        key = json.dumps(cfg, sort_keys=True, default=str)
        g = groups.setdefault(key, Group(config=cfg))
        same_seed = [x for x in g.runs if x["seed"] == r["seed"]]
        if same_seed:
            g.repeats += 1
            if r.get("finished_at", "") <= same_seed[0].get("finished_at", ""):
                continue
            g.runs.remove(same_seed[0])
        g.runs.append(r)
    for g in groups.values():
        g.runs.sort(key=lambda r: r["seed"])
    return [groups[k] for k in sorted(groups)]


def md_escape(text: object) -> str:
    """A value as one Markdown table cell: a ``|`` in it would end the cell."""
    return str(text).replace("|", "\\|")


def md_row(cells: list) -> str:
    """One Markdown table row, every cell escaped."""
    return "| " + " | ".join(md_escape(c) for c in cells) + " |"
