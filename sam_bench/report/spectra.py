"""Hessian spectra in the report: the paper's Fig. 3 left beside ours, and every spectrum measured.

``sam-bench hessian`` writes ``hessian_<checkpoint>.json`` into a run directory; the report reads
them all under the run roots. The paper's panel (WRN-40-10 without BN on CIFAR-10; λ_max and
λ_max/λ_5 for SGD and SAM after epochs 1, 50 and 300) is matched by model config ``wrn40_10_nobn``,
dataset ``cifar10``, optimizer and epoch; ours is the mean over training seeds.

A spectrum of a mid-epoch checkpoint (the newest ``checkpoint.pt`` of a preempted or running run:
``epoch`` completed epochs and ``epoch_step`` steps into the next) stands for no epoch: it is left out
of the paper's panel, averaged only with spectra at the same point of training, and listed with its
epoch as "3 + 27 steps". Files from before ``mid_epoch`` was recorded count as at an epoch's end
unless their checkpoint is shown to be past it: another spectrum of the same run directory (and
config hash) has the same epoch at a lower step (the end of an epoch is the lowest step with that many epochs completed).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import yaml

from sam_bench.report.collect import md_row
from sam_bench.report.paper import paper_data
from sam_bench.schema import experiment_hash, method_label
from sam_bench.tracking.results import RESULT_FILE

PAPER_ARCH, PAPER_DATASET = "wrn40_10_nobn", "cifar10"


def paper_spectra() -> list[dict]:
    """Fig. 3 left as printed: optimizer ("SGD"/"SAM"), epoch, lambda_max, lambda_max_over_lambda_5."""
    return paper_data()["figures_with_numbers"]["figure_3_left_hessian"]["values"]


def _spectrum_files(roots: list[str]) -> list[Path]:
    """Every ``hessian_*.json`` under ``roots``, once each even when roots overlap (``runs=[a,a]``,
    ``runs=[a,a/run]``: compared resolved, the path shown is the first one found)."""
    found: dict[Path, Path] = {}
    for root in roots:
        for path in sorted(Path(root).rglob("hessian_*.json")) if Path(root).exists() else []:
            found.setdefault(path.resolve(), path)
    return list(found.values())


def find_spectra(roots: list[str]) -> list[dict]:
    """Every readable ``hessian_*.json`` under the roots (sorted by path; unreadable files skipped)."""
    found = []
    for path in _spectrum_files(roots):
        try:
            spectrum = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(spectrum, dict) and spectrum.get("eigenvalues"):
            config = training_config(spectrum, path)
            found.append({**spectrum, "path": str(path), "method": spectrum_method(spectrum, config),
                          "experiment_hash": spectrum_experiment(spectrum, config)})
    return mark_mid_epoch(sorted(found, key=lambda s: s["path"]))


_KEPT = re.compile(r"checkpoint_epoch\d+\.pt$")  # trainer.keep_epochs copies: written at an epoch's end only


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def mark_mid_epoch(spectra: list[dict]) -> list[dict]:
    """The spectra, each with ``at`` (the point of training: its epoch, or "3 + 27 steps" for a
    mid-epoch checkpoint) and ``mid`` (True for a mid-epoch checkpoint). ``mid_epoch`` as recorded;
    for older files: a kept ``checkpoint_epoch*.pt`` is an epoch's end, and a checkpoint with the same
    epoch as another of its run directory (and config hash) at a lower step is past that epoch's end."""
    def run_epoch(s: dict) -> tuple:
        return (str(Path(str(s.get("checkpoint") or s.get("path", ""))).parent), str(s.get("config_hash")),  # one training
                str(s.get("epoch")))

    def known_end(s: dict) -> bool:
        return s.get("mid_epoch") is False or bool(_KEPT.search(str(s.get("checkpoint", ""))))

    lowest: dict[tuple, dict] = {}  # (run directory, epoch) -> the spectrum at the lowest step
    for s in spectra:
        if _int(s.get("step")) is not None and not s.get("mid_epoch"):
            low = lowest.get(run_epoch(s))
            if low is None or s["step"] < low["step"]:
                lowest[run_epoch(s)] = s
    out = []
    for s in spectra:
        step, low = _int(s.get("step")), lowest.get(run_epoch(s))
        if isinstance(s.get("mid_epoch"), bool):
            mid = s["mid_epoch"]
        elif known_end(s):
            mid = False
        else:
            mid = step is not None and low is not None and step > low["step"]
        at = s.get("epoch")
        if mid:
            if _int(s.get("epoch_step")) is not None:
                at = f"{s.get('epoch')} + {s['epoch_step']} steps"
            elif step is not None and low is not None and known_end(low):
                at = f"{s.get('epoch')} + {step - low['step']} steps"
            else:
                at = f"{s.get('epoch')} + some steps (step {s.get('step')})"
        out.append({**s, "mid": mid, "at": at})
    return out


def _at_order(s: dict) -> tuple:
    """Points of training in order: epoch 3, then 3 + 27 steps, then 4."""
    return _sortable(s.get("epoch")), 1 if s.get("mid") else 0, _sortable(_int(s.get("epoch_step")) or s.get("step"))


def training_config(spectrum: dict, path: Path) -> dict | None:
    """The config of the run a spectrum's checkpoint belongs to: its ``result.json``'s (a finished
    run), else its ``.hydra/config.yaml``, beside the checkpoint or the spectrum file; None if neither."""
    for run_dir in dict.fromkeys(p for p in (Path(str(spectrum.get("checkpoint", ""))).parent, path.parent) if str(p) != "."):
        try:
            config = json.loads((run_dir / RESULT_FILE).read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            config = None
        if not isinstance(config, dict):
            try:
                config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
            except (OSError, yaml.YAMLError):
                continue
        if isinstance(config, dict) and isinstance(config.get("optimizer"), dict):
            return config
    return None


def spectrum_method(spectrum: dict, config: dict | None) -> str:
    """The training method (:func:`sam_bench.schema.method_label`: sgd, sam, asam, ...) of a
    spectrum: recorded since ``method`` exists; for older files, from the training run's config
    (:func:`training_config`), else the optimizer name the file recorded."""
    if spectrum.get("method"):
        return str(spectrum["method"])
    return method_label(config["optimizer"]) if config is not None else str(spectrum.get("optimizer"))


def spectrum_experiment(spectrum: dict, config: dict | None) -> str | None:
    """Which experiment a spectrum measures: for a file that recorded an ``experiment_hash``,
    :func:`sam_bench.schema.experiment_hash` of its run's config computed now when the config is at
    hand (so files written before the hash's definition changed group with newer ones), else the
    recorded hash; None (unknown, as before) for files older than the hash."""
    if not spectrum.get("experiment_hash"):
        return None
    return experiment_hash(config) if config is not None else spectrum["experiment_hash"]


def _rho(s: dict):
    """The radius the training used: SGD is SAM with ρ = 0 whatever ``optimizer.rho`` said."""
    return 0.0 if s.get("method") == "sgd" else s.get("rho")


def _ratio(s: dict) -> float | None:
    return s.get(f"lambda_max_over_lambda_{len(s['eigenvalues'])}")


def _unreliable_ratio(s: dict) -> str:
    """Why λ_max/λ_k of a spectrum means nothing ('' when it is usable): λ_k ≤ 0 (the ratio's sign
    and size then say nothing about flatness), or λ_max or λ_k not converged (when recorded)."""
    values, converged = s["eigenvalues"], s.get("converged")
    if _ratio(s) is None or not isinstance(values[-1], (int, float)) or not math.isfinite(values[-1]) or values[-1] <= 0:
        return "λ_k ≤ 0"
    if isinstance(converged, list) and converged and not (converged[0] and converged[-1]):
        return "not converged"
    return ""


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3g} ({len(values)})" if values else "—"


def _sortable(value) -> tuple:
    """Numbers in numeric order (epoch 50 before 300), then everything else as text."""
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.3g}"


def one_per_training_seed(spectra: list[dict]) -> list[dict]:
    """The replicates of a mean over training seeds: one spectrum per training run. Spectra of the
    same run measured again (another ``lanczos_seed``, the convergence check) are not more seeds;
    the one with the lowest Lanczos seed (then path) stands for its run, one at an epoch's end before
    a mid-epoch one (which should not be among them: :func:`mark_mid_epoch`). Spectra without a
    recorded training seed count each (files from before it was recorded)."""
    chosen: dict[object, dict] = {}
    for s in sorted(spectra, key=lambda s: (bool(s.get("mid", s.get("mid_epoch"))), _sortable(s.get("lanczos_seed")), s["path"])):
        run = ("seed", s["training_seed"]) if s.get("training_seed") is not None else ("file", s["path"])
        chosen.setdefault(run, s)
    return sorted(chosen.values(), key=lambda s: s["path"])


def _experiment(s: dict) -> str:
    """The experiment column: its name, and the hash of its config without the seed when recorded
    (runs of one name that differ in lr or epochs are different experiments)."""
    name = str(s.get("name"))
    return f"{name} [{s['experiment_hash']}]" if s.get("experiment_hash") else name


def _paper_rows(spectra: list[dict]) -> list[str]:
    rows = []
    for p in paper_spectra():
        measured = [s for s in spectra if s.get("arch") == PAPER_ARCH and s.get("dataset") == PAPER_DATASET
                    and s.get("method") == p["optimizer"].lower() and str(s.get("epoch")) == p["epoch"]
                    and not s["mid"]]  # a mid-epoch checkpoint is the end of no epoch
        configs = {s["experiment_hash"] for s in measured if s.get("experiment_hash")}  # files from before it: unknown
        ours = one_per_training_seed(measured)
        rhos = sorted({_rho(s) for s in ours}, key=str)
        if len(rhos) > 1:  # different experiments: not averaged
            lam = ratio = f"several ρ ({', '.join(map(str, rhos))}): see the list"
        elif len(configs) > 1:  # e.g. another lr or epoch count
            lam = ratio = f"several configurations ({', '.join(sorted(configs))}): see the list"
        else:
            lam = _mean([s["lambda_max"] for s in ours])
            top5 = [s for s in ours if len(s["eigenvalues"]) == 5]
            usable = [_ratio(s) for s in top5 if not _unreliable_ratio(s)]
            left_out = sorted({_unreliable_ratio(s) for s in top5} - {""})
            ratio = _mean(usable) + (f"; {len(top5) - len(usable)} left out ({', '.join(left_out)})" if left_out else "")
        rows.append(md_row([p["optimizer"], p["epoch"], p["lambda_max"], lam, p["lambda_max_over_lambda_5"], ratio]))
    return rows


def spectra_markdown(spectra: list[dict]) -> str:
    spectra = mark_mid_epoch(spectra)
    lines = [
        "# Hessian spectra (Fig. 3 left)",
        "",
        "Top eigenvalues of the training-loss Hessian (`sam-bench hessian`: Lanczos, model in eval mode, "
        "training images without augmentation, cross-entropy without the L2 term).",
        "",
        f"## The paper's panel: WRN-40-10 without BN on CIFAR-10 (`model={PAPER_ARCH} dataset={PAPER_DATASET}`)",
        "",
        "Ours: mean over training seeds (n). λ_max/λ_5 only from spectra with top_k = 5, leaving out those with "
        "λ_5 ≤ 0 or λ_max or λ_5 not converged (counted after the mean). Optimizer: the training method (ASAM or "
        "k-step runs are not the paper's SAM). Spectra of mid-epoch checkpoints (epoch N + s steps below: the newest "
        "checkpoint of a preempted or running run) stand for no epoch and are left out.",
        "",
        "| optimizer | epoch | λ_max paper | ours | λ_max/λ_5 paper | ours |",
        "|---|---|---|---|---|---|",
        *_paper_rows(spectra),
        "",
        "## By experiment: mean ± std over training seeds",
        "",
        "λ_max/λ_k leaves out the spectra whose ratio says nothing (λ_k ≤ 0, or λ_max or λ_k not converged), as above.",
        "",
    ]
    if not spectra:
        return "\n".join(lines + ["No `hessian_*.json` under the run roots yet.", ""])
    lines += ["| experiment | model | dataset | optimizer | ρ | epoch | images | λ_max | λ_max/λ_k (k) | n |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for s in spectra:  # one experiment: same config but the seed (experiment_hash; older files lack it)
        key = (_experiment(s), s.get("arch"), s.get("dataset"), s.get("method"), _rho(s), s["at"], s.get("images"),
               len(s["eigenvalues"]))  # "at": a mid-epoch spectrum is averaged only with those at the same point
        groups.setdefault(key, []).append(s)

    def order(kv: tuple) -> tuple:
        key = tuple(map(_sortable, kv[0]))
        return (*key[:5], _at_order(kv[1][0]), *key[6:])

    for key, members in sorted(groups.items(), key=order):
        members = one_per_training_seed(members)
        ratios = [_ratio(m) for m in members if not _unreliable_ratio(m)]  # as in the paper's panel above
        left_out = sorted({_unreliable_ratio(m) for m in members} - {""})
        ratio = (_mean_std(ratios) if ratios else "—") + f" ({key[7]})" + \
            (f"; {len(members) - len(ratios)} left out ({', '.join(left_out)})" if left_out else "")
        lines.append(md_row([*map(str, key[:7]), _mean_std([m["lambda_max"] for m in members]), ratio, len(members)]))
    lines += ["", "## Every spectrum measured", ""]
    lines += ["| file | model | dataset | optimizer | ρ | epoch | images | eigenvalues | λ_max/λ_k | converged |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in spectra:
        ratio = _ratio(s)
        converged = s.get("converged")
        settled = f"{sum(map(bool, converged))} of {len(converged)}" if converged is not None else "—"
        lines.append(md_row([s["path"], s.get("arch"), s.get("dataset"), s.get("method"), _rho(s), s["at"], s.get("images"),
                             ", ".join(f"{v:.4g}" for v in s["eigenvalues"]), f"{ratio:.3g}" if ratio is not None else "—",
                             settled]))
    return "\n".join(lines + [""])
