"""The reporter on a synthetic tree of runs: grouping, mean ± std, incomplete runs, stability."""

import json
import statistics

from sam_bench.report import write_report
from sam_bench.report.collect import find_runs, group_runs


def fake_run(root, name, optimizer, rho, seed, error, status="complete", epochs=200):
    d = root / name
    d.mkdir(parents=True)
    (d / ".hydra").mkdir()
    (d / ".hydra" / "config.yaml").write_text("seed: 0\n")  # what Hydra leaves in every run dir
    config = {
        "dataset": {"name": "cifar10", "root": "/data"},
        "model": {"arch": "wrn28_10", "kwargs": {}},
        "optimizer": {"name": optimizer, "rho": rho},
        "trainer": {"epochs": epochs, "progress": False},
        "seed": seed,
        "data_root": "/somewhere/else",
        "name": "t1",
    }
    result = {"status": status, "final_test_error": error, "seed": seed, "config": config, "finished_at": f"2026-01-0{seed + 1}"}
    if status is not None:
        (d / "result.json").write_text(json.dumps(result))
    return d


def test_groups_by_config_without_seed_and_computes_mean_std(tmp_path):
    for seed, err in enumerate([3.0, 3.4, 3.2]):
        fake_run(tmp_path, f"sgd_s{seed}", "sgd", 0.0, seed, err)
    for seed, err in enumerate([2.6, 2.8]):
        fake_run(tmp_path, f"sam_s{seed}", "sam", 0.05, seed, err)
    fake_run(tmp_path, "sam_crashed", "sam", 0.05, 2, None, status=None)  # no result.json
    fake_run(tmp_path, "sam_nan", "sam", 0.05, 3, float("nan"))
    results, incomplete = find_runs([str(tmp_path)])
    groups = group_runs(results)
    assert len(groups) == 2
    by_opt = {g.config["optimizer"]["name"]: g for g in groups}
    assert by_opt["sgd"].errors == [3.0, 3.4, 3.2] and by_opt["sgd"].seeds == [0, 1, 2]
    assert abs(by_opt["sgd"].mean - 3.2) < 1e-12
    assert abs(by_opt["sgd"].std - 0.2) < 1e-12  # sample std of 3.0, 3.4, 3.2
    assert abs(by_opt["sam"].std - statistics.stdev([2.6, 2.8])) < 1e-12
    assert sorted(incomplete) == [str(tmp_path / "sam_crashed"), str(tmp_path / "sam_nan")]


def test_duplicate_seed_keeps_the_latest_run(tmp_path):
    fake_run(tmp_path, "a", "sgd", 0.0, 0, 5.0)
    d = fake_run(tmp_path, "b", "sgd", 0.0, 0, 4.0)
    r = json.loads((d / "result.json").read_text())
    r["finished_at"] = "2027-01-01"
    (d / "result.json").write_text(json.dumps(r))
    groups = group_runs(find_runs([str(tmp_path)])[0])
    assert len(groups) == 1 and groups[0].errors == [4.0]


def test_report_files_are_byte_stable_and_show_varying_keys(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "x1", "sam", 0.05, 0, 2.7, epochs=200)
    fake_run(runs, "x2", "sam", 0.05, 0, 2.5, epochs=400)
    fake_run(runs, "x3", "sam", 0.05, 1, 2.9, epochs=400)
    text1 = write_report([str(runs)], str(tmp_path / "out"))
    md1 = (tmp_path / "out" / "summary.md").read_bytes()
    csv1 = (tmp_path / "out" / "summary.csv").read_bytes()
    write_report([str(runs)], str(tmp_path / "out"))
    assert (tmp_path / "out" / "summary.md").read_bytes() == md1
    assert (tmp_path / "out" / "summary.csv").read_bytes() == csv1
    assert "| t1 | cifar10 | wrn28_10 | sam | 0.05 | 200 | 2.70 | 1 | 0 |" in text1
    assert "| t1 | cifar10 | wrn28_10 | sam | 0.05 | 400 | 2.70 ± 0.28 | 2 | 0,1 |" in text1
    assert "data_root" not in text1  # paths never split groups
