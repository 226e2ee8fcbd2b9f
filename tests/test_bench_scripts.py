"""The benchmark scripts refuse bad arguments up front, time what the trainer runs, write their
JSON atomically; the paper and GPU-check scripts launch what they say (no GPU, seconds each)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


@pytest.fixture(scope="module")
def bench_sam():
    return load_script("bench_sam")


@pytest.fixture(scope="module")
def bench_data():
    return load_script("bench_data")


class Reached(Exception):
    """Raised by a stand-in for the benchmark itself: the arguments were not refused."""


def run_main(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()


# ----------------------------------------------------------------------------------- table8.sh (D3)

def test_table8_sweeps_every_rho_of_the_papers_table_8():
    """Table 8 has 7 rows, ρ = 0 (SGD) to 0.5: the held-out-split sweep runs each of them."""
    from sam_bench.report.paper import paper_tables

    paper = [float(r["rho"]) for r in paper_tables()["table_8"]["rows"]]
    assert len(paper) == 7 and paper[0] == 0.0
    env = {**os.environ, "DRY_RUN": "1", "SEEDS": "0", "PYTHON": "py"}
    env.pop("PRESETS", None)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "table8.sh")], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()
    train = [line for line in out if " train -m " in line]
    assert [re.search(r"experiment=paper/(\S+)", line).group(1) for line in train] == \
        [f"table4_resnet32_noise{n}_cifar10" for n in (20, 40, 60, 80)]
    for line in train:
        assert " dataset.val_size=5000 " in line
        grid = re.search(r"optimizer\.rho=(\S+)", line).group(1).split("\\,")
        assert [float(r) for r in grid] == paper, line
    assert out[-1].startswith("py -m sam_bench report ")


# ------------------------------------------------------------------------------- argument checks (D7, D8)

@pytest.mark.parametrize("argv,message", [
    (["--batch", "16", "--m", "5"], "--m 5: m must be >= 1 and divide every --batch (16)"),
    (["--batch", "16", "--m", "32"], "--m 32: m must be >= 1 and divide every --batch (16)"),
    (["--batch", "64,48", "--m", "32"], "--m 32: m must be >= 1 and divide every --batch (64,48)"),
    (["--m", "-1"], "--m -1: m must be >= 1"),
    (["--batch", "0", "--m", "0"], "--batch 0: every batch size must be >= 1"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--warmup", "-1"], "--warmup -1: must be >= 0"),
    (["--precision", "fp8"], "--precision fp8: a comma list of bf16,fp16,fp32"),
    (["--compile", "2"], "--compile 2: a comma list of 0,1"),
    (["--models", "wrn16_4,nosuch"], "--models wrn16_4,nosuch: nosuch is not a registered model; `sam-bench models` lists them"),
])
def test_bench_refuses_bad_arguments_before_running(bench, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(bench, "practical_peak", lambda device: (_ for _ in ()).throw(Reached()))
    with pytest.raises(SystemExit) as e:
        run_main(bench, argv, monkeypatch)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is accepted on CUDA")
def test_bench_refuses_fp16_without_cuda(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "practical_peak", lambda device: (_ for _ in ()).throw(Reached()))
    with pytest.raises(SystemExit) as e:
        run_main(bench, ["--precision", "fp16"], monkeypatch)
    assert e.value.code == 2 and "--precision fp16 needs CUDA" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--batch", "16", "--m", "8"], ["--batch", "16", "--m", "16"], ["--batch", "16", "--m", "0"],
                                  ["--batch", "64,32", "--m", "32", "--warmup", "0"]])
def test_bench_accepts_good_arguments(bench, monkeypatch, argv):
    monkeypatch.setattr(bench, "practical_peak", lambda device: (_ for _ in ()).throw(Reached()))
    with pytest.raises(Reached):
        run_main(bench, argv, monkeypatch)


@pytest.mark.parametrize("argv,message", [
    (["--cpu-batch", "16", "--cpu-m", "5"], "--cpu-m 5: m must be >= 1 and divide --cpu-batch 16"),
    (["--cpu-batch", "16", "--cpu-m", "32"], "--cpu-m 32: m must be >= 1 and divide --cpu-batch 16"),
    (["--cpu-m", "0"], "--cpu-m 0: m must be >= 1"),
    (["--gpu-batch", "100"], "--gpu-m 32: m must be >= 1 and divide --gpu-batch 100"),
    (["--cpu-batch", "0"], "--cpu-batch 0: must be >= 1"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--gpu-steps", "0"], "--gpu-steps 0: must be >= 1"),
    (["--warmup", "-1"], "--warmup -1: must be >= 0"),
])
def test_bench_sam_refuses_bad_arguments_before_running(bench_sam, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(bench_sam, "bench", lambda *a, **k: (_ for _ in ()).throw(Reached()))
    with pytest.raises(SystemExit) as e:
        run_main(bench_sam, argv + ["--variants", "sgd,sam,msam,msam_loop"], monkeypatch)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_sam_checks_m_only_for_the_variants_that_use_it(bench_sam, monkeypatch):
    monkeypatch.setattr(bench_sam, "bench", lambda *a, **k: (_ for _ in ()).throw(Reached()))
    with pytest.raises(Reached):
        run_main(bench_sam, ["--cpu-batch", "16", "--cpu-m", "5", "--variants", "sgd,sam"], monkeypatch)


def test_bench_data_refuses_bad_arguments(bench_data, monkeypatch, capsys):
    monkeypatch.setattr(bench_data, "loader_rate", lambda *a, **k: (_ for _ in ()).throw(Reached()))
    for argv, message in ((["--n", "64", "--batch", "128"], "--batch 128: must be >= 1 and at most --n 64"),
                          (["--n", "0"], "--n 0: must be >= 1"), (["--cpu-steps", "0"], "--cpu-steps 0: must be >= 1")):
        with pytest.raises(SystemExit) as e:
            run_main(bench_data, argv, monkeypatch)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_data_runs_with_fewer_images_than_the_torchvision_comparison():
    """--n below the 2000 images of the per-image torchvision figure: that figure takes the n there are."""
    proc = subprocess.run([sys.executable, "scripts/bench_data.py", "--n", "32", "--batch", "16", "--cpu-steps", "1",
                           "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torchvision AutoAugment per image" in proc.stdout


# ------------------------------------------------------------------------------------ this checkout (D9)

@pytest.mark.parametrize("script", ["bench.py", "bench_sam.py", "bench_data.py"])
def test_scripts_import_this_checkouts_sam_bench(tmp_path, script):
    """A sam_bench earlier on the path than the checkout (here a stand-in on PYTHONPATH, as an
    installed one would be) is not what the script measures."""
    shadow = tmp_path / "shadow" / "sam_bench"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the shadow sam_bench was imported, not the checkout')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------- bench.py's step (D10, D11)

def _spy_steps(bench, monkeypatch):
    seen = []

    def step(model, opt, x, y, loss_fn, amp, bn, rng, **kwargs):
        seen.append((opt, kwargs))
        return None, None

    monkeypatch.setattr(bench, "train_step", step)
    return seen


def test_bench_times_the_trainers_step_with_its_diagnostics(bench, monkeypatch):
    from sam_bench.schema import OptimizerConfig

    seen = _spy_steps(bench, monkeypatch)
    bench.time_ours("wrn_mini", 4, "fp32", False, 0.05, None, torch.device("cpu"), steps=1, warmup=0, pool=8, image=8)
    assert seen and all(opt.diagnostics is OptimizerConfig().diagnostics is True for opt, _ in seen)
    assert all(kw.get("scaler") is None for _, kw in seen)
    seen.clear()
    bench.time_ours("wrn_mini", 4, "fp32", False, 0.05, None, torch.device("cpu"), steps=1, warmup=0, pool=8, image=8,
                    diagnostics=False)
    assert seen and not any(opt.diagnostics for opt, _ in seen)


def test_bench_fp16_runs_with_the_trainers_loss_scaler(bench, monkeypatch):
    from sam_bench.engine.precision import LossScaler

    seen = _spy_steps(bench, monkeypatch)
    bench.time_ours("wrn_mini", 4, "fp16", False, 0.05, 2, torch.device("cpu"), steps=1, warmup=1, pool=8, image=8)
    assert len(seen) == 2 and all(isinstance(kw["scaler"], LossScaler) and kw["m"] == 2 for _, kw in seen)
    assert seen[0][1]["scaler"] is seen[1][1]["scaler"]  # one scaler across steps, as the trainer's


def _atomic_spy(module, monkeypatch):
    written = []
    real = module.atomic_write_json

    def spy(path, obj):
        written.append(Path(path))
        real(path, obj)

    monkeypatch.setattr(module, "atomic_write_json", spy)
    return written


def test_bench_writes_its_json_atomically_with_the_trainers_diagnostics(bench, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bench, "practical_peak", lambda device: (1e12, "fake"))
    monkeypatch.setattr(bench, "forward_flops", lambda *a: 1e6)

    def fake_time_ours(*args):
        calls.append(args)
        return {"step_ms": 10.0, "images_per_s": 1000.0, "peak_memory_mb": None}

    monkeypatch.setattr(bench, "time_ours", fake_time_ours)
    written = _atomic_spy(bench, monkeypatch)
    out = tmp_path / "bench.json"
    run_main(bench, ["--models", "wrn_mini", "--batch", "8", "--m", "4", "--reference", "0", "--out", str(out)], monkeypatch)
    assert written == [out]
    data = json.loads(out.read_text())
    assert data["diagnostics"] is True and {r["optimizer"] for r in data["rows"]} == {"sgd", "sam", "m-sam (m=4)"}
    assert [c[-1] for c in calls] == [True, True, True]  # diagnostics, the trainer's default
    assert not [p for p in tmp_path.iterdir() if p.name != "bench.json"]  # no temporary left


def test_bench_sam_writes_its_json_atomically(bench_sam, monkeypatch, tmp_path):
    monkeypatch.setattr(bench_sam, "bench", lambda label, *a, **k: {"label": label, "ms_per_step": {"sgd": 1.0}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    written = _atomic_spy(bench_sam, monkeypatch)
    out = tmp_path / "b.json"
    run_main(bench_sam, ["--variants", "sgd", "--out", str(out)], monkeypatch)
    assert written == [out] and json.loads(out.read_text())["runs"][0]["label"] == "cpu"


# -------------------------------------------------------------------------------------- msam_loop (D7)

def test_msam_loop_averages_over_the_batch_whatever_its_last_chunk(bench_sam):
    """With ρ = 0 every chunk's perturbed gradient is its clean one: the step must be the
    full-batch gradient step, the chunks weighted by their size (6 = 4 + 2 here)."""
    from sam_bench.optim import SAM

    def step(m):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=1.0)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g)
        bench_sam.loop_over_chunks_step(model, opt, x, y, torch.nn.functional.cross_entropy, contextlib.nullcontext, m)
        return [p.detach().clone() for p in model.parameters()]

    whole, chunked, equal = step(6), step(4), step(3)
    for a, b, c in zip(whole, chunked, equal):
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(c, a)


# ---------------------------------------------------------------------------------------- help (D16)

def _parser_of(module, monkeypatch) -> argparse.ArgumentParser:
    def capture(self, *a, **k):
        raise Reached(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [module.__file__])
    with pytest.raises(Reached) as e:
        module.main()
    return e.value.args[0]


@pytest.mark.parametrize("name", ["bench", "bench_sam", "bench_data"])
def test_every_option_of_the_benchmarks_says_what_it_does(name, monkeypatch):
    parser = _parser_of(load_script(name), monkeypatch)
    assert [a.option_strings for a in parser._actions if not a.help] == []


def test_bench_sam_help_says_what_cuda_runs(bench_sam, monkeypatch):
    parser = _parser_of(bench_sam, monkeypatch)
    helps = {a.dest: a.help for a in parser._actions}
    assert "--gpu-steps" in helps["steps"]
    assert f"on CUDA at least {bench_sam.GPU_MIN_WARMUP}" in helps["warmup"]
    assert "--cpu-batch" in bench_sam.__doc__ and "--batch " not in bench_sam.__doc__


def test_bench_data_usage_line_names_every_option(bench_data, monkeypatch):
    parser = _parser_of(bench_data, monkeypatch)
    usage = next(line for line in bench_data.__doc__.splitlines() if "scripts/bench_data.py" in line)
    options = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    assert options == set(re.findall(r"\[(--[\w-]+)", usage))


def test_bench_help_lists_the_accepted_precisions(bench, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_main(bench, ["--help"], monkeypatch)
    assert "bf16,fp16,fp32" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------------------------ gpu_check.sh (D12)

def _known_stages(script: str) -> list[str]:
    return re.search(r'^KNOWN_STAGES="([^"]*)"', script, re.M).group(1).split()


@pytest.mark.parametrize("stages", ["fmnist_sgd_vs_sam", "gpu_tests bogus"])
def test_gpu_check_refuses_an_unknown_stage_before_anything_runs(tmp_path, stages):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "STAGES": stages, "OUT": str(out)})
    assert proc.returncode == 2
    bad = stages.split()[-1]
    assert f"unknown stage '{bad}' in STAGES; known stages: gpu_tests bench_sam " in proc.stderr
    assert not out.exists() and proc.stdout == ""


def test_gpu_check_knows_every_stage_it_runs_and_counts_its_files_right():
    """KNOWN_STAGES is every `want` name; the header's file counts hold (summary.log, a log per
    stage run, the JSON a stage writes under $OUT)."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    known = _known_stages(script)
    assert sorted(set(re.findall(r"\bwant (\w+)", script))) == sorted(known)
    files, stage_of_block = {}, None
    for line in script.splitlines():
        if line.lstrip().startswith("#"):
            continue
        asked = re.search(r"want (\w+)", line)
        if asked or "GPU_CHECK_WRN" in line:
            stage_of_block = asked.group(1) if asked else "bench_wrn"
        for log in re.findall(r"(?:^|&&)\s*stage (\w+) (?:\d+|\$\{\w+:-\d+\}) ", line):  # a stage run: its log
            files.setdefault(stage_of_block, set()).add(f"{log}.log")
        for name in re.findall(r'"\$OUT/([\w.]+)"', line):
            files.setdefault(stage_of_block, set()).add(name)
    defaults = re.search(r'STAGES=\$\{STAGES:-([^}]*)\}', script).group(1).split()
    count = lambda stages: 1 + sum(len(files.get(s, ())) for s in stages)  # noqa: E731  (1: summary.log)
    header = re.search(r"# (\d+) files with the default stages, (\d+) with every stage and GPU_CHECK_WRN=1", script)
    assert (count(defaults), count([*known, "bench_wrn"])) == (int(header.group(1)), int(header.group(2)))
    readme = (ROOT / "README.md").read_text()
    assert f"({header.group(1)} files with the default stages, {header.group(2)} with every stage" in readme
    assert "at most 8 files" not in readme
