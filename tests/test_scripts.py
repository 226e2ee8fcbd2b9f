"""The benchmark and GPU-check scripts still run (figures are not checked: a benchmark is not a test)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_sam_writes_every_variant_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_sam.py", "--cpu-arch", "wrn_mini", "--cpu-batch", "8", "--cpu-m", "4",
         "--steps", "1", "--warmup", "0", "--variants", "sgd,sam,msam,msam_vmap,sam_k2,msam_k2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads(out.read_text())["runs"][0]
    assert run["errors"] == {}
    assert set(run["ms_per_step"]) == set(run["first_step_s"]) == {"sgd", "sam", "msam", "msam_vmap", "sam_k2", "msam_k2"}
    assert all(s > 0 for s in run["first_step_s"].values())
    assert run["compile"] is None and run["sam_over_sgd"] > 0 and run["msam_over_sam"] > 0 and run["msam_k2_over_sam_k2"] > 0
    assert "m-SAM/SAM" in proc.stdout


def test_gpu_check_default_stages_fit_in_eight_minutes():
    """Issue 7: the GPU tests and the benchmarks in under 8 minutes; every default stage has a time
    limit, and the limits add up to less than that."""
    script = (ROOT / "scripts/gpu_check.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "scripts/gpu_check.sh")], check=True)
    defaults = re.search(r'STAGES=\$\{STAGES:-([^}]*)\}', script).group(1).split()
    limits = {}
    for name, secs in re.findall(r"want (\w+) && stage \w+ (\S+)", script):
        limits[name] = int(re.sub(r"\$\{\w+:-(\d+)\}", r"\1", secs))
    assert set(defaults) <= set(limits), (defaults, limits)
    assert sum(limits[s] for s in defaults) <= 480, {s: limits[s] for s in defaults}
