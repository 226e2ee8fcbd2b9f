"""Markdown and CSV tables: the run summary (mean ± std over seeds) and the paper tables."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from statistics import fmean

from sam_bench.report.collect import Group, ci95, failure_note, flatten
from sam_bench.report.paper import Cell, Layout, paper_float

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


def rows(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    extra = varying_keys(groups)
    header = [h for _, h in BASE_COLUMNS] + extra + ["test error % (mean ± std)", "n", "seeds"]
    body = []
    for g in groups:
        flat = {**flatten(g.config), "method": g.method}
        cells = [_fmt(flat.get(k)) for k, _ in BASE_COLUMNS] + [_fmt(flat.get(k)) for k in extra]
        err = f"{g.mean:.2f}" + (f" ± {g.std:.2f}" if g.std is not None else "")
        body.append(cells + [err, str(len(g.runs)), ",".join(str(s) for s in g.seeds)])
    return header, body


def markdown(groups: list[Group], incomplete: list[str]) -> str:
    header, body = rows(groups)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    text = "\n".join(lines) + "\n"
    if not groups:
        text = "No complete runs found.\n"
    if incomplete:
        text += "\nIncomplete or failed runs (not averaged):\n" + "".join(f"- {d}{failure_note(d)}\n" for d in incomplete)
    return text


def to_csv(groups: list[Group]) -> str:
    header, body = rows(groups)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(body)
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


def index_groups(groups: list[Group]) -> dict[str, list[Group]]:
    """Cell key (name@method) -> groups, for the groups that carry a name."""
    out: dict[str, list[Group]] = {}
    for g in groups:
        if g.name:
            out.setdefault(g.cell_key, []).append(g)
    return out


def measure(cell: Cell, by_key: dict[str, list[Group]]) -> Measured | None:
    """The runs behind ``cell``; None when none ran. Several configs for one cell (a ρ sweep, say)
    are resolved the paper's way, by the lowest mean validation error, or left unresolved."""
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


def compute(group: Group) -> dict[str, str]:
    """GPU-hours (train time × devices per run, summed), images/s, peak memory, device, provenance."""
    runs = group.runs
    hours = sum(float(r.get("train_time_s") or 0.0) * int(r.get("world_size") or 1) for r in runs) / 3600
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


def paper_markdown(layout: Layout, by_key: dict[str, list[Group]], incomplete: list[str]) -> str:
    """One paper table, laid out as printed, with our numbers beside the paper's."""
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
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    filled: list[tuple[str, Cell, Measured]] = []
    for labels, cells in layout.rows:
        row = list(labels)
        for i, cell in enumerate(cells):
            m = measure(cell, by_key) if cell.key else None
            if _has_runs(layout, i):
                row += [paper_text(cell), ours_text(m), delta_text(cell, m)]
            else:
                row.append(paper_text(cell))
            if m is not None:
                filled.append((f"{' / '.join(labels)} · {layout.columns[i]}", cell, m))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    notes = [f"- * {where}: {m.note}" for where, _, m in filled if m.note]
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
        prov.append(f"| {cell.key} | {c['n']} | {c['seeds']} | {c['gpu_hours']} | {c['images_per_s']} | {c['peak_memory_mb']} | {c['device']} | {c['git_commit']} | {c['config_hash']} |")
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


def paper_csv(layout: Layout, by_key: dict[str, list[Group]]) -> str:
    """The same table, one line per cell, for plotting or diffing."""
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
                m.note if m else "",
                *(c.get(k, "") for k in cols[12:]),
            ])
    return buf.getvalue()
