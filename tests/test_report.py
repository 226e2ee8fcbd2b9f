"""The reporter on a synthetic tree of runs: grouping, mean ± std, incomplete runs, stability."""

import json
import statistics

import pytest

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
    assert csv1.decode().splitlines() == [  # the statistics as numbers, each in a column of its own
        "experiment,dataset,model,optimizer,rho,epochs,test_error_mean,test_error_std,n,seeds",
        "t1,cifar10,wrn28_10,sam,0.05,200,2.7000,,1,0",
        f't1,cifar10,wrn28_10,sam,0.05,400,2.7000,{statistics.stdev([2.5, 2.9]):.4f},2,"0,1"',
    ]


def test_a_result_without_config_or_seed_is_listed_with_the_reason_and_the_rest_reported(tmp_path):
    fake_run(tmp_path, "good", "sgd", 0.0, 0, 3.0)
    for missing in ("config", "seed"):
        d = fake_run(tmp_path, f"no_{missing}", "sgd", 0.0, 1, 3.5)
        r = json.loads((d / "result.json").read_text())
        del r[missing]
        (d / "result.json").write_text(json.dumps(r))
    results, incomplete = find_runs([str(tmp_path)])
    assert [r["seed"] for r in results] == [0]
    assert sorted(incomplete) == [str(tmp_path / "no_config"), str(tmp_path / "no_seed")]
    text = write_report([str(tmp_path)], str(tmp_path / "out"))
    assert "| t1 | cifar10 | wrn28_10 | sgd | 0 | 200 | 3.00 | 1 | 0 |" in text
    assert f"- {tmp_path / 'no_config'} (result.json lacks config)" in text
    assert f"- {tmp_path / 'no_seed'} (result.json lacks seed)" in text


def test_bad_roots_are_warned_about_and_incomplete_runs_say_why(tmp_path, caplog):
    runs = tmp_path / "runs"
    fake_run(runs, "good", "sgd", 0.0, 0, 3.0)
    fake_run(runs, "nan", "sgd", 0.0, 1, float("nan"))
    (fake_run(runs, "corrupt", "sgd", 0.0, 2, 3.0) / "result.json").write_text("{not json")
    fake_run(runs, "running", "sgd", 0.0, 3, 3.0, status="running")
    fake_run(runs, "unfinished", "sgd", 0.0, 4, 3.0, status=None)
    (tmp_path / "afile").write_text("x")
    with caplog.at_level("WARNING"):
        text = write_report([str(runs), str(tmp_path / "runz"), str(tmp_path / "afile")], str(tmp_path / "out"))
    assert f"Warning: run root {tmp_path / 'runz'} does not exist: skipped (check runs=[...])." in text
    assert f"Warning: run root {tmp_path / 'afile'} is not a directory: skipped (check runs=[...])." in text
    assert f"run root {tmp_path / 'runz'} does not exist" in caplog.text
    assert f"- {runs / 'nan'} (final_test_error is nan, not a finite number)" in text
    assert f"- {runs / 'corrupt'} (result.json unreadable (JSONDecodeError: " in text
    assert f"- {runs / 'running'} (status 'running', not 'complete')" in text
    assert f"- {runs / 'unfinished'} (no result.json: not finished)" in text


def test_overlapping_roots_list_each_run_once(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "good", "sgd", 0.0, 0, 3.0)
    fake_run(runs, "crashed", "sgd", 0.0, 1, None, status=None)
    (tmp_path / "x").mkdir()
    results, incomplete = find_runs([str(runs), str(tmp_path / "x" / ".." / "runs"), str(runs / "crashed")])
    assert len(results) == 1 and incomplete == [str(runs / "crashed")]


def test_optimizer_diagnostics_do_not_split_a_group(tmp_path):
    """diagnostics only read the gradients and ε into accumulators (sam.py, msam.py): same update."""
    for seed, diagnostics in ((0, True), (1, False)):
        d = fake_run(tmp_path, f"s{seed}", "sam", 0.05, seed, 2.5 + seed)
        r = json.loads((d / "result.json").read_text())
        r["config"]["optimizer"]["diagnostics"] = diagnostics
        (d / "result.json").write_text(json.dumps(r))
    (group,) = group_runs(find_runs([str(tmp_path)])[0])
    assert group.seeds == [0, 1]


def test_damaged_results_are_listed_with_the_reason_not_a_crash(tmp_path):
    """Hand-damaged result.json files (failure injection, QA): each is skipped with its reason, the
    rest reported. Before: TypeError on a null finished_at beside a run of the same seed, and
    AttributeError/TypeError in the grouping on a string config.optimizer or compute_version."""
    fake_run(tmp_path, "good", "sgd", 0.0, 0, 3.0)
    damage = {
        "null_finished": (lambda r: r.update(finished_at=None), "result.json: finished_at is None, not a time"),
        "optimizer_str": (lambda r: r["config"].update(optimizer="sam"), "result.json: config.optimizer is 'sam', not a mapping"),
        "version_str": (lambda r: r.update(compute_version="4"), "result.json: compute_version is '4', not an integer"),
        "version_float": (lambda r: r.update(compute_version=3.5), "result.json: compute_version is 3.5, not an integer"),
        "rho_str": (lambda r: r["config"]["optimizer"].update(name="sam", rho="abc"),
                    "result.json: its config cannot be read (ValueError: could not convert string to float: 'abc')"),
        "time_str": (lambda r: r.update(train_time_s="long"), "result.json: train_time_s is 'long', not a number"),
    }
    for name, (edit, _) in damage.items():
        d = fake_run(tmp_path, name, "sgd", 0.0, 0, 3.5)
        r = json.loads((d / "result.json").read_text())
        edit(r)
        (d / "result.json").write_text(json.dumps(r))
    results, incomplete = find_runs([str(tmp_path)])
    assert [r["run_dir"] for r in results] == [str(tmp_path / "good")]
    text = write_report([str(tmp_path)], str(tmp_path / "out"))
    assert "| t1 | cifar10 | wrn28_10 | sgd | 0 | 200 | 3.00 | 1 | 0 |" in text
    for name, (_, why) in damage.items():
        assert f"- {tmp_path / name} ({why})" in text, name


def test_the_default_roots_pass_over_a_missing_one(tmp_path):
    """With the default runs=[runs,multirun] a missing root is no typo (the quick start only sweeps)."""
    fake_run(tmp_path / "multirun", "good", "sgd", 0.0, 0, 3.0)
    roots = [str(tmp_path / "runs"), str(tmp_path / "multirun")]
    assert "Warning" not in write_report(roots, str(tmp_path / "out"), default_roots=True)
    assert f"Warning: run root {tmp_path / 'runs'} does not exist" in write_report(roots, str(tmp_path / "out"))


def test_an_unwritable_report_directory_is_a_config_error(tmp_path, monkeypatch):
    """An existing out= directory that takes no file (a read-only file system) ended in an OSError
    traceback: only mkdir was checked."""
    import errno

    import pytest

    from sam_bench import report
    from sam_bench.errors import ConfigError

    fake_run(tmp_path / "runs", "good", "sgd", 0.0, 0, 3.0)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(report, "atomic_write_bytes", read_only)
    with pytest.raises(ConfigError, match=r"cannot write the report file .*summary.md \(.*Read-only file system\); pass a writable"):
        write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    monkeypatch.setattr("tempfile.TemporaryFile", read_only)  # found before any file is written
    with pytest.raises(ConfigError, match=r"cannot write the report into out=.*Read-only file system\); pass a writable out=DIR"):
        write_report([str(tmp_path / "runs")], str(tmp_path / "out"))


def test_an_empty_out_is_refused_before_anything_is_written(tmp_path):
    """`out=` wrote the report into the current directory (the checkout's README.md replaced)."""
    import pytest

    from sam_bench.errors import ConfigError

    fake_run(tmp_path / "runs", "good", "sgd", 0.0, 0, 3.0)
    for out in ("", "  ", None):
        with pytest.raises(ConfigError, match=r"^out is empty: .*give a directory, e\.g\. out=results$"):
            write_report([str(tmp_path / "runs")], out)


def test_an_out_dir_holding_files_the_reporter_did_not_write_is_refused_untouched(tmp_path):
    """`out=.` in a checkout replaced its README.md with the report's index: a file the report would
    replace that it did not write is refused, and nothing is written or deleted."""
    import pytest

    from sam_bench.errors import ConfigError

    fake_run(tmp_path / "runs", "good", "sgd", 0.0, 0, 3.0)
    foreign = {"README.md": "# My project\n", "table1.md": "# Table 1 of my thesis\n", "summary.csv": "a,b\n1,2\n",
               "sweeps.md": "# ρ sweeps\n\nMy notes.\n"}  # our title, yet not our file
    for name, text in foreign.items():
        out = tmp_path / f"out_{name}"
        out.mkdir()
        (out / name).write_text(text)
        (out / "sweep_mine.png").write_bytes(b"\x89PNG mine")  # linked from a sweeps.md: ours only if that is ours
        with pytest.raises(ConfigError, match=rf"^out={out} holds {name}, which sam-bench report did not write"):
            write_report([str(tmp_path / "runs")], str(out))
        assert sorted(p.name for p in out.iterdir()) == sorted([name, "sweep_mine.png"]) and (out / name).read_text() == text
    out = tmp_path / "out_tb"  # a TensorBoard log directory of someone else's: tensorboard=true would remove it
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    write_report([str(tmp_path / "runs")], str(out))  # without tensorboard=true it is left alone
    with pytest.raises(ConfigError, match=r"holds tensorboard/, which sam-bench report did not write"):
        write_report([str(tmp_path / "runs")], str(out), tensorboard=True)
    assert (out / "tensorboard" / "events.out.tfevents.1").read_bytes() == b"x"


def test_a_directory_the_reporter_wrote_is_rewritten_and_others_files_beside_it_kept(tmp_path):
    """The committed results/ (written by the reporter, beside benchmarks.md and cpu/ of others) stays
    a valid out: recognised by content, as outdir.py says."""
    import shutil
    from pathlib import Path

    fake_run(tmp_path / "runs", "good", "sgd", 0.0, 0, 3.0)
    out = tmp_path / "results"
    shutil.copytree(Path(__file__).resolve().parents[1] / "results", out)
    others = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and (p.name == "benchmarks.md" or "cpu" in p.parts)}
    text = write_report([str(tmp_path / "runs")], str(out))
    assert "| t1 | cifar10 | wrn28_10 | sgd | 0 | 200 | 3.00 | 1 | 0 |" in text
    assert (out / "README.md").read_text().startswith("# Results\n\nRegenerated by `sam-bench report`")
    assert others and all(p.read_bytes() == data for p, data in others.items())
    write_report([str(tmp_path / "runs")], str(out))  # and again, over its own files


@pytest.mark.slow
def test_cli_report_refuses_an_empty_out_and_a_checkout_root(tmp_path, cli_env):
    """One line, exit 2, the directory's README.md untouched (QA: `out=` and `out=.`)."""
    import subprocess
    import sys

    fake_run(tmp_path / "runs", "good", "sgd", 0.0, 0, 3.0)
    (tmp_path / "README.md").write_text("# my repo\n")
    for out, why in (("", "out is empty: "), (".", "out=. holds README.md, which sam-bench report did not write")):
        proc = subprocess.run([sys.executable, "-m", "sam_bench", "report", f"runs=[{tmp_path / 'runs'}]", f"out={out}"],
                              capture_output=True, text=True, env=cli_env, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith(f"sam-bench: error: {why}"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "runs"]
    assert (tmp_path / "README.md").read_text() == "# my repo\n"


def test_overlapping_roots_list_each_spectrum_once(tmp_path):
    """runs=[a,a] or runs=[a,a/run] listed every hessian_*.json once per root, counted them twice in
    the README's index, and averaged a file without a training seed in twice."""
    from sam_bench.report.spectra import find_spectra

    run = fake_run(tmp_path / "runs", "sam_s0", "sam", 0.05, 0, 3.0)
    (run / "hessian_checkpoint.json").write_text(json.dumps({"arch": "wrn40_10_nobn", "dataset": "cifar10", "optimizer": "sam",
                                                            "rho": 0.05, "epoch": 1, "eigenvalues": [20.0, 2.0],
                                                            "lambda_max": 20.0}))
    roots = [str(tmp_path / "runs"), str(tmp_path / "runs"), str(run)]
    assert [s["path"] for s in find_spectra(roots)] == [str(run / "hessian_checkpoint.json")]
    write_report(roots, str(tmp_path / "out"))
    assert "- [Hessian spectra, Fig. 3 left](hessian.md): 1 spectra" in (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "hessian.md").read_text().count("hessian_checkpoint.json") == 1


def test_an_out_inside_a_run_directory_is_refused_before_anything_is_written(tmp_path):
    """out=<a run directory> wrote the report's 28 files among the run's own (deleting the run to
    retry it, as a diverged run asks, then deleted the report)."""
    from sam_bench.errors import ConfigError

    run = fake_run(tmp_path / "runs", "good", "sgd", 0.0, 0, 3.0)
    before = sorted(p.name for p in run.iterdir())
    for out in (run, run / "report"):
        with pytest.raises(ConfigError, match=rf"^out={out} is inside the run directory {run} \(it holds result.json\): .*"
                                              r"pass out=DIR outside the run directories, e\.g\. out=results$"):
            write_report([str(tmp_path / "runs")], str(out))
    assert sorted(p.name for p in run.iterdir()) == before
    write_report([str(tmp_path / "runs")], str(tmp_path / "runs" / "report"))  # beside the runs, in their root: allowed


def test_an_out_that_is_a_file_is_named_as_such(tmp_path):
    """out=<a file> said "cannot write ... ([Errno 17] File exists: ...)": the file is named a file."""
    from sam_bench.errors import ConfigError

    fake_run(tmp_path / "runs", "good", "sgd", 0.0, 0, 3.0)
    (tmp_path / "notes.txt").write_text("mine\n")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "sub"):
        with pytest.raises(ConfigError, match=rf"^out={out} is not a directory: {tmp_path / 'notes.txt'} is a file; "
                                              r"pass out=DIR \(a directory, or a path to create\)$"):
            write_report([str(tmp_path / "runs")], str(out))
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_a_run_root_without_runs_is_warned_about_unless_it_is_a_default(tmp_path, caplog):
    """runs=[multirun,multirun_old] with the second one empty (a typo'd sweep dir) said nothing: its
    runs were silently missing from every mean."""
    fake_run(tmp_path / "runs", "good", "sgd", 0.0, 0, 3.0)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    roots = [str(tmp_path / "runs"), str(tmp_path / "empty")]
    warning = (f"Warning: run root {tmp_path / 'empty'} holds no run directory (no result.json, checkpoint.pt or "
               ".hydra/config.yaml under it): skipped (check runs=[...]).")
    with caplog.at_level("WARNING"):
        assert warning in write_report(roots, str(tmp_path / "out"))
    assert f"run root {tmp_path / 'empty'} holds no run directory" in caplog.text
    assert "holds no run directory" not in write_report(roots, str(tmp_path / "out"), default_roots=True)


def test_an_empty_runs_list_is_named_as_such(tmp_path):
    """runs=[] said "none of the run roots [] is a directory"."""
    from sam_bench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^runs=\[\] names no run root; pass runs=\[DIR,...\] with the directories your runs went to$"):
        write_report([], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_unfinished_run_says_how_far_it_got(tmp_path):
    """A run killed at epoch 4 of 50 and one that has not finished an epoch both said only "not
    finished": the epochs its metrics.jsonl holds and its config's trainer.epochs are named."""
    runs = tmp_path / "runs"
    for name, epochs_done in (("killed", 4), ("started", 0)):
        d = fake_run(runs, name, "sgd", 0.0, 0, None, status=None)
        (d / ".hydra" / "config.yaml").write_text("seed: 0\ntrainer:\n  epochs: 50\n")
        if epochs_done:
            (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "test_error": 50.0}) + "\n"
                                                     for e in range(1, epochs_done + 1)))
    fake_run(runs, "good", "sgd", 0.0, 1, 3.0)
    text = write_report([str(runs)], str(tmp_path / "out"))
    assert f"- {runs / 'killed'} (no result.json: not finished; 4 of 50 epochs done)" in text
    assert f"- {runs / 'started'} (no result.json: not finished; 0 of 50 epochs done)" in text


def test_the_missing_validation_hint_fits_any_dataset(tmp_path):
    """sweeps.md told a sweep on 128 synthetic images to run with dataset.val_size=5000 (CIFAR's 10 %)."""
    for seed, rho in enumerate((0.02, 0.05)):
        fake_run(tmp_path / "runs", f"r{rho}", "sam", rho, 0, 3.0 + seed)
    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    md = (tmp_path / "out" / "sweeps.md").read_text()
    assert ("No ρ marked for sam: not every point recorded `final_val_error` (run with dataset.val_size=N: the paper holds "
            "out 10 % of the training set, 5000 images on CIFAR).") in md


def test_a_sweep_names_its_points_that_failed_or_did_not_finish(tmp_path):
    """A ρ grid whose largest ρ diverged showed the other ρ only: the failed point vanished from
    sweeps.md without a word (summary.md listed it, far from the sweep)."""
    runs = tmp_path / "runs"
    for rho in (0.02, 0.05):
        fake_run(runs, f"sam_{rho}", "sam", rho, 0, 3.0)
    fake_run(runs, "sgd", "sgd", 0.0, 0, 3.5)
    for name, optimizer, rho, seed in (("sam_big", "sam", 5.0, 0), ("sgd_s1", "sgd", 0.05, 1)):  # both unfinished
        d = fake_run(runs, name, optimizer, rho, seed, None, status=None)
        config = {**json.loads((runs / "sam_0.02" / "result.json").read_text())["config"], "seed": seed}
        config["optimizer"] = {"name": optimizer, "rho": rho}
        (d / ".hydra" / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    other = fake_run(runs, "other_model", "sam", 5.0, 0, None, status=None)  # another experiment: not this sweep's
    (other / ".hydra" / "config.yaml").write_text(json.dumps({**config, "model": {"arch": "resnet18", "kwargs": {}}}))
    write_report([str(runs)], str(tmp_path / "out"))
    md = (tmp_path / "out" / "sweeps.md").read_text()
    assert ("Not averaged here (unfinished or failed; see summary.md):\n"
            f"- sam ρ=5 seed 0: {runs / 'sam_big'} (no result.json: not finished; 0 of 200 epochs done)\n"
            f"- sgd ρ=0 seed 1: {runs / 'sgd_s1'} (no result.json: not finished; 0 of 200 epochs done)\n") in md
    assert "other_model" not in md


def test_a_tilde_in_runs_or_out_is_the_home_directory(tmp_path, monkeypatch):
    """The shell expands no ~ inside runs=[~/multirun] (nor after out= under sh): the root was said not
    to exist, and out=~/results made a directory named ~ in the current one."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    fake_run(tmp_path / "runs", "good", "sgd", 0.0, 0, 3.0)
    text = write_report(["~/runs"], "~/out")
    assert "| 3.00 | 1 | 0 |" in text and "Warning" not in text
    assert (tmp_path / "out" / "summary.md").is_file() and not (tmp_path / "cwd" / "~").exists()


def test_the_summary_says_how_many_runs_repeat_a_seed_it_already_counts(tmp_path):
    """Two runs of one config and seed (SGD in a ρ sweep, a re-run) are one seed in n; the other was
    left out without a word, and a re-run with another error silently replaced the first."""
    for rho in (0.02, 0.05, 0.1):  # SGD of a three-ρ sweep: one run per ρ, seed 0
        fake_run(tmp_path / "runs", f"sgd_{rho}", "sgd", rho, 0, 3.0)
    text = write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    assert "| 3.00 | 1 | 0 |" in text
    assert ("\nn counts a seed once: 2 more runs repeat the config and seed of a row (SGD in a ρ sweep trains once per ρ; "
            "a re-run); of each seed the one finished last is averaged.\n") in text
    one = tmp_path / "one"
    fake_run(one, "a", "sgd", 0.0, 0, 3.0)
    assert "n counts a seed once" not in write_report([str(one)], str(tmp_path / "out"))
