"""ρ sweeps: groups that differ only in ρ (and m, p, and SGD vs SAM), with ρ chosen on validation.

A sweep family is every group whose semantic config is the same once ``optimizer.rho``,
``optimizer.m``, ``optimizer.p`` and ``optimizer.name`` are removed (the perturbation's norm is a
series of its own, so Fig. 6's p = 2, ∞ and random share one plot); it is a sweep when its non-SGD
groups hold at least two distinct ρ. SGD joins every family it is the baseline of (whatever ASAM's or the other
variants' keys say: it takes no ascent) as one point at ρ = 0. Inside a family one series per (method, m). The chosen ρ of
a series is the one with the lowest mean ``final_val_error`` (the paper's protocol: 10 % of the
training set held out, ``dataset.val_size``); when any point lacks it, nothing is marked.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from statistics import fmean

from sam_bench.report.collect import Group, ci95, failure_note, md_row, run_config
from sam_bench.report.paper import slug
from sam_bench.schema import grouping_config, semantic_config

SWEEP_DROP = ("optimizer.rho", "optimizer.m", "optimizer.p", "optimizer.name")
# keys that only shape the ascent: an SGD run (no ascent) is the same run whatever they say
SAM_ONLY = ("optimizer.adaptive", "optimizer.eta", "optimizer.p", "optimizer.ascent_steps", "optimizer.second_order")


def _family_key(g: Group, drop: tuple[str, ...]) -> str:
    return json.dumps(semantic_config(g.config, drop=drop), sort_keys=True, default=str)


@dataclass
class Sweep:
    id: str  # file-name safe, stable: slug of the name + hash of the shared config
    name: str
    series: dict[str, list[Group]] = field(default_factory=dict)  # label -> groups by ρ
    key: str = ""  # the family key of its non-SGD groups (:func:`_family_key` without SWEEP_DROP)
    baseline_key: str = ""  # the same without the SAM-only keys: an SGD run with it is this sweep's baseline

    def chosen(self, label: str) -> Group | None:
        """The point with the lowest mean validation error, or None if any point lacks one or the
        series has a single ρ (SGD: ρ = 0 whatever optimizer.rho said; nothing to choose)."""
        groups = self.series[label]
        if len({g.rho for g in groups}) < 2 or not all(g.val_errors for g in groups):
            return None
        return min(groups, key=lambda g: (fmean(g.val_errors), g.rho))

    @property
    def rhos(self) -> list[float]:
        return sorted({g.rho for gs in self.series.values() for g in gs})


def series_label(g: Group) -> str:
    m = g.config.get("optimizer", {}).get("m")
    return g.method if m is None else f"{g.method} m={m}"  # SGD too: its BN batch is m


def _series_order(label: str) -> tuple:
    opt, _, m = label.partition(" m=")
    return (opt, int(m) if m.isdigit() else -1)


def _id_key(members: list[Group]) -> str:
    """What a sweep's id hashes: its family key, with the perturbation's p kept in it when all its
    SAM runs share one p (the ids sweeps had before p became a series; members[0] is not SGD)."""
    ps = {str(g.config.get("optimizer", {}).get("p", "2")) for g in members if g.method != "sgd"}
    drop = SWEEP_DROP if len(ps) > 1 else tuple(k for k in SWEEP_DROP if k != "optimizer.p")
    return _family_key(members[0], drop)


def find_sweeps(groups: list[Group]) -> list[Sweep]:
    """Every ρ sweep among ``groups``, in a stable order."""
    families: dict[str, list[Group]] = {}
    for g in groups:
        if g.method != "sgd":
            families.setdefault(_family_key(g, SWEEP_DROP), []).append(g)
    baseline_of = {key: _family_key(members[0], SWEEP_DROP + SAM_ONLY) for key, members in families.items()}
    for g in (g for g in groups if g.method == "sgd"):  # SGD is every variant's baseline (ASAM's too)
        mine = _family_key(g, SWEEP_DROP + SAM_ONLY)
        for key, members in families.items():
            if baseline_of[key] == mine:
                members.append(g)
    sweeps = []
    for key in sorted(families):
        members = families[key]
        rhos_of: dict[str, set[float]] = {}
        for g in members:
            if g.method != "sgd":
                rhos_of.setdefault(series_label(g), set()).add(g.rho)
        if not any(len(rhos) >= 2 for rhos in rhos_of.values()):
            continue  # one ρ per series (SGD beside SAM, or p = 2 beside p = ∞) is a comparison, not a sweep
        name = members[0].name
        sweep = Sweep(f"{slug(name) or 'unnamed'}-{hashlib.sha256(_id_key(members).encode()).hexdigest()[:8]}", name,
                      key=key, baseline_key=baseline_of[key])
        for g in sorted(members, key=lambda g: g.rho):
            sweep.series.setdefault(series_label(g), []).append(g)
        sweep.series = {k: sweep.series[k] for k in sorted(sweep.series, key=_series_order)}
        sweeps.append(sweep)
    return sweeps


def unaveraged_runs(incomplete: list[str]) -> list[tuple[str, Group, object]]:
    """(run directory, a one-run Group of its grouping config, its seed) for each unfinished or failed
    run whose config can be read, so a sweep can name the points it lacks."""
    out = []
    for run_dir in incomplete:
        config = run_config(run_dir)
        try:
            out.append((run_dir, Group(config=grouping_config(config)), config.get("seed")))
        except (TypeError, ValueError, AttributeError, KeyError):  # no config, or one damaged by hand
            continue
    return out


def _belongs_to(s: Sweep, g: Group) -> bool:
    """Whether a run's group is a point of sweep ``s`` (SGD: as its baseline, as :func:`find_sweeps` joins it)."""
    if g.method == "sgd":
        return _family_key(g, SWEEP_DROP + SAM_ONLY) == s.baseline_key
    return _family_key(g, SWEEP_DROP) == s.key


def unaveraged_lines(s: Sweep, unaveraged: list[tuple[str, Group, object]]) -> list[str]:
    """The sweep's runs that are not in its table (a diverged ρ vanished from it without a word)."""
    mine = sorted(((series_label(g), g.rho, str(seed), d) for d, g, seed in unaveraged if _belongs_to(s, g)),
                  key=lambda t: (_series_order(t[0]), t[1], t[2], t[3]))
    if not mine:
        return []
    return ["", "Not averaged here (unfinished or failed; see summary.md):",
            *[f"- {label} ρ={rho:g} seed {seed}: {d}{failure_note(d)}" for label, rho, seed, d in mine]]


def _point(g: Group) -> str:
    ci = ci95(g.errors)
    return f"{g.mean:.2f}" + (f" ± {ci:.2f}" if ci is not None else "") + f" (n={len(g.runs)})"


def sweeps_markdown(sweeps: list[Sweep], plots: bool = True, unaveraged: list[tuple[str, Group, object]] | None = None) -> str:
    """The sweeps' tables; with ``plots`` each links its ``sweep_<id>.png`` (the report's outdir.py reads
    these links to know which plots are its own), else no image links (no plot was written).
    ``unaveraged`` (:func:`unaveraged_runs`): each sweep names those of its runs below its table."""
    lines = [
        "# ρ sweeps",
        "",
        "Test error % (mean ± 95 % CI over seeds, final epoch) against ρ, one column per method/m; "
        "val = mean final validation error (runs with dataset.val_size). ✓ = the ρ chosen on validation "
        "(lowest val error); the test error is never used to choose.",
        "",
    ]
    if not sweeps:
        return "\n".join(lines + ["No sweeps found (a sweep is a set of runs differing only in ρ, m, p or SGD/SAM, "
                                   "with two ρ or more in one series).", ""])
    for s in sweeps:
        labels = list(s.series)
        lines += [f"## {s.name or '(unnamed)'} — `{s.id}`", ""] + ([f"![error vs rho](sweep_{s.id}.png)", ""] if plots else [])
        header = ["ρ"] + [h for lab in labels for h in (f"{lab} test", f"{lab} val")]
        lines += [md_row(header), "|" + "|".join("---" for _ in header) + "|"]
        for rho in s.rhos:
            row = [f"{rho:g}"]
            for lab in labels:
                g = next((g for g in s.series[lab] if g.rho == rho), None)
                mark = " ✓" if g is not None and s.chosen(lab) is g else ""
                val = g.val_errors if g is not None else None
                row += [_point(g) + mark if g else "—", f"{fmean(val):.2f}" if val else "—"]
            lines.append(md_row(row))
        unmarked = [lab for lab in labels
                    if len({g.rho for g in s.series[lab]}) > 1 and s.chosen(lab) is None]
        if unmarked:
            lines += ["", f"No ρ marked for {', '.join(unmarked)}: not every point recorded `final_val_error` "
                      "(run with dataset.val_size=N: the paper holds out 10 % of the training set, 5000 images on CIFAR)."]
        lines += unaveraged_lines(s, unaveraged or [])
        lines.append("")
    return "\n".join(lines)


def sweeps_csv(sweeps: list[Sweep]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["sweep", "name", "series", "rho", "test_mean", "test_ci95", "n", "seeds", "val_mean", "chosen"])
    for s in sweeps:
        for lab, groups in s.series.items():
            for g in groups:
                ci, val = ci95(g.errors), g.val_errors
                w.writerow([s.id, s.name, lab, f"{g.rho:g}", f"{g.mean:.4f}", f"{ci:.4f}" if ci is not None else "",
                            len(g.runs), ",".join(map(str, g.seeds)), f"{fmean(val):.4f}" if val else "",
                            "1" if s.chosen(lab) is g else "0"])
    return buf.getvalue()
