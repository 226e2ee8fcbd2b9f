"""Step time of SGD, SAM, m-SAM and ASAM (the training step of sam_bench, nothing else).

CPU: WRN-16-4, fp32 (slow: keep --steps/--batch small). CUDA (when present): WRN-28-10, bf16
autocast, channels_last. Prints ms/step, SAM/SGD and m-SAM/SAM ratios; --out writes JSON.

    python scripts/bench_sam.py --cpu-batch 64 --cpu-m 8 --steps 3 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sam_bench first

import torch
import torch.nn as nn
from omegaconf import OmegaConf

# noqa: E402 below: imports after the sys.path line on purpose

from sam_bench.engine.precision import autocast
from sam_bench.engine.step import train_step
from sam_bench.models import build_model
from sam_bench.optim import batchnorm_modules, build_optimizer
from sam_bench.schema import OptimizerConfig

VARIANTS = {
    "sgd": dict(name="sgd", rho=0.0),
    "sam": dict(name="sam", rho=0.05),
    "msam": dict(name="sam", rho=0.05),  # m from the command line
    "asam": dict(name="sam", rho=0.5, adaptive=True, eta=0.01),
}


def time_variant(arch: str, variant: str, device: torch.device, precision: str, batch: int, m: int | None,
                 steps: int, warmup: int, diagnostics: bool) -> list[float]:
    """Seconds per step for ``steps`` timed steps after ``warmup`` (device-synchronised)."""
    torch.manual_seed(0)
    model = build_model(arch, 10, 3).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    cfg = OmegaConf.structured(OptimizerConfig(**VARIANTS[variant], diagnostics=diagnostics))
    opt = build_optimizer(cfg, model)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    bn = batchnorm_modules(model)
    loss_fn = nn.CrossEntropyLoss()
    amp = lambda: autocast(device, precision)  # noqa: E731
    chunk = m if variant == "msam" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        train_step(model, opt, x, y, loss_fn, amp, bn, None, m=chunk)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def bench(label: str, arch: str, device: torch.device, precision: str, batch: int, m: int, steps: int, warmup: int,
          diagnostics: bool) -> dict:
    out = {"label": label, "arch": arch, "device": str(device), "precision": precision, "batch": batch, "m": m,
           "steps": steps, "diagnostics": diagnostics,
           "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "ms_per_step": {}}
    for variant in VARIANTS:
        t = time_variant(arch, variant, device, precision, batch, m, steps, warmup, diagnostics)
        out["ms_per_step"][variant] = 1e3 * statistics.median(t)
        print(f"{label:>6} {arch:>10} {variant:>5}: {out['ms_per_step'][variant]:9.1f} ms/step (median of {len(t)})", flush=True)
    ms = out["ms_per_step"]
    out["sam_over_sgd"] = ms["sam"] / ms["sgd"]
    out["msam_over_sam"] = ms["msam"] / ms["sam"]
    out["asam_over_sam"] = ms["asam"] / ms["sam"]
    print(f"{label:>6} SAM/SGD {out['sam_over_sgd']:.3f}   m-SAM/SAM {out['msam_over_sam']:.3f} (m={m} of {batch})"
          f"   ASAM/SAM {out['asam_over_sam']:.3f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cpu-batch", type=int, default=256)
    p.add_argument("--cpu-m", type=int, default=32)
    p.add_argument("--cpu-arch", default="wrn16_4")
    p.add_argument("--gpu-batch", type=int, default=256)
    p.add_argument("--gpu-m", type=int, default=32)
    p.add_argument("--gpu-arch", default="wrn28_10")
    p.add_argument("--gpu-steps", type=int, default=20)
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU benchmark")
    p.add_argument("--no-diagnostics", action="store_true", help="time without the SAM diagnostics")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    diag = not args.no_diagnostics
    results = {"torch": torch.__version__, "runs": []}
    if not args.no_cpu:
        results["runs"].append(bench("cpu", args.cpu_arch, torch.device("cpu"), "fp32", args.cpu_batch, args.cpu_m,
                                     args.steps, args.warmup, diag))
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        results["runs"].append(bench("cuda", args.gpu_arch, torch.device("cuda"), "bf16", args.gpu_batch, args.gpu_m,
                                     args.gpu_steps, max(args.warmup, 3), diag))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
