"""Markdown and CSV summary tables: final test error mean ± std over seeds."""

from __future__ import annotations

import csv
import io

from sam_bench.report.collect import Group, flatten

# Always shown, in this order, with a short header.
BASE_COLUMNS = [
    ("name", "experiment"),
    ("dataset.name", "dataset"),
    ("model.arch", "model"),
    ("optimizer.name", "optimizer"),
    ("optimizer.rho", "rho"),
    ("trainer.epochs", "epochs"),
]


def varying_keys(groups: list[Group]) -> list[str]:
    """Config keys (besides the base columns) whose value differs between groups."""
    flat = [flatten(g.config) for g in groups]
    keys = sorted(set().union(*flat)) if flat else []
    base = {k for k, _ in BASE_COLUMNS}
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
        flat = flatten(g.config)
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
        text += "\nIncomplete or failed runs (not averaged):\n" + "".join(f"- {d}\n" for d in incomplete)
    return text


def to_csv(groups: list[Group]) -> str:
    header, body = rows(groups)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(body)
    return buf.getvalue()
