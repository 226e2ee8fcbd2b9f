"""Images/s of the data pipeline alone (no model): the device-resident CIFAR loader with Basic,
Basic+Cutout and AutoAugment(+Basic+Cutout; applied to the whole set once per epoch, so timed
over a full epoch) augmentation, on the CPU and on CUDA when present,
next to per-image torchvision AutoAugment on the CPU (what a classic DataLoader worker does,
timed over the first min(--n, 2000) images). That reference runs torchvision's own CIFAR10 policy
(25 sub-policies), not the official SAM policy sam-bench uses (95, TF ops: sam_bench/data/autoaugment.py),
so it compares pipelines of a similar kind of work, not the same augmentation.

    python scripts/bench_data.py [--n 50000] [--batch 256] [--steps 100] [--cpu-steps 20] [--threads N]

Random uint8 CIFAR-shaped data: throughput does not depend on pixel values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sam_bench first

import torch  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from sam_bench.data.loader import DeviceLoader  # noqa: E402

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
#: images of the per-image torchvision comparison (fewer when --n is smaller)
TORCHVISION_IMAGES = 2000
SETTINGS = {
    "Basic": dict(augment=True),
    "Basic+Cutout": dict(augment=True, cutout=16),
    "Basic+Cutout (per image)": dict(augment=True, cutout=16, cutout_per_image=True),
    "AutoAugment+Basic+Cutout": dict(augment=True, cutout=16, autoaugment="cifar10"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(images: torch.Tensor, labels: torch.Tensor, batch: int, steps: int, **kw) -> float:
    """Images/s over ``steps`` batches of one epoch, after one warm-up epoch prefix."""
    loader = DeviceLoader(images, labels, batch, MEAN, STD, train=True, seed=0, **kw)
    steps = min(steps, len(loader))
    for i, _ in enumerate(loader.epoch(0)):  # warm-up (allocator, kernels)
        if i >= 3:
            break
    sync(images.device)
    t0 = time.perf_counter()
    checksum = torch.zeros((), device=images.device)
    for i, (x, _) in enumerate(loader.epoch(1)):
        checksum += x[0, 0, 0, 0]  # consume the batch without a host sync
        if i + 1 == steps:
            break
    sync(images.device)
    return steps * batch / (time.perf_counter() - t0)


def torchvision_per_image_rate(images: torch.Tensor, n: int) -> float:
    """torchvision v2 AutoAugment + flip + crop, one image at a time (a DataLoader worker's job),
    over the first ``n`` images (all of them if there are fewer)."""
    n = min(n, len(images))
    t = v2.Compose([v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()])
    cpu = images[:n].cpu()
    t0 = time.perf_counter()
    for i in range(n):
        t(cpu[i])
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50000, help="images in the set (default: %(default)s)")
    p.add_argument("--batch", type=int, default=256, help="batch size, at most --n (default: %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="batches timed per setting (GPU) (default: %(default)s)")
    p.add_argument("--cpu-steps", type=int, default=20, help="batches timed per setting (CPU) (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args()
    if args.n < 1:
        p.error(f"--n {args.n}: must be >= 1")
    if not 1 <= args.batch <= args.n:
        p.error(f"--batch {args.batch}: must be >= 1 and at most --n {args.n} (the loader drops a last partial batch)")
    for opt, value in (("--steps", args.steps), ("--cpu-steps", args.cpu_steps)):
        if value < 1:
            p.error(f"{opt} {value}: must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.n,), generator=g)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for dev in devices:
        x, y = images.to(dev), labels.to(dev)
        steps = args.steps if dev.type == "cuda" else args.cpu_steps
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        for setting, kw in SETTINGS.items():
            # AutoAugment runs once per epoch over the whole set: time a full epoch
            full = "autoaugment" in kw
            rate = loader_rate(x, y, args.batch, args.n if full else steps, **kw)
            rows.append((name, setting + (" (full epoch)" if full else ""), f"batch {args.batch}", rate))
    rows.append((f"cpu ({torch.get_num_threads()} threads)", "torchvision AutoAugment per image (1 process; its 25-policy set)", "-", torchvision_per_image_rate(images, TORCHVISION_IMAGES)))
    w = max(len(r[0]) for r in rows)
    print(f"{'device':<{w}}  {'pipeline':<46} {'batch':<11} {'images/s':>12}")
    for dev, setting, batch, rate in rows:
        print(f"{dev:<{w}}  {setting:<46} {batch:<11} {rate:>12,.0f}")


if __name__ == "__main__":
    main()
