"""Markdown and CSV tables: the run summary (mean ± std over seeds) and the paper tables."""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from statistics import fmean

from omegaconf import OmegaConf

from sam_bench.paths import config_dir
from sam_bench.report.collect import Group, ci95, failure_note, flatten, md_row
from sam_bench.report.paper import Cell, Layout, layouts, paper_float
from sam_bench.schema import COMPUTE_CHANGES, grouping_config

log = logging.getLogger(__name__)

# Always shown, in this order, with a short header. "method" is not a config key: it is
# Group.method (sgd, sam, asam, sam+k=3, ...), which optimizer.name alone does not tell.
BASE_COLUMNS = [
    ("name", "experiment"),
    ("dataset.name", "dataset"),
    ("model.arch", "model"),
    ("method", "optimizer"),
    ("optimizer.rho", "rho"),
    ("trainer.epochs", "epochs"),
]


def varying_keys(groups: list[Group]) -> list[str]:
    """Config keys (besides the base columns and optimizer.name, which the method shows) whose value
    differs between groups."""
    flat = [flatten(g.config) for g in groups]
    keys = sorted(set().union(*flat)) if flat else []
    base = {k for k, _ in BASE_COLUMNS} | {"optimizer.name"}
    return [k for k in keys if k not in base and len({repr(f.get(k)) for f in flat}) > 1]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return "" if value is None else str(value)


def summary_order(groups: list[Group]) -> list[Group]:
    """The summary's rows as a reader scans them: by experiment name, dataset, model, method, ρ and
    epochs (the first columns), then by the rest of the config. Before, rows followed the JSON text
    of the grouping config, whose first key is ``computed_as``: a preset's SGD rows sorted after
    every other experiment's."""
    def key(g: Group) -> tuple:
        epochs = (g.config.get("trainer") or {}).get("epochs")
        return (g.name, _fmt((g.config.get("dataset") or {}).get("name")), _fmt((g.config.get("model") or {}).get("arch")),
                g.method, g.rho, epochs if isinstance(epochs, int) else -1, json_key(g))
    return sorted(groups, key=key)


def computed_as_needed(groups: list[Group]) -> bool:
    """``computed_as`` (schema.computed_as: the last code change that concerns a config) tells apart
    two groups only when their configs are otherwise equal: runs of one config on either side of a
    change. Elsewhere it follows from the config (SGD with m: 3; AutoAugment: 4) and only puzzles."""
    rest = {json.dumps({k: v for k, v in g.config.items() if k != "computed_as"}, sort_keys=True, default=str) for g in groups}
    return len(rest) < len(groups)


def computed_as_note(groups: list[Group]) -> str:
    """What the ``computed_as`` column's values mean (under summary.md's table when it is shown)."""
    values = sorted({int(g.config.get("computed_as") or 1) for g in groups})
    meaning = [f"{v} = the original code (before any change listed in sam_bench/schema.py COMPUTE_CHANGES)" if v not in COMPUTE_CHANGES
               else f"{v} = since: {COMPUTE_CHANGES[v][0]}" for v in values]
    return ("\ncomputed_as: the last change to the code that concerns a row's config, as of the compute_version its "
            "runs recorded; rows that differ only in it are one config trained by code that computed it otherwise "
            "(kept apart, not averaged). " + "; ".join(meaning) + ".\n")


def _config_cells(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    """The columns that tell the groups apart (the base ones, then every key that varies) and each
    group's values in them."""
    extra = varying_keys(groups)
    if not computed_as_needed(groups):
        extra = [k for k in extra if k != "computed_as"]
    body = []
    for g in groups:
        flat = {**flatten(g.config), "method": g.method}
        body.append([_fmt(flat.get(k)) for k, _ in BASE_COLUMNS] + [_fmt(flat.get(k)) for k in extra])
    return [h for _, h in BASE_COLUMNS] + extra, body


def rows(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    header, body = _config_cells(groups)
    for g, cells in zip(groups, body):
        err = f"{g.mean:.2f}" + (f" ± {g.std:.2f}" if g.std is not None else "")
        cells += [err, str(len(g.runs)), ",".join(str(s) for s in g.seeds)]
    return header + ["test error % (mean ± std)", "n", "seeds"], body


def markdown(groups: list[Group], incomplete: list[str]) -> str:
    groups = summary_order(groups)
    header, body = rows(groups)
    lines = [md_row(header), "|" + "|".join("---" for _ in header) + "|"]
    lines += [md_row(r) for r in body]
    text = "\n".join(lines) + "\n"
    if "computed_as" in header:
        text += computed_as_note(groups)
    text += repeats_note(groups)
    if not groups:
        text = "No complete runs found.\n"
    if incomplete:
        text += "\nIncomplete or failed runs (not averaged):\n" + "".join(f"- {d}{failure_note(d)}\n" for d in incomplete)
    return text


def repeats_note(groups: list[Group]) -> str:
    """How many runs repeat a config and seed already counted (n counts seeds), or ''."""
    repeats = sum(g.repeats for g in groups)
    if not repeats:
        return ""
    return (f"\nn counts a seed once: {repeats} more run{'s repeat' if repeats > 1 else ' repeats'} the config and seed of a row "
            "(SGD in a ρ sweep trains once per ρ; a re-run); of each seed the one finished last is averaged.\n")


def to_csv(groups: list[Group]) -> str:
    """summary.md's table with the statistics as numbers in columns of their own (std empty for
    one seed), for plotting or diffing; rows in summary.md's order."""
    groups = summary_order(groups)
    header, body = _config_cells(groups)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header + ["test_error_mean", "test_error_std", "n", "seeds"])
    for g, cells in zip(groups, body):
        w.writerow(cells + [f"{g.mean:.4f}", f"{g.std:.4f}" if g.std is not None else "", len(g.runs),
                            ",".join(str(s) for s in g.seeds)])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Paper tables: "paper | ours | Δ" for every printed cell.


DASH = "—"


@dataclass
class Measured:
    """What the runs of one cell gave: statistics plus compute and provenance."""

    group: Group | None  # None when no single group could be chosen (see ``note``)
    values: list[float] | None  # the metric per seed (accuracy if the paper prints accuracy)
    note: str = ""  # how the group was chosen, or why there is no number

    @property
    def mean(self) -> float | None:
        return fmean(self.values) if self.values else None

    @property
    def ci(self) -> float | None:
        return ci95(self.values) if self.values else None


#: Keys a preset cannot set but a run records: under torchrun, the number of ranks.
NOT_IN_PRESETS = ("ranks",)


def preset_stem(name: str) -> str:
    """The preset file that sets ``name``: 'table1/wrn28_10_200ep/basic/cifar10@sgd2x' ->
    conf/experiment/paper/'table1_wrn28_10_200ep_basic_cifar10_sgd2x'.yaml."""
    return name.replace("/", "_").replace("@", "_")


def _compose_train(overrides: list[str]) -> dict:
    """``sam-bench train``'s config for ``overrides``, as result.json records it. Inside the report's
    Hydra app (same config tree) its Hydra composes; called as a library, a Hydra of our own."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sam_bench.schema import register_configs

    register_configs()
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name="train", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


@lru_cache(maxsize=None)
def preset_config(name: str, method: str) -> str | None:
    """What the paper preset that sets ``name`` trains with ``optimizer=sgd`` (method sgd) or
    ``optimizer=sam`` (any other), as :func:`grouping_config` gives it (JSON); None when no preset sets it."""
    stem = preset_stem(name)
    if not (Path(config_dir()) / "experiment" / "paper" / f"{stem}.yaml").is_file():
        return None
    try:
        config = _compose_train([f"experiment=paper/{stem}", f"optimizer={'sgd' if method == 'sgd' else 'sam'}"])
    except Exception as e:  # noqa: BLE001 - a broken preset leaves its cells empty, not the report unwritten
        log.warning("sam-bench report: preset %s does not compose (%s); its cells stay empty", stem, str(e).splitlines()[0])
        return None
    if config.get("name") != name:
        return None
    return json.dumps(grouping_config(config), sort_keys=True, default=str)


def preset_changes(g: Group) -> list[str] | None:
    """The config keys in which ``g`` differs from what its preset gives ([] = the preset's run);
    None when no preset sets its name."""
    preset = preset_config(g.name, g.method)
    if preset is None:
        return None
    ours = {k: v for k, v in flatten(g.config).items() if k not in NOT_IN_PRESETS}
    theirs = flatten(json.loads(preset))
    missing = object()
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k, missing) != theirs.get(k, missing))


@lru_cache(maxsize=1)
def _cell_keys() -> frozenset[str]:
    return frozenset(c.key for layout in layouts() for _, cells in layout.rows for c in cells if c.key)


def _named_as_cells(groups: list[Group]) -> list[tuple[str, Group, list[str] | None]]:
    """(cell key, group, :func:`preset_changes`) for the groups whose name@method is a paper cell's."""
    return [(g.cell_key, g, preset_changes(g)) for g in groups if g.name and g.cell_key in _cell_keys()]


def index_groups(groups: list[Group]) -> dict[str, list[Group]]:
    """Cell key (name@method) -> the groups that fill it: those whose config is what the cell's
    preset gives (any seeds). A run of the preset with other overrides is another experiment."""
    out: dict[str, list[Group]] = {}
    for key, g, changes in _named_as_cells(groups):
        if changes == []:
            out.setdefault(key, []).append(g)
    return out


def off_preset_groups(groups: list[Group]) -> dict[str, list[tuple[Group, list[str] | None]]]:
    """Cell key -> the groups named as that cell that do not fill it, with the keys they change
    (None: no preset sets the name)."""
    out: dict[str, list[tuple[Group, list[str] | None]]] = {}
    for key, g, changes in _named_as_cells(groups):
        if changes != []:
            out.setdefault(key, []).append((g, changes))
    return out


def off_preset_note(key: str, off: list[tuple[Group, list[str] | None]]) -> str:
    """Why the runs named as cell ``key`` are not in it."""
    name = off[0][0].name
    if any(changes is None for _, changes in off):
        return f"runs named `{name}` are not compared: no preset conf/experiment/paper/{preset_stem(name)}.yaml sets this name"
    changed = sorted({k for _, changes in off for k in changes or []})
    shown = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
    return f"runs named `{name}` that change the preset ({shown}) are not compared: see summary.md"


def measure(cell: Cell, by_key: dict[str, list[Group]]) -> Measured | None:
    """The runs behind ``cell``; None when none ran. Several configs for one cell (which
    :func:`index_groups` never gives: it keeps the preset's own config only; a caller's own index
    may) are resolved the paper's way, by the lowest mean validation error, or left unresolved."""
    candidates = by_key.get(cell.key or "", [])
    if not candidates:
        return None
    note = ""
    if len(candidates) == 1:
        group = candidates[0]
    elif all(g.val_errors for g in candidates):
        group = min(candidates, key=lambda g: (fmean(g.val_errors), g.rho, json_key(g)))  # ties: lower ρ, as sweeps.md
        note = f"chosen on validation error among {len(candidates)} configs (rho={group.rho:g})"
    else:
        return Measured(None, None, f"{len(candidates)} configs share this name and not all recorded a validation error: see summary.md")
    values = group.values(cell.metric)
    if values is None:
        return Measured(group, None, f"`{cell.metric}` not recorded by every run")
    if cell.accuracy:
        values = [100.0 - v for v in values]
    return Measured(group, values, note)


def json_key(g: Group) -> str:
    return json.dumps(g.config, sort_keys=True, default=str)


def paper_text(cell: Cell) -> str:
    if cell.paper is None or cell.paper in ("-", ""):
        return DASH
    return cell.paper + (f" ± {cell.paper_pm}" if cell.paper_pm else "")


def ours_text(m: Measured | None) -> str:
    if m is None:
        return DASH
    if m.values is None:
        return f"n/a ({m.note})"
    n = len(m.values)
    text = f"{m.mean:.2f}" + (f" ± {m.ci:.2f}" if m.ci is not None else "") + f" (n={n})"
    return text + ("*" if m.note else "")


def delta_text(cell: Cell, m: Measured | None) -> str:
    ref = paper_float(cell.paper)
    if m is None or m.mean is None or ref is None:
        return DASH
    return f"{m.mean - ref:+.2f}"


def _processes(result: dict) -> int:
    """The GPUs (processes) a run trained on: its config's ``ranks`` under torchrun, else 1 (``world_size``
    in files that recorded it)."""
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    return int(result.get("world_size") or config.get("ranks") or 1)


def compute(group: Group) -> dict[str, str]:
    """GPU-hours (train time × devices per run, summed), images/s, peak memory, device, provenance."""
    runs = group.runs
    hours = sum(float(r.get("train_time_s") or 0.0) * _processes(r) for r in runs) / 3600
    ips = [r["images_per_s"] for r in runs if isinstance(r.get("images_per_s"), (int, float))]
    mem = [r["peak_memory_mb"] for r in runs if isinstance(r.get("peak_memory_mb"), (int, float))]
    return {
        "n": str(len(runs)),
        "seeds": ",".join(str(s) for s in group.seeds),
        "gpu_hours": f"{hours:.3f}",
        "images_per_s": f"{fmean(ips):.1f}" if ips else "",
        "peak_memory_mb": f"{max(mem):.0f}" if mem else "",
        "device": ";".join(sorted({str(r.get("device", "")) for r in runs})),
        "git_commit": ";".join(sorted({str(r.get("git_commit") or "") for r in runs})),
        "config_hash": ";".join(sorted({str(r.get("config_hash") or "") for r in runs})),
    }


def _has_runs(layout: Layout, col: int) -> bool:
    return any(cells[col].key for _, cells in layout.rows)


def paper_markdown(layout: Layout, by_key: dict[str, list[Group]], incomplete: list[str],
                   off_preset: dict[str, list[tuple[Group, list[str] | None]]] | None = None) -> str:
    """One paper table, laid out as printed, with our numbers beside the paper's. ``off_preset``
    (:func:`off_preset_groups`): runs named as a cell but not the preset's run, named in a note."""
    off_preset = off_preset or {}
    header = list(layout.row_header)
    for i, col in enumerate(layout.columns):
        header += [f"{col} paper", "ours", "Δ"] if _has_runs(layout, i) else [col]
    lines = [f"# {layout.caption}", ""]
    lines += [f"- {n}" for n in layout.notes]
    lines += [
        "- Cells: paper as printed (± = the paper's 95 % CI unless noted) | ours: mean ± 95 % CI "
        "(t-distribution, t_0.975,n−1·s/√n) over seeds, final epoch, (n) | Δ = ours − paper. "
        f"{DASH} = not run (or not printed). * = see the notes below the table.",
        "",
        md_row(header),
        "|" + "|".join("---" for _ in header) + "|",
    ]
    filled: list[tuple[str, Cell, Measured]] = []
    off_notes: list[str] = []
    for labels, cells in layout.rows:
        row = list(labels)
        for i, cell in enumerate(cells):
            m = measure(cell, by_key) if cell.key else None
            off = cell.key in off_preset  # runs named as this cell that change its preset: a note, and a * on the cell
            if _has_runs(layout, i):
                ours = ours_text(m)
                row += [paper_text(cell), ours + ("*" if off and not ours.endswith("*") else ""), delta_text(cell, m)]
            else:
                row.append(paper_text(cell))
            where = f"{' / '.join(labels)} · {layout.columns[i]}"
            if m is not None:
                filled.append((where, cell, m))
            if off:
                off_notes.append(f"- * {where}: {off_preset_note(cell.key, off_preset[cell.key])}")
        lines.append(md_row(row))
    lines.append("")
    notes = [f"- * {where}: {m.note}" for where, _, m in filled if m.note] + off_notes
    if notes:
        lines += ["Notes:", *notes, ""]
    lines += ["## Compute and provenance", ""]
    seen: set[str] = set()
    prov = []
    for where, cell, m in filled:
        if m.group is None or id(m.group) in seen:
            continue
        seen.add(id(m.group))
        c = compute(m.group)
        prov.append(md_row([cell.key, c["n"], c["seeds"], c["gpu_hours"], c["images_per_s"], c["peak_memory_mb"], c["device"],
                            c["git_commit"], c["config_hash"]]))
    if prov:
        lines += [
            "GPU-hours = Σ over seeds of train_time_s × world_size / 3600 (training only, evaluation excluded; "
            "a CPU run counts its device-hours). images/s = mean over seeds; peak memory = max over seeds.",
            "",
            "| cell | n | seeds | GPU-hours | images/s | peak memory MiB | device | git commit | config hash |",
            "|---|---|---|---|---|---|---|---|---|",
            *prov,
        ]
    else:
        lines.append("No runs yet.")
    mine = [d for d, name in incomplete if name.startswith(f"{layout.id}/")]
    if mine:
        lines += ["", "## Incomplete or failed runs (not averaged)", "", *[f"- {d}{failure_note(d)}" for d in mine]]
    return "\n".join(lines) + "\n"


def paper_csv(layout: Layout, by_key: dict[str, list[Group]],
              off_preset: dict[str, list[tuple[Group, list[str] | None]]] | None = None) -> str:
    """The same table, one line per cell, for plotting or diffing."""
    off_preset = off_preset or {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["table", "row", "column", "key", "metric", "paper", "paper_pm", "mean", "ci95", "n", "delta", "note",
            "seeds", "gpu_hours", "images_per_s", "peak_memory_mb", "device", "git_commit", "config_hash"]
    w.writerow(cols)
    for labels, cells in layout.rows:
        for i, cell in enumerate(cells):
            m = measure(cell, by_key) if cell.key else None
            c = compute(m.group) if m is not None and m.group is not None else {}
            w.writerow([
                layout.id, " / ".join(labels), layout.columns[i], cell.key or "", cell.metric if cell.key else "",
                cell.paper or "", cell.paper_pm or "",
                f"{m.mean:.4f}" if m and m.mean is not None else "",
                f"{m.ci:.4f}" if m and m.ci is not None else "",
                str(len(m.values)) if m and m.values else "",
                "" if delta_text(cell, m) == DASH else delta_text(cell, m),
                "; ".join(n for n in (m.note if m else "", off_preset_note(cell.key, off_preset[cell.key])
                                      if cell.key in off_preset else "") if n),
                *(c.get(k, "") for k in cols[12:]),
            ])
    return buf.getvalue()
