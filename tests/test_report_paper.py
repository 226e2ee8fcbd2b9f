"""The paper-table report on a synthetic tree of runs, checked against hand-computed values."""

import csv
import functools
import io
import json
import math

import pytest

from sam_bench.report import write_report
from sam_bench.report.collect import ci95, find_runs, group_runs, t975
from sam_bench.report.paper import layouts
from sam_bench.report.sweeps import find_sweeps
from sam_bench.report.tables import index_groups, measure
from sam_bench.schema import COMPUTE_VERSION

# Reference t_{0.975,df} from standard tables (independent of the module's own table).
T_REF = {1: 12.7062, 2: 4.3027, 4: 2.7764, 9: 2.2622, 29: 2.0452, 40: 2.0211, 60: 2.0003, 120: 1.9799, 1000: 1.9623}


def ref_ci(xs):
    """float64 95 % CI half-width, written out: t · sqrt(Σ(x−x̄)²/(n−1)) / sqrt(n)."""
    n = len(xs)
    mean = math.fsum(xs) / n
    s = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return T_REF[n - 1] * s / math.sqrt(n)


# The paper presets of the names these tests fill cells with: their runs start from the preset's config.
PRESET_OF = {
    "table1/wrn28_10_200ep/basic/cifar10": "table1_wrn28_10_200ep_basic_cifar10",
    "table1/wrn28_10_200ep/basic/cifar10@sgd2x": "table1_wrn28_10_200ep_basic_cifar10_sgd2x",
    "table2/resnet50/100ep/imagenet": "table2_resnet50_100ep_imagenet",
    "table4/resnet32/noise20/cifar10": "table4_resnet32_noise20_cifar10",
    "table11/k1/cifar100": "table11_k1_cifar100",
    "table11/k3/cifar100": "table11_k3_cifar100",
}
PRESET_M = object()  # fake_run's m: the preset's (None for a name without a preset)


@functools.lru_cache(maxsize=None)
def composed_config(*overrides: str) -> str:
    """``sam-bench train``'s config for ``overrides`` as result.json records it (JSON text)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sam_bench.cli import _register
    from sam_bench.paths import config_dir

    _register()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return json.dumps(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def fake_run(root, sub, name, optimizer="sam", rho=0.05, seed=0, error=2.7, *, m=PRESET_M, val=None, extra=None, status="complete",
             opt=None, config=None):
    """A run directory named ``name``: of its paper preset when it has one (run with optimizer=sgd
    or sam, then ρ, m, ``opt`` and, with ``val``, dataset.val_size=5000 set), else a small config."""
    d = root / sub
    (d / ".hydra").mkdir(parents=True)
    if config is not None:
        pass
    elif name in PRESET_OF:
        config = json.loads(composed_config(f"experiment=paper/{PRESET_OF[name]}", f"optimizer={optimizer}"))
        config["optimizer"].update({"rho": rho, **({} if m is PRESET_M else {"m": m}), **(opt or {})})
        config["seed"] = seed
        if val is not None:
            config["dataset"]["val_size"] = 5000
    else:
        config = {
            "dataset": {"name": "cifar10", "root": "/data", "val_size": None if val is None else 5000},
            "model": {"arch": "wide_resnet_cifar", "kwargs": {"depth": 28}},
            "optimizer": {"name": optimizer, "rho": rho, "m": None if m is PRESET_M else m, **(opt or {})},
            "trainer": {"epochs": 200, "progress": False},
            "seed": seed,
            "name": name,
        }
    (d / ".hydra" / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    if status is None:
        return d
    result = {
        "status": status, "name": name, "final_test_error": error, "seed": seed, "config": config,
        "finished_at": "2026-01-01T00:00:00", "train_time_s": 1800.0, "images_per_s": 1000.0 + seed,
        "peak_memory_mb": 2048.0 + seed, "device": "NVIDIA H100", "git_commit": "abc123", "config_hash": "h" + optimizer,
        "compute_version": COMPUTE_VERSION,  # a run of today's code (``extra`` may say otherwise)
    }
    if val is not None:
        result["final_val_error"] = val
    result.update(extra or {})
    (d / "result.json").write_text(json.dumps(result))
    return d


T1 = "table1/wrn28_10_200ep/basic/cifar10"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "runs"
    for seed, err in enumerate([2.5, 2.6, 2.7, 2.8, 2.9]):
        fake_run(root, f"sam/{seed}", T1, "sam", 0.05, seed, err)
    for seed, err in enumerate([3.6, 3.8]):
        fake_run(root, f"sgd/{seed}", T1, "sgd", 0.05, seed, err)
    fake_run(root, "sam/crashed", T1, "sam", 0.05, 7, None, status=None)  # no result.json: must not count
    fake_run(root, "sam/diverged", T1, "sam", 0.05, 8, float("nan"))
    # Table 4 prints accuracy: 100 − error
    for seed, err in enumerate([5.0, 4.8]):
        fake_run(root, f"noise/{seed}", "table4/resnet32/noise20/cifar10", "sam", 0.1, seed, err)
    # a SLURM (submitit) layout: date/time/job-number plus submitit's own logs
    slurm = fake_run(root, "slurm/2026-01-01/12-00-00/0", "table2/resnet50/100ep/imagenet", "sam", 0.05, 0, 22.6,
                     extra={"final_test_top5_error": 6.3})
    (slurm.parent / ".submitit" / "123_0").mkdir(parents=True)
    (slurm.parent / ".submitit" / "123_0" / "123_0_log.out").write_text("log")
    return tmp_path


def test_t_quantiles_match_reference_tables():
    for df, t in T_REF.items():
        assert abs(t975(df) - t) < 2e-3, df
    with pytest.raises(ValueError):
        t975(0)


def test_ci_is_t_halfwidth():
    xs = [2.5, 2.6, 2.7, 2.8, 2.9]
    assert abs(ci95(xs) - ref_ci(xs)) < 1e-3 * ref_ci(xs)
    assert abs(ci95(xs) - 0.19629) < 1e-4  # by hand: 2.776 · 0.158114 / √5
    assert ci95([1.0]) is None


def test_grouping_excludes_incomplete_and_finds_slurm_runs(tree):
    results, incomplete = find_runs([str(tree / "runs")])
    groups = group_runs(results)
    by_key = index_groups(groups)
    assert by_key[f"{T1}@sam"][0].errors == [2.5, 2.6, 2.7, 2.8, 2.9]
    assert by_key[f"{T1}@sgd"][0].seeds == [0, 1]
    assert "table2/resnet50/100ep/imagenet@sam" in by_key
    assert sorted(incomplete) == sorted(str(tree / "runs" / "sam" / s) for s in ("crashed", "diverged"))


def test_table1_cells_hand_computed(tree):
    write_report([str(tree / "runs")], str(tree / "out"))
    md = (tree / "out" / "table1.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| WRN-28-10 (200 epochs) | Basic |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # SAM: mean 2.70, CI 0.196 -> 0.20, Δ vs 2.7 = +0.00; SGD: mean 3.70, CI 12.706·0.1414/√2 = 1.27, Δ +0.20
    assert cells[2:11] == ["2.7 ± 0.1", "2.70 ± 0.20 (n=5)", "+0.00", "3.5 ± 0.1", "3.70 ± 1.27 (n=2)", "+0.20", "3.5 ± 0.1", "—", "—"]
    assert cells[11:] == ["16.5 ± 0.2", "—", "—", "18.8 ± 0.2", "—", "—", "18.8 ± 0.2", "—", "—"]
    # every other row is paper-only
    other = next(line for line in md.splitlines() if line.startswith("| PyramidNet+ShakeDrop | AA |"))
    assert other.count("—") == 12
    # incomplete runs listed, not averaged; compute and provenance per cell
    assert str(tree / "runs" / "sam" / "crashed") in md and str(tree / "runs" / "sam" / "diverged") in md
    assert f"| {T1}@sam | 5 | 0,1,2,3,4 | 2.500 | 1002.0 | 2052 | NVIDIA H100 | abc123 | hsam |" in md
    rows = list(csv.DictReader(io.StringIO((tree / "out" / "table1.csv").read_text())))
    sam = next(r for r in rows if r["key"] == f"{T1}@sam")
    assert sam["mean"] == "2.7000" and sam["n"] == "5" and sam["ci95"] == f"{ref_ci([2.5, 2.6, 2.7, 2.8, 2.9]):.4f}"
    assert sam["gpu_hours"] == "2.500" and sam["seeds"] == "0,1,2,3,4"


def test_accuracy_table_and_top5(tree):
    write_report([str(tree / "runs")], str(tree / "out"))
    t4 = (tree / "out" / "table4.md").read_text()
    row = next(line for line in t4.splitlines() if line.startswith("| SAM | paper's runs |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:5] == ["95.1", "95.10 ± 1.27 (n=2)", "+0.00"]  # accuracy 95.0, 95.2
    t2 = (tree / "out" / "table2.md").read_text()
    row = next(line for line in t2.splitlines() if line.startswith("| ResNet-50 | 100 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:8] == ["22.5 ± 0.1", "22.60 (n=1)", "+0.10", "6.28 ± 0.08", "6.30 (n=1)", "+0.02"]


def test_several_configs_for_one_cell_resolved_on_validation_only(tmp_path):
    """measure() given several candidate configs for one cell (index_groups gives a cell only the
    preset's own config: see test_a_rho_grid_on_a_preset_fills_its_cell_with_the_presets_rho_only)."""
    root = tmp_path / "runs"
    for rho, val, test in ((0.02, 3.0, 2.4), (0.05, 2.8, 2.9), (0.1, 3.3, 2.2)):
        fake_run(root, f"r{rho}", T1, "sam", rho, 0, test, val=val)
    cell = next(c for _, cells in layouts()[0].rows for c in cells if c.key == f"{T1}@sam")
    m = measure(cell, {cell.key: group_runs(find_runs([str(root)])[0])})
    assert m.group.rho == 0.05 and m.values == [2.9]  # lowest val error, not lowest test error
    fake_run(root, "r0.2", T1, "sam", 0.2, 0, 2.0)  # no val error: cannot choose
    m = measure(cell, {cell.key: group_runs(find_runs([str(root)])[0])})
    assert m.values is None and "validation" in m.note


def _row_cells(md: str, prefix: str) -> list[str]:
    row = next(line for line in md.splitlines() if line.startswith(prefix))
    return [c.strip() for c in row.strip("|").split("|")]


def test_a_variant_of_sam_fills_its_own_cell_never_the_papers_sam(tmp_path):
    root = tmp_path / "runs"
    # ASAM, p = inf and 3-step runs of the Table 1 preset: none of them is the paper's SAM
    fake_run(root, "asam", T1, "sam", 0.5, 0, 2.1, opt={"adaptive": True, "eta": 0.01})
    fake_run(root, "pinf", T1, "sam", 0.05, 0, 2.2, opt={"p": "inf"})
    fake_run(root, "k3", T1, "sam", 0.05, 0, 2.3, opt={"ascent_steps": 3})
    fake_run(root, "sgd", T1, "sgd", 0.05, 0, 3.6, opt={"adaptive": True})  # SGD whatever the SAM keys say
    # Table 11: its k = 3 row is filled by 3-step runs only, its k = 1 row by plain SAM
    k3 = "table11/k3/cifar100"
    fake_run(root, "t11k3", k3, "sam", 0.1, 0, 16.6, opt={"ascent_steps": 3})
    fake_run(root, "t11k3_but_k1", k3, "sam", 0.1, 1, 15.0, opt={"ascent_steps": 1})
    fake_run(root, "t11k1", "table11/k1/cifar100", "sam", 0.1, 0, 16.7, opt={"ascent_steps": 1})
    write_report([str(root)], str(tmp_path / "out"))

    t1 = _row_cells((tmp_path / "out" / "table1.md").read_text(), "| WRN-28-10 (200 epochs) | Basic |")
    assert t1[2:8] == ["2.7 ± 0.1", "—", "—", "3.5 ± 0.1", "3.60 (n=1)", "+0.10"]
    t11 = (tmp_path / "out" / "table11.md").read_text()
    assert _row_cells(t11, "| 3 |")[7:10] == ["16.62 ± 0.09", "16.60 (n=1)", "-0.02"]  # paper 16.62; not the k = 1 run's 15.0
    assert _row_cells(t11, "| 1 |")[7:10] == ["16.72 ± 0.08", "16.70 (n=1)", "-0.02"]  # paper 16.72

    summary = list(csv.DictReader(io.StringIO((tmp_path / "out" / "summary.csv").read_text())))
    by_method = {(r["experiment"], r["optimizer"]): r["test_error_mean"] for r in summary}
    assert by_method == {
        (T1, "asam"): "2.1000", (T1, "sam+p=inf"): "2.2000", (T1, "sam+k=3"): "2.3000", (T1, "sgd"): "3.6000",
        (k3, "sam+k=3"): "16.6000", (k3, "sam"): "15.0000", ("table11/k1/cifar100", "sam"): "16.7000",
    }


def test_method_label_names_the_method_not_its_settings():
    from sam_bench.schema import method_label

    assert method_label({"name": "sgd", "adaptive": True, "ascent_steps": 3}) == "sgd"
    assert method_label({"name": "sam"}) == "sam"  # result.json files from before the variants existed
    assert method_label({"name": "sam", "p": "2", "ascent_steps": 1, "second_order": False, "adaptive": False,
                         "m": 32, "bn": "both", "weight_decay_mode": "decoupled"}) == "sam"
    assert method_label({"name": "sam", "adaptive": True}) == "asam"
    assert method_label({"name": "sam", "p": "random"}) == "sam+p=random"
    assert method_label({"name": "sam", "p": "inf", "ascent_steps": 5}) == "sam+p=inf+k=5"
    assert method_label({"name": "sam", "second_order": True}) == "sam+second_order"


def test_sweep_table_plot_and_chosen_rho(tmp_path):
    root = tmp_path / "runs"
    name = "fig3/m_sharpness/cifar10"
    vals = {0.01: 6.0, 0.05: 5.5, 0.1: 5.8}
    for m_ in (4, 16):
        for rho, val in vals.items():
            for seed in (0, 1):
                fake_run(root, f"m{m_}_r{rho}_s{seed}", name, "sam", rho, seed, val - 0.5 + 0.1 * seed + (m_ == 16), m=m_, val=val + (m_ == 16))
    fake_run(root, "sgd", name, "sgd", 0.05, 0, 7.0, val=7.2)
    sweeps = find_sweeps(group_runs(find_runs([str(root)])[0]))
    assert len(sweeps) == 1
    s = sweeps[0]
    assert list(s.series) == ["sam m=4", "sam m=16", "sgd"] and s.rhos == [0.0, 0.01, 0.05, 0.1]
    assert s.chosen("sam m=4").rho == 0.05 and s.chosen("sam m=16").rho == 0.05 and s.chosen("sgd") is None
    write_report([str(root)], str(tmp_path / "out"))
    md = (tmp_path / "out" / "sweeps.md").read_text()
    # m=4, rho 0.05: test errors 5.0, 5.1 -> 5.05 ± 12.706·0.0707/√2 = 0.64; val 5.5
    assert "| 0.05 | 5.05 ± 0.64 (n=2) ✓ | 5.50 | 6.05 ± 0.64 (n=2) ✓ | 6.50 | — | — |" in md
    assert "| 0 | — | — | — | — | 7.00 (n=1) | 7.20 |" in md
    png = tmp_path / "out" / f"sweep_{s.id}.png"
    assert f"![error vs rho](sweep_{s.id}.png)" in md  # outdir.py knows its plots by these links
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chosen = [r for r in csv.DictReader(io.StringIO((tmp_path / "out" / "sweeps.csv").read_text())) if r["chosen"] == "1"]
    assert sorted((r["series"], r["rho"]) for r in chosen) == [("sam m=16", "0.05"), ("sam m=4", "0.05")]


def test_p_norm_sweep_is_one_plot_with_a_series_per_perturbation(tmp_path):
    """Fig. 6: p = 2, ∞ and random over decades of ρ form one sweep (a series each, SGD at ρ = 0),
    drawn on a log ρ axis; another p is never pooled into SAM's series."""
    root = tmp_path / "runs"
    name = "fig6/p_norm/cifar10"
    for p in ("2", "inf", "random"):
        for i, rho in enumerate((1e-4, 1e-2, 1.0, 100.0)):
            fake_run(root, f"p{p}_r{rho}", name, "sam", rho, 0, 3.5 + i + (p != "2"), m=32, opt={"p": p})
    fake_run(root, "sgd", name, "sgd", 0.0, 0, 4.0, opt={"p": "2"})
    sweeps = find_sweeps(group_runs(find_runs([str(root)])[0]))
    assert len(sweeps) == 1
    s = sweeps[0]
    assert list(s.series) == ["sam m=32", "sam+p=inf m=32", "sam+p=random m=32", "sgd"]
    assert s.rhos == [0.0, 1e-4, 1e-2, 1.0, 100.0]
    assert [g.mean for g in s.series["sam+p=inf m=32"]] == [4.5, 5.5, 6.5, 7.5]
    write_report([str(root)], str(tmp_path / "out"))
    md = (tmp_path / "out" / "sweeps.md").read_text()
    assert "| 0.0001 | 3.50 (n=1) | — | 4.50 (n=1) | — | 4.50 (n=1) | — | — | — |" in md
    assert (tmp_path / "out" / f"sweep_{s.id}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_rho_per_perturbation_is_a_comparison_not_a_sweep(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "p2", "x", "sam", 0.05, 0, 3.0, opt={"p": "2"})
    fake_run(root, "pinf", "x", "sam", 0.1, 0, 3.5, opt={"p": "inf"})
    fake_run(root, "sgd", "x", "sgd", 0.0, 0, 4.0, opt={"p": "2"})
    assert find_sweeps(group_runs(find_runs([str(root)])[0])) == []


def test_a_sweep_of_one_p_keeps_the_id_it_had_before_p_became_a_series(tmp_path):
    """Sweep ids name the PNGs and TensorBoard directories: a sweep whose runs share one p (every
    sweep before Fig. 6) keeps its id; the id hashes the family config without rho, m and the optimizer name."""
    import hashlib
    import json as json_

    from sam_bench.schema import semantic_config

    root = tmp_path / "runs"
    for rho in (0.01, 0.05):
        fake_run(root, f"m4_{rho}", "fig3/m_sharpness/cifar10", "sam", rho, 0, 5.0, m=4, opt={"p": "2"})
    fake_run(root, "sgd", "fig3/m_sharpness/cifar10", "sgd", 0.0, 0, 6.0, opt={"p": "2"})
    (sweep,) = find_sweeps(group_runs(find_runs([str(root)])[0]))
    config = next(g for g in group_runs(find_runs([str(root)])[0]) if g.method == "sam").config
    old_key = json_.dumps(semantic_config(config, drop=("optimizer.rho", "optimizer.m", "optimizer.name")), sort_keys=True, default=str)
    assert sweep.id == f"fig3_m_sharpness_cifar10-{hashlib.sha256(old_key.encode()).hexdigest()[:8]}"


def test_sweep_plot_takes_a_log_axis_over_decades_of_rho():
    from unittest import mock

    from matplotlib.figure import Figure

    from sam_bench.report.collect import Group
    from sam_bench.report.plots import sweep_png
    from sam_bench.report.sweeps import Sweep

    axes, add_subplot = [], Figure.add_subplot

    def spy(self, *a, **kw):
        axes.append(add_subplot(self, *a, **kw))
        return axes[-1]

    def group(rho):
        return Group({"name": "x", "optimizer": {"name": "sam", "rho": rho}}, [{"final_test_error": 3.0, "seed": 0}])

    with mock.patch.object(Figure, "add_subplot", spy):
        for rhos in ((0.01, 0.05, 0.1), (1e-6, 1e-3, 1.0)):
            sweep_png(Sweep("id", "x", {"sam": [group(r) for r in rhos]}))
    assert [ax.get_xscale() for ax in axes] == ["linear", "symlog"]


def test_sgd_is_the_baseline_of_an_asam_sweep_too(tmp_path):
    """`optimizer=sgd,asam optimizer.rho=...`: the SGD run (ASAM's keys are off in it) joins ASAM's
    sweep as its ρ = 0 point, and still joins SAM's."""
    root = tmp_path / "runs"
    asam = {"adaptive": True, "eta": 0.01}
    for rho in (0.5, 1.0):
        fake_run(root, f"asam{rho}", "x", "sam", rho, 0, 3.0 + rho, val=4.0 + rho, opt=asam)
        fake_run(root, f"sam{rho}", "x", "sam", rho / 10, 0, 3.0 + rho, val=4.0 + rho, opt={"adaptive": False, "eta": 0.01})
    fake_run(root, "sgd", "x", "sgd", 0.0, 0, 5.0, val=6.0, opt={"adaptive": False, "eta": 0.01})
    sweeps = find_sweeps(group_runs(find_runs([str(root)])[0]))
    assert sorted(tuple(s.series) for s in sweeps) == [("asam", "sgd"), ("sam", "sgd")]
    assert all(s.rhos[0] == 0.0 for s in sweeps)


def test_sweep_without_validation_marks_nothing(tmp_path):
    root = tmp_path / "runs"
    for rho in (0.02, 0.05):
        fake_run(root, f"r{rho}", "x", "sam", rho, 0, 3.0)
    write_report([str(root)], str(tmp_path / "out"))
    md = (tmp_path / "out" / "sweeps.md").read_text()
    assert "✓" not in md.split("## ")[1] and "No ρ marked for sam" in md


def test_report_is_byte_stable_and_writes_only_under_out(tree):
    before = {p: p.stat().st_mtime_ns for p in tree.rglob("*")}
    write_report([str(tree / "runs")], str(tree / "out1"))
    write_report([str(tree / "runs")], str(tree / "out2"))
    after = {p for p in tree.rglob("*") if not p.is_relative_to(tree / "out1") and not p.is_relative_to(tree / "out2")}
    assert after == set(before) and all(p.stat().st_mtime_ns == before[p] for p in after)
    files1 = sorted(p.relative_to(tree / "out1") for p in (tree / "out1").rglob("*"))
    files2 = sorted(p.relative_to(tree / "out2") for p in (tree / "out2").rglob("*"))
    # summary.md/.csv, each table's .md/.csv, sweeps.md/.csv, hessian.md, README.md
    assert files1 == files2 and len(files1) == 2 + 2 * len(layouts()) + 2 + 1 + 1
    for f in files1:
        assert (tree / "out1" / f).read_bytes() == (tree / "out2" / f).read_bytes(), f


def test_png_bytes_stable(tmp_path):
    root = tmp_path / "runs"
    for rho in (0.02, 0.05, 0.1):
        fake_run(root, f"r{rho}", "x", "sam", rho, 0, 3.0 + rho, val=3.1)
    write_report([str(root)], str(tmp_path / "a"))
    write_report([str(root)], str(tmp_path / "b"))
    pngs = sorted((tmp_path / "a").glob("sweep_*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes() == (tmp_path / "b" / pngs[0].name).read_bytes()
    # a sweep that disappears takes its stale plot with it, and only its own: not a plot of someone else's
    (tmp_path / "a" / "sweep_mine.png").write_bytes(b"mine")
    (tmp_path / "a" / "sweep_x-0123abcd.png").write_bytes(b"mine too")  # named as ours, yet not in our sweeps.md
    write_report([str(tmp_path / "nothing_here"), str(root / "r0.02")], str(tmp_path / "a"))
    assert sorted(p.name for p in (tmp_path / "a").glob("sweep_*.png")) == ["sweep_mine.png", "sweep_x-0123abcd.png"]


def test_tensorboard_hparams_for_sweeps(tmp_path):
    root = tmp_path / "runs"
    for rho in (0.02, 0.05):
        fake_run(root, f"r{rho}", "x", "sam", rho, 0, 3.0, val=3.1)
    write_report([str(root)], str(tmp_path / "out"), tensorboard=True)
    once = len(list((tmp_path / "out" / "tensorboard").rglob("events.out.tfevents*")))
    write_report([str(root)], str(tmp_path / "out"), tensorboard=True)  # a second report replaces, not adds
    assert len(list((tmp_path / "out" / "tensorboard").rglob("events.out.tfevents*"))) == once
    dirs = sorted(p for p in (tmp_path / "out" / "tensorboard").rglob("*") if p.is_dir() and p.parent.parent.name == "tensorboard")
    assert [d.name for d in dirs] == ["sam_rho0.02", "sam_rho0.05"]
    for d in dirs:
        events = list(d.iterdir())
        assert events and all(e.is_file() and e.name.startswith("events.out.tfevents") for e in events)  # run_name="."
        blob = b"".join(e.read_bytes() for e in events)
        assert b"hparams" in blob and b"rho" in blob and b"hparam/test_error" in blob


@pytest.mark.slow
def test_cli_report_writes_every_table(tree, cli_env):
    import subprocess
    import sys
    from pathlib import Path

    out = tree / "cli_out"
    proc = subprocess.run([sys.executable, "-m", "sam_bench", "report", f"runs=[{tree / 'runs'}]", f"out={out}", "print_table=false"],
                          capture_output=True, text=True, env=cli_env, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("table*.md")) == sorted(f"{lay.id}.md" for lay in layouts())
    assert proc.stdout == ""  # print_table=false; where the files went is said on stderr, its last line
    assert proc.stderr.splitlines()[-1] == f"sam-bench: report written to {out}/ (README.md there lists its tables)"


def test_table_scripts_launch_presets_pass_overrides_and_regenerate(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    assert sorted(p.name for p in (repo / "scripts").glob("table*.sh")) == sorted(f"{lay.id}.sh" for lay in layouts())
    env = dict(os.environ, DRY_RUN="1", PRESETS="table1_wrn28_10_200ep_basic_*", PYTHON="py", REPORT_OUT=str(tmp_path / "r"))
    proc = subprocess.run(["bash", str(repo / "scripts" / "table1.sh"), "hydra/launcher=submitit_slurm", "trainer.epochs=1"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    stems = ["table1_wrn28_10_200ep_basic_cifar10", "table1_wrn28_10_200ep_basic_cifar100"]
    assert lines[:2] == [f"py -m sam_bench train -m experiment=paper/{s} seed=0\\,1\\,2\\,3\\,4 optimizer=sgd\\,sam hydra/launcher=submitit_slurm trainer.epochs=1 " for s in stems]
    assert lines[2:4] == [f"py -m sam_bench train -m experiment=paper/{s}_sgd2x seed=0\\,1\\,2\\,3\\,4 hydra/launcher=submitit_slurm trainer.epochs=1 " for s in stems[::-1]]
    assert lines[4:] == [f"py -m sam_bench report out={tmp_path / 'r'} "]
    env["PRESETS"] = "no_such_preset"
    proc = subprocess.run(["bash", str(repo / "scripts" / "table2.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "no preset matches" in proc.stderr


def test_without_matplotlib_tables_are_written_and_plots_skipped(tmp_path, monkeypatch):
    import sys

    root = tmp_path / "runs"
    for rho in (0.02, 0.05):
        fake_run(root, f"r{rho}", "x", "sam", rho, 0, 3.0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    write_report([str(root)], str(tmp_path / "out"))
    assert not list((tmp_path / "out").glob("sweep_*.png"))
    md = (tmp_path / "out" / "sweeps.md").read_text()
    assert "matplotlib is not installed" in md and "](sweep_" not in md  # no link to a plot not written


def test_committed_paper_tables_are_what_the_reporter_writes(tmp_path):
    """results/table*.md/.csv hold no runs yet: they must equal a fresh report of no runs, so a
    change to the layouts or keys cannot leave them stale."""
    from pathlib import Path

    (tmp_path / "none").mkdir()
    write_report([str(tmp_path / "none")], str(tmp_path / "out"))
    committed = Path(__file__).resolve().parents[1] / "results"
    fresh = sorted(p.name for p in (tmp_path / "out").glob("table*"))
    assert fresh == sorted(p.name for p in committed.glob("table*")) and len(fresh) == 18
    for name in fresh:
        assert (tmp_path / "out" / name).read_text() == (committed / name).read_text(), name


def test_table11_script_takes_seeds_from_the_user_else_the_papers_20():
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "table11.sh"

    def first_command(**env):
        base = {k: v for k, v in os.environ.items() if k != "SEEDS"}
        out = subprocess.run(["bash", str(script)], env={**base, "DRY_RUN": "1", **env}, capture_output=True, text=True, check=True)
        return out.stdout.splitlines()[0].rstrip()

    assert first_command(SEEDS="0,1").endswith("seed=0\\,1")
    assert first_command().endswith("seed=range\\(20\\)")


def test_paper_script_with_presets_from_one_of_its_globs_runs_them_and_the_report():
    """table1.sh trains two globs (the cells, then the 2x-epochs SGD); PRESETS naming one cell
    preset matches the first only, which is no error; matching nothing is (exit 2)."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "table1.sh"
    env = {**os.environ, "DRY_RUN": "1", "SEEDS": "0", "PYTHON": "py"}
    one = subprocess.run(["bash", str(script)], env={**env, "PRESETS": "table1_wrn28_10_200ep_basic_cifar10"},
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines() == ["py -m sam_bench train -m experiment=paper/table1_wrn28_10_200ep_basic_cifar10 seed=0 "
                                       "optimizer=sgd\\,sam ", "py -m sam_bench report out=results "]
    none = subprocess.run(["bash", str(script)], env={**env, "PRESETS": "nosuch"}, capture_output=True, text=True)
    assert none.returncode == 2 and none.stderr.strip() == "no preset matches table1_*[^x] table1_*_sgd2x and PRESETS=nosuch"
    assert "report" not in none.stdout


@pytest.mark.parametrize("code,goes_on", [(1, True), (75, False), (130, False)])
def test_paper_script_goes_on_after_a_failed_preset_but_not_after_preemption(tmp_path, code, goes_on):
    """A preset whose multirun fails (e.g. a diverged sweep point, exit 1) does not stop the table:
    the other presets run, the report is regenerated, and the script exits 1 naming it. Preemption
    (75) or a signal (130) stops the script at once."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "table11.sh"
    fake = tmp_path / "py"
    log = tmp_path / "calls"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n[[ "$*" == *"table11_k1_cifar100 "* ]] && exit {code}\nexit 0\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "PRESETS": "table11_k[12]_*", "SEEDS": "0"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    calls = [line.split()[4 if "train" in line else 2] for line in log.read_text().splitlines()]
    assert proc.returncode == (1 if goes_on else code), proc.stderr
    if goes_on:
        assert calls == ["experiment=paper/table11_k1_cifar10", "experiment=paper/table11_k1_cifar100",
                         "experiment=paper/table11_k2_cifar10", "experiment=paper/table11_k2_cifar100", "report"]
        assert proc.stderr.strip().splitlines()[-1] == "failed presets (the report lists their unfinished runs): table11_k1_cifar100"
    else:
        assert calls == ["experiment=paper/table11_k1_cifar10", "experiment=paper/table11_k1_cifar100"]


def test_a_validation_tie_goes_to_the_lower_rho_in_the_table_as_in_the_sweep(tmp_path):
    root = tmp_path / "runs"
    for rho in (1e-05, 0.0001, 0.5):  # json order would pick 0.0001 ("1e-05" sorts after it)
        fake_run(root, f"r{rho}", T1, "sam", rho, 0, 2.0 + rho, m=None, val=4.0)
    groups = group_runs(find_runs([str(root)])[0])
    cell = next(c for _, cells in layouts()[0].rows for c in cells if c.key == f"{T1}@sam")
    assert measure(cell, {cell.key: groups}).group.rho == 1e-05
    (sweep,) = find_sweeps(groups)
    assert sweep.chosen("sam").rho == 1e-05


def test_table10_fills_its_rho_005_column_from_table3_and_leaves_the_optimal_rho_to_the_paper():
    """The Table 3 presets train at ρ = 0.05 (the optimal ρ is not printed): those runs are Table
    10's ρ = 0.05 column, and nothing fills 'SAM (optimal ρ)' (it used to take the same runs)."""
    from sam_bench.report.paper import layouts

    t10 = next(lay for lay in layouts() if lay.id == "table10")
    for (dataset,), (optimal, rho005, no_sam) in t10.rows:
        assert optimal.key is None
        if dataset != "Birdsnap":
            assert rho005.key.startswith("table3/") and rho005.key.endswith("/b7@sam") and no_sam.key.endswith("/b7@sgd")


T4 = "table4/resnet32/noise20/cifar10"


def test_a_run_that_changes_its_preset_fills_no_cell_and_the_table_says_so(tmp_path):
    """A cell takes only the runs whose config is the preset's (with optimizer=sgd or sam): a
    1-epoch SGD run of the Table 4 preset, a Table 1 CIFAR-10 preset run on CIFAR-100, or the
    ρ grid of scripts/table8.sh are other experiments (summary.md, sweeps.md), named below the table."""
    root = tmp_path / "runs"
    for seed, err in enumerate([15.0, 15.4]):
        fake_run(root, f"sgd/{seed}", T4, "sgd", 0.0, seed, err)
    short = json.loads(composed_config(f"experiment=paper/{PRESET_OF[T4]}", "optimizer=sgd", "trainer.epochs=1"))
    fake_run(root, "sgd_1ep", T4, "sgd", 0.0, 2, 60.0, config={**short, "seed": 2})
    other = json.loads(composed_config(f"experiment=paper/{PRESET_OF[T1]}", "optimizer=sam", "dataset=cifar100"))
    fake_run(root, "t1_on_cifar100", T1, "sam", 0.05, 0, 17.0, config=other)
    for rho in (0.01, 0.05, 0.1, 0.2):  # scripts/table8.sh: the table4 preset, dataset.val_size=5000, a ρ grid (SAM)
        fake_run(root, f"t8/{rho}", T4, "sam", rho, 0, 10.0 + rho, val=12.0 - rho)
    fake_run(root, "sam/0", T4, "sam", 0.1, 0, 4.9)  # the preset itself: all 50k training images, its ρ
    write_report([str(root)], str(tmp_path / "out"))

    t4 = (tmp_path / "out" / "table4.md").read_text()
    assert _row_cells(t4, "| SGD | paper's runs |")[2:5] == ["84.8", "84.80 ± 2.54 (n=2)*", "+0.00"]  # not the 1-epoch run
    # the preset's own run only: not the grid's ρ = 0.1 point either, which trained on 45k images (its validation split)
    assert _row_cells(t4, "| SAM | paper's runs |")[2:5] == ["95.1", "95.10 (n=1)*", "+0.00"]
    assert f"- * SGD / paper's runs · noise 20%: runs named `{T4}` that change the preset (trainer.epochs) are not compared: " \
           "see summary.md" in t4
    assert f"- * SAM / paper's runs · noise 20%: runs named `{T4}` that change the preset (dataset.val_size" in t4
    t1 = (tmp_path / "out" / "table1.md").read_text()
    assert _row_cells(t1, "| WRN-28-10 (200 epochs) | Basic |")[2:5] == ["2.7 ± 0.1", "—*", "—"]  # * : the note below
    assert "CIFAR-10 SAM: runs named" in t1 and "dataset.name" in t1 and "dataset.num_classes" in t1
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table1.csv").read_text())))
    assert "dataset.name" in next(r for r in rows if r["key"] == f"{T1}@sam")["note"]
    assert "| 0.2 |" in (tmp_path / "out" / "sweeps.md").read_text()  # the grid is still a sweep
    assert "| 60.00 | 1 | 2 |" in (tmp_path / "out" / "summary.md").read_text()  # listed with its own config


def test_every_paper_preset_is_found_from_the_name_it_sets():
    """The report finds a cell's preset from its name (tables.preset_stem): it must hold for every preset."""
    from pathlib import Path

    import yaml

    from sam_bench.paths import config_dir
    from sam_bench.report.tables import preset_stem

    presets = sorted((Path(config_dir()) / "experiment" / "paper").glob("*.yaml"))
    assert len(presets) > 100
    for path in presets:
        assert preset_stem(yaml.safe_load(path.read_text())["name"]) == path.stem, path


def test_the_sgd_2x_column_takes_sgd_runs_only(tmp_path):
    from sam_bench.report.collect import Group

    sgd2x = f"{T1}@sgd2x"
    assert Group({"name": sgd2x, "optimizer": {"name": "sgd"}}).cell_key == sgd2x
    assert Group({"name": sgd2x, "optimizer": {"name": "sam"}}).cell_key == f"{sgd2x}@sam"
    assert Group({"name": sgd2x, "optimizer": {"name": "sam", "adaptive": True}}).cell_key == f"{sgd2x}@asam"
    root = tmp_path / "runs"
    fake_run(root, "sam", sgd2x, "sam", 0.05, 0, 2.0)  # experiment=paper/..._sgd2x optimizer=sam
    write_report([str(root)], str(tmp_path / "out"))
    assert _row_cells((tmp_path / "out" / "table1.md").read_text(), "| WRN-28-10 (200 epochs) | Basic |")[8:11] == ["3.5 ± 0.1", "—", "—"]
    fake_run(root, "sgd", sgd2x, "sgd", 0.0, 0, 3.4)
    write_report([str(root)], str(tmp_path / "out"))
    assert _row_cells((tmp_path / "out" / "table1.md").read_text(), "| WRN-28-10 (200 epochs) | Basic |")[8:11] == ["3.5 ± 0.1", "3.40 (n=1)", "-0.10"]


def test_sgd_runs_that_differ_in_rho_or_sam_only_keys_are_one_group_at_rho_0(tmp_path):
    """`optimizer=sgd,sam optimizer.rho=0.02,0.05`: the SGD runs are one config (ρ = 0), counted once,
    fill their cell, and are one sweep point with nothing chosen. Not m: SGD normalises BN per chunk
    of m, so an SGD run with another m is another experiment."""
    root = tmp_path / "runs"
    for rho, val in ((0.02, 3.0), (0.05, 2.8)):
        fake_run(root, f"sam{rho}", "x", "sam", rho, 0, 3.0, val=val)
        fake_run(root, f"sgd{rho}", "x", "sgd", rho, int(rho * 100), 4.0 + rho, val=5.0 - rho,
                 opt={"adaptive": rho > 0.03, "ascent_steps": 1 + (rho > 0.03), "p": "inf" if rho > 0.03 else "2"})
    groups = group_runs(find_runs([str(root)])[0])
    (sgd,) = [g for g in groups if g.method == "sgd"]
    assert sgd.seeds == [2, 5] and sgd.config["optimizer"]["rho"] == 0.0
    other = fake_run(tmp_path / "other", "sgd_m32", "x", "sgd", 0.05, 7, 4.5, val=4.9, opt={"m": 32}, extra={"compute_version": 3})
    assert len([g for g in group_runs(find_runs([str(root), str(other)])[0]) if g.method == "sgd"]) == 2
    # an SGD run from before compute_version 3 ignored m (whole-batch BN): it is the run without m
    old = fake_run(tmp_path / "old", "sgd_m32_old", "x", "sgd", 0.05, 8, 4.6, val=4.9, opt={"m": 32}, extra={"compute_version": None})
    (sgd,) = [g for g in group_runs(find_runs([str(root), str(old)])[0]) if g.method == "sgd"]
    assert sgd.seeds == [2, 5, 8]
    write_report([str(root)], str(tmp_path / "out"))
    summary = list(csv.DictReader(io.StringIO((tmp_path / "out" / "summary.csv").read_text())))
    assert [(r["optimizer"], r["rho"], r["n"]) for r in summary if r["optimizer"] == "sgd"] == [("sgd", "0", "2")]
    md = (tmp_path / "out" / "sweeps.md").read_text()
    assert "| 0 | — | — | 4.04 ± 0.19 (n=2) | 4.96 |" in md and md.count("✓") == 1 + 1  # the legend's and SAM's
    for rho in (0.05, 0.1):  # the Table 1 SGD cell takes SGD runs of the preset whatever their optimizer.rho
        fake_run(root, f"t1sgd{rho}", T1, "sgd", rho, int(rho * 100), 3.6)
    write_report([str(root)], str(tmp_path / "out"))
    assert _row_cells((tmp_path / "out" / "table1.md").read_text(), "| WRN-28-10 (200 epochs) | Basic |")[5:8] == \
        ["3.5 ± 0.1", "3.60 ± 0.00 (n=2)", "+0.10"]


def test_runs_of_an_older_version_group_with_current_runs_of_their_preset(tmp_path):
    """Keys added to the config since (here the variants' keys, label noise, final_sharpness) read as
    the schema's defaults: an old run of the preset is the same experiment as a new one."""
    root = tmp_path / "runs"
    fake_run(root, "new", T1, "sam", 0.05, 0, 2.6)
    old = json.loads(composed_config(f"experiment=paper/{PRESET_OF[T1]}", "optimizer=sam"))
    for key in ("p", "ascent_steps", "second_order", "diagnostics", "sync_perturbation"):
        del old["optimizer"][key]
    del old["dataset"]["label_noise"], old["trainer"]["final_sharpness"]
    fake_run(root, "old", T1, "sam", 0.05, 1, 2.8, config={**old, "seed": 1})
    (group,) = group_runs(find_runs([str(root)])[0])
    assert group.seeds == [0, 1]
    write_report([str(root)], str(tmp_path / "out"))
    assert _row_cells((tmp_path / "out" / "table1.md").read_text(), "| WRN-28-10 (200 epochs) | Basic |")[3] == "2.70 ± 1.27 (n=2)"


def test_pipes_in_values_are_escaped_in_every_markdown_table(tmp_path):
    root = tmp_path / "runs"
    for rho in (0.02, 0.05):
        fake_run(root, f"r{rho}", "my|exp", "sam", rho, 0, 3.0, val=3.1 + rho)
    spectrum = {"arch": "a|b", "dataset": "cifar10", "optimizer": "sam", "method": "sam", "rho": 0.05, "epoch": 1,
                "images": 10, "eigenvalues": [2.0, 1.0], "lambda_max": 2.0, "lambda_max_over_lambda_2": 2.0, "name": "my|exp"}
    (root / "r0.02" / "hessian_x.json").write_text(json.dumps(spectrum))
    write_report([str(root)], str(tmp_path / "out"))
    for name, columns in (("summary.md", 9), ("hessian.md", 10)):
        rows = [line for line in (tmp_path / "out" / name).read_text().splitlines() if "my\\|exp" in line or "a\\|b" in line]
        assert rows, name
        for row in rows:  # a cell count as the header's: no unescaped pipe inside a cell
            assert len([c for c in row.replace("\\|", "").strip("|").split("|")]) == columns, (name, row)


def _spectrum(path, method, eigenvalues, *, converged=None, rho=0.05, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    k = len(eigenvalues)
    s = {"arch": "wrn40_10_nobn", "dataset": "cifar10", "optimizer": "sgd" if method == "sgd" else "sam", "rho": rho,
         "epoch": 1, "images": 5000, "eigenvalues": eigenvalues, "lambda_max": eigenvalues[0],
         f"lambda_max_over_lambda_{k}": eigenvalues[0] / eigenvalues[-1], **extra}
    if method is not None:
        s["method"] = method
    if converged is not None:
        s["converged"] = converged
    path.write_text(json.dumps(s))


def _panel(md: str, optimizer: str) -> list[str]:
    return _row_cells(md.split("## By experiment")[0], f"| {optimizer} | 1 |")


def test_spectra_of_asam_do_not_fill_the_papers_sam_row(tmp_path):
    from sam_bench.report.spectra import find_spectra, spectra_markdown

    runs = tmp_path / "runs"
    _spectrum(runs / "sam" / "hessian_a.json", "sam", [20.0, 8, 6, 4, 2.0])
    _spectrum(runs / "asam" / "hessian_a.json", "asam", [90.0, 8, 6, 4, 2.0])
    _spectrum(runs / "old_asam" / "hessian_a.json", None, [70.0, 8, 6, 4, 2.0])  # before `method`: the run's config says
    (runs / "old_asam" / ".hydra").mkdir()
    (runs / "old_asam" / ".hydra" / "config.yaml").write_text("optimizer: {name: sam, rho: 0.5, adaptive: true}\n")
    md = spectra_markdown(find_spectra([str(runs)]))
    assert _panel(md, "SAM")[3] == "20 (1)"
    assert "| cifar10 | asam | 0.05 | 1 | 5000 | 80 ± 14.1 |" in md  # both ASAM spectra: their own experiment


def test_sgd_spectra_are_rho_0_whatever_optimizer_rho_said(tmp_path):
    from sam_bench.report.spectra import find_spectra, spectra_markdown

    runs = tmp_path / "runs"
    _spectrum(runs / "a" / "hessian_a.json", "sgd", [20.0, 8, 6, 4, 2.0], rho=0.05, training_seed=0)
    _spectrum(runs / "b" / "hessian_a.json", "sgd", [30.0, 8, 6, 4, 2.0], rho=0.1, training_seed=1)
    md = spectra_markdown(find_spectra([str(runs)]))
    assert _panel(md, "SGD")[3] == "25 (2)"


def test_unreliable_eigenvalue_ratios_are_left_out_of_the_papers_panel(tmp_path):
    from sam_bench.report.spectra import find_spectra, spectra_markdown

    runs = tmp_path / "runs"
    _spectrum(runs / "a" / "hessian_a.json", "sam", [20.0, 8, 6, 4, 2.0], converged=[True] * 5, training_seed=0)
    _spectrum(runs / "b" / "hessian_a.json", "sam", [20.0, 8, 6, 4, -0.5], converged=[True] * 5, training_seed=1)
    _spectrum(runs / "c" / "hessian_a.json", "sam", [20.0, 8, 6, 4, 0.1], converged=[True] * 4 + [False], training_seed=2)
    md = spectra_markdown(find_spectra([str(runs)]))
    assert _panel(md, "SAM")[5] == "10 (1); 2 left out (not converged, λ_k ≤ 0)"
    grouped = md.split("## By experiment")[1].split("## Every spectrum")[0]  # the same rule there (it averaged -40 and 200 in)
    assert "| 10 (5); 2 left out (not converged, λ_k ≤ 0) |" in grouped


def test_gpu_hours_count_every_rank_of_a_torchrun_run():
    """A 2-rank run of an hour is two GPU-hours: the trainer records the ranks in the config
    (``ranks``), which the report reads (it read a ``world_size`` key no result.json had)."""
    from sam_bench.report.collect import Group
    from sam_bench.report.tables import compute

    runs = [{"seed": 0, "train_time_s": 3600.0, "config": {"ranks": 2}}, {"seed": 1, "train_time_s": 3600.0, "config": {}}]
    assert compute(Group(config={}, runs=runs))["gpu_hours"] == "3.000"


def test_runs_on_either_side_of_a_change_that_concerns_their_config_are_kept_apart():
    """An AutoAugment run from before compute_version 4 (torchvision's policy) is not a seed of one with
    the official policy; a Basic-augmentation run, which version 4 did not change, still is."""
    def result(seed, version, autoaugment):
        config = {"name": "x", "dataset": {"name": "cifar10", "autoaugment": autoaugment}, "optimizer": {"name": "sam", "rho": 0.05}}
        return {"seed": seed, "final_test_error": 3.0, "config": {**config, "seed": seed},
                **({"compute_version": version} if version else {})}

    aa = group_runs([result(0, None, "cifar10"), result(1, 4, "cifar10")])
    basic = group_runs([result(0, None, None), result(1, 4, None)])
    assert [g.seeds for g in aa] == [[0], [1]] and [g.seeds for g in basic] == [[0, 1]]


def test_summary_rows_follow_the_name_and_computed_as_shows_only_where_it_tells_runs_apart(tmp_path):
    """QA: a Table 5 Fashion-MNIST preset with SGD m=32 gave a `computed_as` column (3 for its SGD, 2 for
    the rest: the last code change that concerns each config) that told no rows apart, and rows in the
    order of the grouping config's JSON (computed_as first). Now rows sort by name, dataset, model,
    method, ρ, epochs; the column and a note under the table come only where two rows differ in it alone."""
    name = "table5/wrn28_10/basic/fashion_mnist"
    config = json.loads(composed_config("experiment=paper/table5_wrn28_10_basic_fashion_mnist", "optimizer=sgd"))
    config["optimizer"]["m"] = 32
    root = tmp_path / "runs"
    fake_run(root, "zz", "a_small", "sgd", 0.0, 0, 4.0)
    fake_run(root, "t5sgd", name, "sgd", 0.0, 0, 5.0, config=config)
    fake_run(root, "t5sam", name, "sam", 0.05, 0, 4.5, config={**config, "optimizer": {**config["optimizer"], "name": "sam", "rho": 0.05}})
    fake_run(root, "syn", "synthetic", "sgd", 0.0, 0, 3.0)
    write_report([str(root)], str(tmp_path / "out"))
    summary = (tmp_path / "out" / "summary.md").read_text()
    rows = [line.split(" | ")[0:4] for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [["| a_small", "cifar10", "wide_resnet_cifar", "sgd"], ["| synthetic", "cifar10", "wide_resnet_cifar", "sgd"],
                    [f"| {name}", "fashion_mnist", "wide_resnet_cifar", "sam"], [f"| {name}", "fashion_mnist", "wide_resnet_cifar", "sgd"]]
    assert "computed_as" not in summary and "computed_as" not in (tmp_path / "out" / "summary.csv").read_text()
    csv_names = [r["experiment"] for r in csv.DictReader(io.StringIO((tmp_path / "out" / "summary.csv").read_text()))]
    assert csv_names == ["a_small", "synthetic", name, name]
    # an AutoAugment run from before compute_version 4 beside one of today: the column tells them apart, the note says why
    aa = json.loads(composed_config("experiment=paper/table5_wrn28_10_aa_svhn", "optimizer=sam"))
    fake_run(root, "aa_v3", aa["name"], config=aa, extra={"compute_version": 3})
    fake_run(root, "aa_now", aa["name"], seed=1, config={**aa, "seed": 1})
    write_report([str(root)], str(tmp_path / "out"))
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| computed_as |" in summary and "| table5/wrn28_10/aa/svhn | svhn | wide_resnet_cifar | sam | 0.01 | 200 | 2 |" in summary
    assert "\ncomputed_as: the last change to the code that concerns a row's config" in summary
    assert "2 = since: strided 3x3 convolutions pad" in summary and "4 = since: AutoAugment is the official" in summary
