#!/usr/bin/env python
"""Training throughput of sam-bench against the practical peak of the machine.

For each model × batch × precision × compile setting it times the real training step of the
trainer (GPU-resident data, batched augmentation, the SAM step) for SGD, SAM and m-SAM, and the
"common PyTorch SAM loop" (a DataLoader with per-image CPU transforms, eager fp32, the usual
two-pass SAM with BN momentum set to 0) as most SAM repositories train. It also measures the
practical peak (a large bf16 matmul on CUDA, fp32 on CPU) and reports MFU against it.

    python scripts/bench.py                                   # CPU: a small WRN-16-4 grid
    python scripts/bench.py --models wrn28_10 --batch 256 --precision bf16 --compile 0,1 --out bench.json
    python scripts/bench.py --models resnet50 --image-size 224 --num-classes 1000 --batch 128 --m 0 --reference 0

Prints a table; --out writes every figure as JSON. Figures are per step: images/s counts the
training images of the batch, whatever the number of passes. The SAM steps run as the trainer's
default optimizer does: diagnostics on (--diagnostics 0 times them off), fp16 with the trainer's
loss scaler (fp16 needs CUDA, as trainer.precision=fp16).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import sam_bench.models  # noqa: E402,F401  (registers the CIFAR models)
from sam_bench.data.loader import DeviceLoader  # noqa: E402
from sam_bench.engine.precision import LossScaler, autocast  # noqa: E402
from sam_bench.engine import trainer  # noqa: E402
from sam_bench.engine.step import train_step  # noqa: E402
from sam_bench.optim import SAM, batchnorm_modules  # noqa: E402
from sam_bench.schema import COMPILE_MODES, OptimizerConfig  # noqa: E402
from sam_bench.tracking.results import atomic_write_json  # noqa: E402

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
#: the trainer's default ``optimizer.diagnostics`` (sam_bench/schema.py): its SAM step records them
TRAINER_DIAGNOSTICS = OptimizerConfig.diagnostics
PRECISIONS = ("bf16", "fp16", "fp32")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def practical_peak(device: torch.device) -> tuple[float, str]:
    """FLOP/s of a large matmul: bf16 8192³ on CUDA, fp32 2048³ on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0), f"{str(dtype).split('.')[-1]} matmul {n}^3"


def forward_flops(arch: str, num_classes: int, image: int) -> float:
    """Forward FLOPs per image (2 per multiply-add), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=num_classes)
        x = torch.randn(1, 3, image, image)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return float(counter.get_total_flops())


def make_optimizer(model: nn.Module, rho: float, diagnostics: bool = False) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=rho, weight_decay=5e-4, grad_clip=5.0, lr=0.1, momentum=0.9, nesterov=True,
               diagnostics=diagnostics)


def time_ours(arch, batch, precision, compile_model, rho, m, device, steps, warmup, pool, image=32, classes=10,
              compile_mode="default", diagnostics: bool = TRAINER_DIAGNOSTICS) -> dict:
    """The trainer's own path: DeviceLoader (augment on device) + train_step, with the trainer's
    SAM diagnostics by default and, under fp16, its loss scaler."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=classes).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = trainer.compile_model(model, compile_mode) if compile_model else model
    opt = make_optimizer(model, rho, diagnostics)
    images = torch.randint(0, 256, (pool, 3, image, image), dtype=torch.uint8, device=device)
    labels = torch.randint(0, classes, (pool,), device=device)
    loader = DeviceLoader(images, labels, batch, CIFAR_MEAN, CIFAR_STD, train=True, augment=True, channels_last=channels_last)
    bn = batchnorm_modules(model)
    amp = lambda: autocast(device, precision)  # noqa: E731
    step_kwargs = {"m": m} if m else {}
    if precision == "fp16":  # as the trainer: fp16 only with its dynamic loss scaler
        step_kwargs["scaler"] = LossScaler(device)
    model.train()

    def run(n: int, epoch: int) -> None:
        done = 0
        while done < n:
            for x, y in loader.epoch(epoch):
                train_step(forward, opt, x, y, F.cross_entropy, amp, bn, None, **step_kwargs)
                done += 1
                if done == n:
                    return
            epoch += 1

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run(warmup, 0)
    sync(device)
    t0 = time.perf_counter()
    run(steps, 100)
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"step_ms": 1000 * dt, "images_per_s": batch / dt, "peak_memory_mb": peak}


class _UInt8CIFAR(torch.utils.data.Dataset):
    """In-memory CIFAR-shaped images handed out as PIL images, as torchvision.datasets.CIFAR10 does."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def time_reference(arch, batch, device, steps, warmup, pool, workers) -> dict:
    """The common PyTorch SAM loop: DataLoader + CPU transforms, eager fp32, BN momentum trick (no diagnostics)."""
    import numpy as np
    from torchvision import transforms

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10).to(device)
    opt = make_optimizer(model, 0.05)
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    rng = np.random.default_rng(0)
    ds = _UInt8CIFAR(rng.integers(0, 256, (pool, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, pool), tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                     pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    bns = batchnorm_modules(model)
    model.train()

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        momenta = [b.momentum for b in bns]
        for b in bns:
            b.momentum = 0.0
        F.cross_entropy(model(x), y).backward()
        for b, mom in zip(bns, momenta):
            b.momentum = mom
        opt.second_step(zero_grad=True)

    def run(n):
        done = 0
        while done < n:
            for x, y in dl:
                step(x, y)
                done += 1
                if done == n:
                    return

    run(warmup)
    sync(device)
    t0 = time.perf_counter()
    run(steps)
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    return {"step_ms": 1000 * dt, "images_per_s": batch / dt}


def parse_list(text: str, cast=str) -> list:
    return [cast(t) for t in text.split(",") if t]


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, cuda: bool) -> None:
    """Refuse, naming the option and the rule, what would fail (or mean nothing) deep in a run."""
    try:
        batches = parse_list(args.batch, int)
    except ValueError:
        p.error(f"--batch {args.batch!r}: a comma list of integers")
    if not batches or min(batches) < 1:
        p.error(f"--batch {args.batch}: every batch size must be >= 1")
    models = parse_list(args.models)
    unknown_models = [m for m in models if not timm.is_model(m)]
    if unknown_models or not models:  # timm's own refusal is a traceback, after the peak measurement
        p.error(f"--models {args.models}: {', '.join(unknown_models) or 'none given'} is not a registered model; "
                "`sam-bench models` lists them (e.g. wrn16_4, wrn28_10, resnet50)")
    if args.m < 0:
        p.error(f"--m {args.m}: m must be >= 1 and divide every --batch (0: no m-SAM row)")
    if args.m and any(b % args.m for b in batches):
        p.error(f"--m {args.m}: m must be >= 1 and divide every --batch ({args.batch}): the batch is split into "
                "chunks of m examples (0: no m-SAM row)")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be >= 1")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup}: must be >= 0")
    if args.workers < 0:
        p.error(f"--workers {args.workers}: must be >= 0")
    precisions = parse_list(args.precision)
    unknown = [x for x in precisions if x not in PRECISIONS]
    if unknown or not precisions:
        p.error(f"--precision {args.precision}: a comma list of {','.join(PRECISIONS)}")
    if "fp16" in precisions and not cuda:
        p.error("--precision fp16 needs CUDA (as trainer.precision=fp16): use bf16 or fp32 on the CPU")
    try:
        compiles = parse_list(args.compile, int)
    except ValueError:
        compiles = [None]
    if not compiles or any(c not in (0, 1) for c in compiles):
        p.error(f"--compile {args.compile}: a comma list of 0,1")


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="wrn28_10" if cuda else "wrn16_4",
                   help="comma list of timm model names (sam_bench's CIFAR models included) (default: %(default)s)")
    p.add_argument("--batch", default="256" if cuda else "64", help="comma list of batch sizes (default: %(default)s)")
    p.add_argument("--precision", default="bf16" if cuda else "fp32",
                   help="comma list of bf16,fp16,fp32; fp16 needs CUDA and runs with the trainer's loss scaler (default: %(default)s)")
    p.add_argument("--compile", default="1" if cuda else "0", help="comma list of 0,1 (default: %(default)s)")
    p.add_argument("--m", type=int, default=32,
                   help="m of the m-SAM row: >= 1 and divides every --batch; m equal to the batch is plain SAM, no row "
                        "(0: skip the row) (default: %(default)s)")
    p.add_argument("--compile-msam", type=int, default=0,
                   help="also time the m-SAM row compiled (split engine: one graph per pass; a long first compile)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode of the compiled rows")
    p.add_argument("--diagnostics", type=int, default=int(TRAINER_DIAGNOSTICS), choices=(0, 1),
                   help="SAM diagnostics in the timed steps (default %(default)s: the trainer's optimizer.diagnostics)")
    p.add_argument("--steps", type=int, default=30 if cuda else 3,
                   help="timed steps per row, >= 1 (the reference loop: half, at least 2) (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10 if cuda else 1,
                   help="untimed steps before them, >= 0 (the reference loop: half, at least 1) (default: %(default)s)")
    p.add_argument("--reference", type=int, default=1, help="also time the common PyTorch SAM loop (32 px images only)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers of the reference loop (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--image-size", type=int, default=32, help="square input size (224 for the ImageNet ResNets)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the model's head (default: %(default)s)")
    p.add_argument("--out", default="", help="write every figure as JSON to this file (written atomically)")
    args = p.parse_args()
    check_args(p, args, cuda)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak, peak_what = practical_peak(device)
    dev_name = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    print(f"device: {dev_name} | torch {torch.__version__} | practical peak {peak / 1e12:.1f} TFLOP/s ({peak_what})", flush=True)
    rows = []
    for arch in parse_list(args.models):
        fwd = forward_flops(arch, args.num_classes, args.image_size)
        for batch in parse_list(args.batch, int):
            pool = max(4 * batch, 2048 if args.image_size <= 64 else 512)
            for precision in parse_list(args.precision):
                for comp in parse_list(args.compile, int):
                    modes = [("sgd", 0.0, None), ("sam", 0.05, None)]
                    if args.m and args.m < batch and (not comp or args.compile_msam):
                        modes.append((f"m-sam (m={args.m})", 0.05, args.m))
                    for name, rho, m in modes:
                        try:
                            r = time_ours(arch, batch, precision, bool(comp), rho, m, device, args.steps, args.warmup, pool,
                                          args.image_size, args.num_classes, args.compile_mode, bool(args.diagnostics))
                        except TypeError as e:  # an m-SAM step is not available in this build
                            print(f"  {name}: skipped ({e})", flush=True)
                            continue
                        passes = 2 if rho > 0 else 1
                        flops = 3 * fwd * passes * batch / (r["step_ms"] / 1000)
                        rows.append({"model": arch, "batch": batch, "precision": precision, "compile": bool(comp),
                                     "compile_mode": args.compile_mode if comp else None, "optimizer": name,
                                     **r, "model_tflops": flops / 1e12, "mfu": flops / peak})
                        print(f"  {arch} b{batch} {precision} compile={comp} {name}: {r['step_ms']:.1f} ms/step {r['images_per_s']:.0f} img/s", flush=True)
            if args.reference and args.image_size == 32:
                r = time_reference(arch, batch, device, max(args.steps // 2, 2), max(args.warmup // 2, 1), pool, args.workers)
                flops = 6 * fwd * batch / (r["step_ms"] / 1000)
                rows.append({"model": arch, "batch": batch, "precision": "fp32", "compile": False, "optimizer": "sam (reference loop)",
                             **r, "peak_memory_mb": None, "model_tflops": flops / 1e12, "mfu": flops / peak})
    by_key = {(r["model"], r["batch"], r["precision"], r["compile"], r["optimizer"]): r for r in rows}
    header = f"{'model':10} {'batch':>5} {'prec':5} {'compile':7} {'optimizer':22} {'ms/step':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak MB':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        mem = f"{r['peak_memory_mb']:.0f}" if r.get("peak_memory_mb") else "-"
        print(f"{r['model']:10} {r['batch']:>5} {r['precision']:5} {str(r['compile']):7} {r['optimizer']:22} {r['step_ms']:9.1f} "
              f"{r['images_per_s']:9.0f} {r['model_tflops']:8.2f} {100 * r['mfu']:5.1f}% {mem:>8}")
    ratios = []
    for (arch, batch, prec, comp, opt), r in by_key.items():
        if opt == "sam":
            sgd = by_key.get((arch, batch, prec, comp, "sgd"))
            msam = by_key.get((arch, batch, prec, comp, f"m-sam (m={args.m})"))
            ref = by_key.get((arch, batch, "fp32", False, "sam (reference loop)"))
            line = {"model": arch, "batch": batch, "precision": prec, "compile": comp,
                    "sam_over_sgd": r["step_ms"] / sgd["step_ms"] if sgd else None,
                    "msam_over_sam": msam["step_ms"] / r["step_ms"] if msam else None,
                    "sam_speedup_vs_reference": r["images_per_s"] / ref["images_per_s"] if ref else None,
                    "sam_epoch_s_50k": 50000 / r["images_per_s"]}
            ratios.append(line)
            print(f"{arch} b{batch} {prec} compile={comp}: SAM/SGD {line['sam_over_sgd'] or float('nan'):.2f}  "
                  f"m-SAM/SAM {line['msam_over_sam'] or float('nan'):.2f}  SAM vs reference loop x{line['sam_speedup_vs_reference'] or float('nan'):.2f}  "
                  f"SAM epoch (50k) {line['sam_epoch_s_50k']:.1f} s")
    if args.out:
        atomic_write_json(Path(args.out), {"device": dev_name, "torch": torch.__version__, "peak_flops": peak, "peak_what": peak_what,
                                           "diagnostics": bool(args.diagnostics), "rows": rows, "ratios": ratios, "argv": sys.argv[1:]})


if __name__ == "__main__":
    main()
    # Every figure is printed and written. Leave without the interpreter's teardown: on the H200
    # (torch 2.11) the process sat in exit after a compiled ResNet-50 run until `timeout` killed it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
