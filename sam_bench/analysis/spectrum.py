"""``sam-bench hessian``: the top of the Hessian spectrum of a trained checkpoint (Fig. 3 left).

Reads a checkpoint written by ``sam-bench train`` (its config says which model and dataset), takes a
seeded random subset of the run's training images (the labels it trained on, noisy ones included;
no augmentation), and writes the top eigenvalues of the training-loss Hessian as JSON beside the
checkpoint (atomically). See :mod:`sam_bench.analysis.hessian` for the method.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Mapping

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
from sam_bench.schema import experiment_hash, method_label, unversioned_warning
from sam_bench.tracking.results import atomic_write_json, versions


_ZIP_MAGIC = b"PK\x03\x04"  # sam-bench train writes its checkpoints with torch.save: zip archives
_WHERE_FROM = "give a checkpoint file written by sam-bench train (e.g. <run dir>/checkpoint_epoch0050.pt) or a run directory"


def _first_sentence(e: BaseException) -> str:
    """torch's first sentence of an error (never its advice to load with weights_only=False)."""
    first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""
    return "" if "weights_only" in first.lower() or "weights only" in first.lower() else first


def _why_unreadable(path: Path, e: Exception) -> str:
    """Why ``path`` is no usable checkpoint, in words, from the error of reading it."""
    if type(e) is ValueError:  # read_checkpoint's own checks: a foreign dict, missing keys, a checksum mismatch
        return str(e)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if head != _ZIP_MAGIC:
        return "not a sam-bench checkpoint (not a file torch.save wrote, as sam-bench train does)"
    if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
        return "not a sam-bench checkpoint (a torch file holding objects other than tensors and plain containers)"
    detail = _first_sentence(e)
    return "damaged or incomplete, e.g. half-written by a run killed while saving it" + (
        f" ({type(e).__name__}: {detail})" if detail else f" ({type(e).__name__})")


def _no_readable_checkpoint(where: Path, original: Exception) -> CheckpointError:
    """A run directory without a readable checkpoint, said for an analysis (which changes nothing there)."""
    reasons = []
    for path in [*ckpt.checkpoint_files(where), *sorted(where.glob(f"{ckpt.KEPT_PREFIX}*.pt"), reverse=True)]:
        try:
            ckpt.read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - every way a file can be unreadable is reported
            reasons.append(f"{path.name}: {_why_unreadable(path, e)}")
    listed = "; ".join(reasons) if reasons else str(original)
    return CheckpointError(f"no readable checkpoint in {where} ({listed}); give a readable checkpoint file instead, e.g. a kept "
                           f"{ckpt.KEPT_PREFIX}*.pt of this run (trainer.keep_epochs) or one of another run")


def read_any_checkpoint(where: Path) -> tuple[dict[str, Any], Path]:
    """A verified checkpoint from a file, or the newest one of a run directory."""
    if where.is_dir():
        try:
            loaded = ckpt.load_checkpoint(where)
        except CheckpointError as e:  # every file unreadable: its words are for resuming training, not for an analysis
            raise _no_readable_checkpoint(where, e) from e
        if loaded is None:
            raise CheckpointError(f"{where} holds no checkpoint ({ckpt.CHECKPOINT}); {_WHERE_FROM}")
        return loaded
    if not where.exists():
        raise CheckpointError(f"checkpoint {where} does not exist; {_WHERE_FROM}")
    try:
        return ckpt.read_checkpoint(where), where
    except Exception as e:
        raise CheckpointError(f"{where} is not a readable sam-bench checkpoint: {_why_unreadable(where, e)}; {_WHERE_FROM}") from e


def _shape(t: Any) -> str:
    return str(list(t.shape)) if hasattr(t, "shape") else type(t).__name__


def _mismatch(model: nn.Module, weights: Any) -> str:
    """The first difference between the model's state dict and ``weights`` ('' when none is found)."""
    if not isinstance(weights, Mapping):
        return f"the weights are a {type(weights).__name__}, not a state dict"
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    resized = [k for k in own if k in weights and hasattr(weights[k], "shape") and tuple(weights[k].shape) != tuple(own[k].shape)]
    parts = []
    for what, keys in (("missing key", missing), ("unexpected key", unexpected)):
        if keys:
            parts.append(f"{what} {keys[0]!r}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else ""))
    if resized:
        k = resized[0]
        parts.append(f"{k!r} is {_shape(weights[k])} in the checkpoint, {_shape(own[k])} in the model"
                     + (f" (and {len(resized) - 1} more shapes differ)" if len(resized) > 1 else ""))
    return ", ".join(parts)


def load_weights(model: nn.Module, weights: Any, path: Path, model_config: dict) -> None:
    """The checkpoint's weights into the model its config describes; a :class:`CheckpointError`
    naming the first mismatch when they do not fit (an edited config or swapped weights)."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError, KeyError) as e:
        what = _mismatch(model, weights) or _first_sentence(e)
        kwargs = ", ".join(f"{k}={v}" for k, v in (model_config.get("kwargs") or {}).items())
        raise CheckpointError(f"the weights in {path} do not fit the model its config describes ({model_config.get('arch')}"
                              f"{' ' + kwargs if kwargs else ''}): {what}; use a checkpoint as sam-bench train wrote it") from e


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
    n = len(y) if images == 0 or images >= len(y) else images
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
    if cfg.images < 0:
        raise ConfigError(f"images must be >= 0 (a number of training images; 0 = all of them), got images={cfg.images}")
    state, path = read_any_checkpoint(Path(cfg.checkpoint))
    out = Path(cfg.out) if cfg.out else path.parent / f"hessian_{path.stem}.json"
    ensure_writable(out.parent, key="out", example="/path/to/spectrum.json")  # before the computation, not after it
    config = state["config"]
    if state.get("compute_version") is None:
        print(f"sam-bench hessian: warning: {unversioned_warning(path)}; the spectrum may be of another function", file=sys.stderr)
    device = resolve_device(cfg.device, key="device")
    batches, num_classes, in_chans = training_images(config, cfg.images, cfg.batch_size, cfg.seed, device, cfg.data_root)
    model = build_model(config["model"]["arch"], num_classes, in_chans, **config["model"]["kwargs"])
    load_weights(model, state["model"], path, config["model"])
    model.to(device).eval()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config["trainer"]["label_smoothing"])
    partial = state.get("partial")  # the accumulators of a partly trained epoch: a mid-epoch checkpoint
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
        "epoch": state["epoch"],  # completed epochs; a mid-epoch checkpoint is epoch_step steps into the next one
        "step": state["step"],
        "mid_epoch": partial is not None,  # True: no epoch's end (the newest checkpoint of a preempted or running run)
        "epoch_step": int(partial["epoch_step"]) if partial is not None else None,
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
        "compute_version": state.get("compute_version"),  # of the code that trained it (schema.COMPUTE_VERSION)
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


def epoch_words(result: dict[str, Any]) -> str:
    """"epoch 3 (step 300)", or "epoch 3 + 27 steps (step 327; a mid-epoch checkpoint, ...)"."""
    if result.get("mid_epoch"):
        into = f" + {result['epoch_step']} steps" if result.get("epoch_step") is not None else " + some steps"
        return (f"epoch {result['epoch']}{into} (step {result['step']}; a mid-epoch checkpoint: the end of no epoch, "
                "measure a checkpoint_epoch*.pt file for that)")
    return f"epoch {result['epoch']} (step {result['step']})"


def describe(result: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    k = len(result["eigenvalues"])
    ratio = result[f"lambda_max_over_lambda_{k}"]
    if ratio is not None:
        ratio_text = f"{ratio:.3g}"
    elif result["eigenvalues"][-1] <= 0:
        ratio_text = f"n/a (lambda_{k} <= 0: the ratio then says nothing about flatness)"
    else:
        ratio_text = "n/a"
    lines = [
        f"{result['arch']} on {result['dataset']}, {result['optimizer']} rho={result['rho']}, {epoch_words(result)}: "
        f"{result['images']} training images, {result['lanczos_iters']} Lanczos steps, "
        f"{result['seconds']:.1f} s",
        f"  loss {result['loss']:.4f}  |grad| {result['grad_norm']:.4g}",
        "  eigenvalues " + "  ".join(f"{v:.4g} ({_bound(v, r)})" for v, r in zip(result["eigenvalues"], result["residuals"])),
        f"  lambda_max {result['lambda_max']:.4g}  lambda_max/lambda_{k} " + ratio_text,
        f"  -> {result['out']}",
    ]
    loose = [i + 1 for i, ok in enumerate(result["converged"]) if not ok]
    if loose:
        lines.append(f"  warning: eigenvalue(s) {', '.join(map(str, loose))} not converged (residual bound above 1 % of the value); "
                     f"raise iters (now {result['lanczos_iters']})")
    return "\n".join(lines)
