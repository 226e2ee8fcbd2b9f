"""Step time of SGD, SAM, m-SAM and ASAM (the training step of sam_bench, nothing else).

CPU: WRN-16-4, fp32, --steps timed steps (slow: keep --steps/--cpu-batch small). CUDA (when
present): WRN-28-10, bf16 autocast, channels_last, --gpu-steps timed steps after max(--warmup, 3)
warm-up steps. Prints ms/step, SAM/SGD and m-SAM/SAM ratios; --out writes JSON.
m-SAM variants: "msam" is what the trainer runs (engine "auto"), "msam_split" and "msam_vmap" force
an engine of sam_bench.optim.msam, "msam_il" is vmap with the interleaved layout, and "msam_loop" the
naive alternative: a Python loop over the chunks, each a plain SAM ascent + perturbed backward on m
examples (same FLOPs). "sam_k2" and "msam_k2": two ascent steps (Table 11's k = 2), on the whole
batch and per chunk of m (an extra pass each; in m-SAM's every kernel runs per chunk).
"sam_graphed" and "msam_graphed" (CUDA only; split engine): the whole step captured once in a CUDA
graph and replayed, to see what the step costs without its host work (an experiment, not a
trainer option; the "first step" they report is a replay, capture happens before).
A variant that fails is reported with its error and the others still run.
--compile times every variant with the model under ``torch.compile`` (as ``trainer.compile=true``):
SGD, SAM, ASAM and the split m-SAM engine run compiled graphs; the vmap engine runs eagerly.
Other models: any registered ``--cpu-arch``/``--gpu-arch`` with ``--image-size``/``--num-classes``
(e.g. the ResNet-50 SAM step at 224 px, profiled: ``--gpu-arch resnet50 --image-size 224
--num-classes 1000 --variants sgd,sam --profile sgd,sam``; gpu_check.sh stage ``profile_resnet50``).

    python scripts/bench_sam.py --cpu-batch 64 --cpu-m 8 --steps 3 --out bench.json
"""

from __future__ import annotations

import argparse
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
from sam_bench.engine.trainer import compile_model
from sam_bench.models import build_model
from sam_bench.optim import batchnorm_modules, build_optimizer
from sam_bench.schema import COMPILE_MODES, OptimizerConfig
from sam_bench.tracking.results import atomic_write_json

VARIANTS = {
    "sgd": dict(name="sgd", rho=0.0),
    "sam": dict(name="sam", rho=0.05),
    "msam": dict(name="sam", rho=0.05),  # m from the command line; the trainer's engine ("auto")
    "asam": dict(name="sam", rho=0.5, adaptive=True, eta=0.01),
    "msam_loop": dict(name="sam", rho=0.05),
    "msam_split": dict(name="sam", rho=0.05),
    "msam_vmap": dict(name="sam", rho=0.05),
    "msam_il": dict(name="sam", rho=0.05),
    "sam_k2": dict(name="sam", rho=0.05, ascent_steps=2),  # Table 11, k = 2, on the whole batch
    "msam_k2": dict(name="sam", rho=0.05, ascent_steps=2),  # and per chunk of m (the trainer's engine)
    "sam_graphed": dict(name="sam", rho=0.05),  # the whole step replayed from one CUDA graph (CUDA only)
    "msam_graphed": dict(name="sam", rho=0.05),  # the same for the split m-SAM engine
}
#: variants whose step is captured once in a CUDA graph and replayed (:func:`_graphed`)
GRAPHED = ("sam_graphed", "msam_graphed")
#: m-SAM variants -> (engine, layout): train_step's m_engine and m_layout (sam_bench.optim.msam.msam_step)
MSAM_SETTINGS = {"msam": ("auto", "nchw"), "msam_split": ("split", "nchw"), "msam_vmap": ("vmap", "nchw"),
                 "msam_il": ("vmap", "interleaved"), "msam_k2": ("auto", "nchw"), "msam_graphed": ("split", "nchw")}


def loop_over_chunks_step(model, opt, x, y, loss_fn, amp, m):
    """m-sharpness the slow way: for each chunk, ascent from its own gradient, perturbed backward,
    weights restored; the chunk gradients are averaged (weighted by chunk size: the mean over the
    batch, whatever its last chunk) and applied once."""
    params = [p for p, _ in opt.trainable()]
    acc = [torch.zeros_like(p) for p in params]
    for xc, yc in zip(x.split(m), y.split(m)):
        weight = xc.shape[0] / x.shape[0]
        with amp():
            loss = loss_fn(model(xc), yc)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
        with torch.no_grad():
            scale = opt.defaults["rho"] / (torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) + 1e-12)
            eps = torch._foreach_mul(grads, scale)
            torch._foreach_add_(params, eps)
        with amp():
            loss = loss_fn(model(xc), yc)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            torch._foreach_sub_(params, eps)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g, alpha=weight)
    for p, a in zip(params, acc):
        p.grad = a
    opt.base_optimizer.step()
    opt.zero_grad()


def profile_step(step, device: torch.device) -> None:
    """Two warm-up steps, then the kernels of one step by device time (top 25)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)


#: --mark-step: call ``torch.compiler.cudagraph_mark_step_begin()`` before every step, telling CUDA
#: graph trees (compile mode reduce-overhead) that a new iteration begins, so that they may reuse the
#: memory of the last step's outputs instead of recording around tensors still alive.
MARK_STEP = False


def _marking_step_begin(step):
    def marked():
        torch.compiler.cudagraph_mark_step_begin()
        step()
    return marked


def _graphed(step):
    """The replay of one whole training step captured in a CUDA graph: the step's host work (Python,
    dispatch, kernel launches) is paid once, at capture. An experiment for the host-bound m-SAM
    step: a SAM step has no host sync, so it can be captured, and the batch stays in the same
    tensors. Three eager warm-up steps on a side stream first (cuDNN autotuning, optimizer state),
    as ``torch.cuda.graph`` requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_variant(arch: str, variant: str, device: torch.device, precision: str, batch: int, m: int | None,
                 steps: int, warmup: int, diagnostics: bool, profile: bool = False,
                 compile_mode: str | None = None, image_size: int = 32, num_classes: int = 10) -> tuple[list[float], float]:
    """Seconds per step for ``steps`` timed steps after ``warmup`` (device-synchronised), and the
    seconds of the first step (with ``compile_mode`` it compiles: that is its cost)."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes, 3).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    net = compile_model(model, compile_mode) if compile_mode else model
    cfg = OmegaConf.structured(OptimizerConfig(**VARIANTS[variant], diagnostics=diagnostics))
    opt = build_optimizer(cfg, model)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    bn = batchnorm_modules(model)
    loss_fn = nn.CrossEntropyLoss()
    amp = lambda: autocast(device, precision)  # noqa: E731
    chunk = m if variant in MSAM_SETTINGS else None
    engine, layout = MSAM_SETTINGS.get(variant, MSAM_SETTINGS["msam"])
    step = (lambda: loop_over_chunks_step(net, opt, x, y, loss_fn, amp, m)) if variant == "msam_loop" else \
        (lambda: train_step(net, opt, x, y, loss_fn, amp, bn, None, m=chunk, m_engine=engine, m_layout=layout))
    if MARK_STEP:
        step = _marking_step_begin(step)
    if variant in GRAPHED:
        if device.type != "cuda":
            raise RuntimeError(f"{variant} captures the step in a CUDA graph: it needs CUDA")
        step = _graphed(step)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        seconds = time.perf_counter() - t0
        if i == 0:
            first = seconds
            if profile:  # after the step that compiles, before the timed ones
                profile_step(step, device)
        if i >= warmup:
            times.append(seconds)
    return times, first


def bench(label: str, arch: str, device: torch.device, precision: str, batch: int, m: int, steps: int, warmup: int,
          diagnostics: bool, variants: list[str], profile: set[str] = frozenset(), compile_mode: str | None = None,
          image_size: int = 32, num_classes: int = 10) -> dict:
    """``compile_mode``: None = eager; else every variant's model under ``torch.compile`` in that mode."""
    out = {"label": label, "arch": arch, "device": str(device), "precision": precision, "batch": batch, "m": m,
           "image_size": image_size, "num_classes": num_classes,
           "steps": steps, "diagnostics": diagnostics, "compile": compile_mode,
           "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "ms_per_step": {}, "first_step_s": {}}
    out["errors"] = {}
    for variant in variants:
        try:
            t, first = time_variant(arch, variant, device, precision, batch, m, steps, warmup, diagnostics,
                                    variant in profile, compile_mode, image_size, num_classes)
        except Exception as e:  # report and go on: one broken variant must not hide the others' figures
            out["errors"][variant] = f"{type(e).__name__}: {e}"[:500]
            print(f"{label:>6} {arch:>10} {variant:>9}: FAILED {out['errors'][variant]}", flush=True)
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out["ms_per_step"][variant] = 1e3 * statistics.median(t)
        out["first_step_s"][variant] = first
        print(f"{label:>6} {arch:>10} {variant:>9}: {out['ms_per_step'][variant]:9.1f} ms/step (median of {len(t)}); "
              f"first step {first:.1f} s" + (" (compiles)" if compile_mode else ""), flush=True)
    ms = out["ms_per_step"]
    nan = float("nan")
    ratio = lambda a, b: ms[a] / ms[b] if a in ms and b in ms else nan  # noqa: E731
    out["sam_over_sgd"] = ratio("sam", "sgd")
    out["msam_over_sam"] = ratio("msam", "sam")
    out["asam_over_sam"] = ratio("asam", "sam")
    out["msam_loop_over_msam"] = ratio("msam_loop", "msam")
    out["msam_split_over_sam"] = ratio("msam_split", "sam")
    out["msam_vmap_over_sam"] = ratio("msam_vmap", "sam")
    out["msam_il_over_sam"] = ratio("msam_il", "sam")
    out["msam_k2_over_sam_k2"] = ratio("msam_k2", "sam_k2")
    out["msam_graphed_over_sam_graphed"] = ratio("msam_graphed", "sam_graphed")
    print(f"{label:>6} SAM/SGD {out['sam_over_sgd']:.3f}   m-SAM/SAM {out['msam_over_sam']:.3f} (m={m} of {batch})"
          f"   ASAM/SAM {out['asam_over_sam']:.3f}   loop-over-chunks/m-SAM {out['msam_loop_over_msam']:.3f}",
          flush=True)
    return out


#: CUDA runs at least this many warm-up steps (cuDNN autotuning, allocator), whatever --warmup says
GPU_MIN_WARMUP = 3


#: variants whose step splits the batch into chunks of m
USES_M = (*MSAM_SETTINGS, "msam_loop")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, variants: list[str]) -> None:
    """Refuse, naming the option and the rule, what would fail deep in a run (a reshape error, a
    division by zero, the median of no steps). Both devices' options are checked on any machine;
    m only when a variant of ``variants`` uses it."""
    for opt, value in (("--steps", args.steps), ("--gpu-steps", args.gpu_steps)):
        if value < 1:
            p.error(f"{opt} {value}: must be >= 1")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup}: must be >= 0")
    for dev in ("cpu", "gpu"):
        batch, m = getattr(args, f"{dev}_batch"), getattr(args, f"{dev}_m")
        if batch < 1:
            p.error(f"--{dev}-batch {batch}: must be >= 1")
        if any(v in USES_M for v in variants) and (m < 1 or batch % m):
            p.error(f"--{dev}-m {m}: m must be >= 1 and divide --{dev}-batch {batch} "
                    "(the batch is split into chunks of m examples)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant on the CPU, >= 1 (CUDA: --gpu-steps)")
    p.add_argument("--warmup", type=int, default=1,
                   help=f"untimed steps before them, >= 0; at least 2 with --compile, and on CUDA at least {GPU_MIN_WARMUP}")
    p.add_argument("--cpu-batch", type=int, default=256, help="batch of the CPU run (default: %(default)s)")
    p.add_argument("--cpu-m", type=int, default=32,
                   help="m of the CPU run's m-SAM variants: >= 1 and divides --cpu-batch (default: %(default)s)")
    p.add_argument("--cpu-arch", default="wrn16_4", help="model of the CPU run (default: %(default)s)")
    p.add_argument("--gpu-batch", type=int, default=256, help="batch of the CUDA run (default: %(default)s)")
    p.add_argument("--gpu-m", type=int, default=32,
                   help="m of the CUDA run's m-SAM variants: >= 1 and divides --gpu-batch (default: %(default)s)")
    p.add_argument("--gpu-arch", default="wrn28_10", help="model of the CUDA run (default: %(default)s)")
    p.add_argument("--gpu-steps", type=int, default=20, help="timed steps per variant on CUDA, >= 1 (default: %(default)s)")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU benchmark")
    p.add_argument("--no-diagnostics", action="store_true", help="time without the SAM diagnostics")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in GRAPHED),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all but the CUDA-graph ones)")
    p.add_argument("--profile", default="", help="comma-separated variants to profile (kernel table) before timing")
    p.add_argument("--compile", action="store_true", help="time the models under torch.compile (trainer.compile=true); "
                   "the first steps compile (warm-up is at least 2 steps)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode with --compile")
    p.add_argument("--image-size", type=int, default=32, help="square input size (224 for --gpu-arch resnet50)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the model's head (default: %(default)s)")
    p.add_argument("--mark-step", action="store_true", help="torch.compiler.cudagraph_mark_step_begin() before every "
                   "step (for --compile-mode reduce-overhead: a new iteration of CUDA graph trees begins)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    global MARK_STEP
    MARK_STEP = args.mark_step
    if args.threads:
        torch.set_num_threads(args.threads)
    diag = not args.no_diagnostics
    variants = [v for v in args.variants.split(",") if v]
    profile = {v for v in args.profile.split(",") if v}
    unknown = sorted((set(variants) | profile) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    check_args(p, args, variants)
    compile_mode = args.compile_mode if args.compile else None
    warmup = max(args.warmup, 2) if args.compile else args.warmup
    label = "+compile" if args.compile else ""
    results = {"torch": torch.__version__, "runs": []}
    if not args.no_cpu:
        results["runs"].append(bench("cpu" + label, args.cpu_arch, torch.device("cpu"), "fp32", args.cpu_batch, args.cpu_m,
                                     args.steps, warmup, diag, variants, profile, compile_mode, args.image_size,
                                     args.num_classes))
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        results["runs"].append(bench("cuda" + label, args.gpu_arch, torch.device("cuda"), "bf16", args.gpu_batch, args.gpu_m,
                                     args.gpu_steps, max(warmup, GPU_MIN_WARMUP), diag, variants, profile, compile_mode, args.image_size,
                                     args.num_classes))
    if args.out:
        atomic_write_json(Path(args.out), results)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
