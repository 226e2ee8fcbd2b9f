"""``sam-bench hessian``: the top of the Hessian spectrum of a trained checkpoint (Fig. 3 left).

Reads a checkpoint written by ``sam-bench train`` (its config says which model and dataset), takes a
seeded random subset of the run's training images (the labels it trained on, noisy ones included;
no augmentation), and writes the top eigenvalues of the training-loss Hessian as JSON beside the
checkpoint (atomically). See :mod:`sam_bench.analysis.hessian` for the method.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from sam_bench.analysis.hessian import LossHessian, exact_float32, top_eigenvalues
from sam_bench.data import IN_MEMORY, DeviceLoader, build_data
from sam_bench.engine import checkpoint as ckpt
from sam_bench.engine.precision import resolve_device
from sam_bench.engine.rundir import ensure_writable
from sam_bench.errors import CheckpointError, ConfigError
from sam_bench.models import build_model
from sam_bench.schema import experiment_hash, method_label
from sam_bench.tracking.results import atomic_write_json, versions


def read_any_checkpoint(where: Path) -> tuple[dict[str, Any], Path]:
    """A verified checkpoint from a file, or the newest one of a run directory."""
    if where.is_dir():
        loaded = ckpt.load_checkpoint(where)
        if loaded is None:
            raise CheckpointError(f"{where} holds no checkpoint ({ckpt.CHECKPOINT}); give a run directory of sam-bench train or a checkpoint file")
        return loaded
    if not where.exists():
        raise CheckpointError(f"checkpoint {where} does not exist; give a run directory of sam-bench train or a checkpoint file")
    try:
        return ckpt.read_checkpoint(where), where
    except Exception as e:
        raise CheckpointError(f"{where} is not a readable sam-bench checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def training_images(config: dict, images: int, batch_size: int, seed: int, device: torch.device,
                    data_root: str | None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int, int]:
    """Batches of ``images`` training images drawn without replacement (seeded; 0 or more than the
    set = all), normalised as in training, without augmentation; also the class and channel counts."""
    ds = OmegaConf.create(config["dataset"])
    if ds.name not in IN_MEMORY:
        raise ConfigError(f"the Hessian spectrum reads in-memory datasets ({', '.join(IN_MEMORY)}); this checkpoint trained on {ds.name}")
    if data_root is not None:
        ds.root = data_root
    data = build_data(ds, 1, batch_size, torch.device("cpu"), 0, channels_last=False)
    x, y = data.train.images, data.train.labels
    n = len(y) if images <= 0 or images >= len(y) else images
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    loader = DeviceLoader(x[pick].to(device), y[pick].to(device), batch_size, list(ds.mean), list(ds.std), train=False,
                          upsample_to=data.train.upsample_to)
    batches = list(loader.epoch(0))  # normalised as the evaluation batches of training
    return batches, data.num_classes, data.in_chans


def hessian_spectrum(cfg) -> dict[str, Any]:
    """Run the analysis described by a ``hessian`` config; returns (and writes) the result."""
    if cfg.top_k < 1 or cfg.iters < cfg.top_k or cfg.batch_size < 1:
        raise ConfigError(f"need top_k >= 1, iters >= top_k and batch_size >= 1 (got top_k={cfg.top_k}, iters={cfg.iters}, "
                          f"batch_size={cfg.batch_size})")
    state, path = read_any_checkpoint(Path(cfg.checkpoint))
    out = Path(cfg.out) if cfg.out else path.parent / f"hessian_{path.stem}.json"
    ensure_writable(out.parent, key="out")  # before the computation, not after it
    config = state["config"]
    device = resolve_device(cfg.device)
    batches, num_classes, in_chans = training_images(config, cfg.images, cfg.batch_size, cfg.seed, device, cfg.data_root)
    model = build_model(config["model"]["arch"], num_classes, in_chans, **config["model"]["kwargs"])
    model.load_state_dict(state["model"])
    model.to(device).eval()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config["trainer"]["label_smoothing"])
    t0 = time.perf_counter()
    with exact_float32():
        hessian = LossHessian(model, batches, loss_fn)
        loss, grad_norm = hessian.loss_and_grad_norm()
        result = top_eigenvalues(hessian, cfg.top_k, cfg.iters, cfg.lanczos_seed)
    result = {
        **result,
        "loss": loss,
        "grad_norm": grad_norm,
        "checkpoint": str(path),
        "epoch": state["epoch"],
        "step": state["step"],
        "name": config.get("name", ""),
        "arch": config["model"]["arch"],
        "dataset": config["dataset"]["name"],
        "optimizer": config["optimizer"]["name"],
        "method": method_label(config["optimizer"]),  # sgd, sam, asam, sam+k=3, ...: what the report matches on
        "rho": config["optimizer"]["rho"],
        "seed": cfg.seed,
        "lanczos_seed": cfg.lanczos_seed,
        "training_seed": config.get("seed"),
        "config_hash": state.get("config_hash"),
        "experiment_hash": experiment_hash(config),  # the report averages over training seeds of one experiment
        "device": str(device),
        "seconds": time.perf_counter() - t0,
        "versions": versions(),
    }
    atomic_write_json(out, result)
    result["out"] = str(out)
    return result


def _bound(value: float, residual: float) -> str:
    """The residual bound, or "settled" below float32's resolution of the products (1e-6 of the value)."""
    return "settled" if residual <= 1e-6 * abs(value) else f"±{residual:.1g}"


def describe(result: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    k = len(result["eigenvalues"])
    ratio = result[f"lambda_max_over_lambda_{k}"]
    lines = [
        f"{result['arch']} on {result['dataset']}, {result['optimizer']} rho={result['rho']}, epoch {result['epoch']} "
        f"(step {result['step']}): {result['images']} training images, {result['lanczos_iters']} Lanczos steps, "
        f"{result['seconds']:.1f} s",
        f"  loss {result['loss']:.4f}  |grad| {result['grad_norm']:.4g}",
        "  eigenvalues " + "  ".join(f"{v:.4g} ({_bound(v, r)})" for v, r in zip(result["eigenvalues"], result["residuals"])),
        f"  lambda_max {result['lambda_max']:.4g}  lambda_max/lambda_{k} " + (f"{ratio:.3g}" if ratio is not None else "n/a"),
        f"  -> {result['out']}",
    ]
    loose = [i + 1 for i, ok in enumerate(result["converged"]) if not ok]
    if loose:
        lines.append(f"  warning: eigenvalue(s) {', '.join(map(str, loose))} not converged (residual bound above 1 % of the value); "
                     f"raise iters (now {result['lanczos_iters']})")
    return "\n".join(lines)
