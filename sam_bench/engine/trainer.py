"""fit / train_one_epoch / evaluate: the run orchestration around :func:`train_step`."""

from __future__ import annotations

import logging
import random
import resource
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sam_bench.data import DataBundle, DeviceLoader, build_data
from sam_bench.engine import checkpoint as ckpt
from sam_bench.engine.precision import LossScaler, autocast, resolve_device, resolve_precision
from sam_bench.engine.step import RngReplay, train_step, uses_randomness
from sam_bench.models import build_model
from sam_bench.optim import batchnorm_modules, build_optimizer, build_scheduler, effective_rho, set_bn_eval
from sam_bench.optim.sam import SAM
from sam_bench.schema import config_hash, semantic_config, validate
from sam_bench.tracking.results import RESULT_FILE, atomic_write_json, git_commit, read_result, versions, write_metrics

log = logging.getLogger("sam_bench")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG as plain containers/tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def train_one_epoch(
    model: nn.Module,
    loader: DeviceLoader,
    optimizer: SAM,
    scheduler,
    epoch: int,
    global_step: int,
    loss_fn,
    amp,
    bn_frozen_in_pass2: list | None,
    bn_eval: list | None,
    rng: RngReplay | None,
    progress: bool,
    log_every: int,
    step_kwargs: dict | None = None,
    on_log=None,
) -> tuple[dict[str, float], int]:
    """Train for one epoch; returns (stats, global step). One host sync, at the end."""
    model.train()
    if bn_eval:
        set_bn_eval(bn_eval)
    device = loader.images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}", leave=False, disable=None if progress else True, dynamic_ncols=True)
    for i, (images, labels) in enumerate(loader.epoch(epoch)):
        if scheduler is not None:
            scheduler.step_update(global_step)
        loss, logits = train_step(model, optimizer, images, labels, loss_fn, amp, bn_frozen_in_pass2, rng, **(step_kwargs or {}))
        loss_sum += loss.float() * labels.numel()
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += labels.numel()
        global_step += 1
        bar.update(1)
        if (i + 1) % log_every == 0:
            if on_log is not None:
                on_log(global_step, optimizer.read_diagnostics())  # SAM diagnostics: one sync per interval
            if not bar.disable:
                bar.set_postfix(loss=f"{(loss_sum / seen).item():.3f}")  # a sync per log interval only
    bar.close()
    return {"train_loss": (loss_sum / seen).item(), "train_error": 100.0 * (1.0 - correct.item() / seen)}, global_step


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader, amp) -> dict[str, float]:
    """Test loss and error (%) over the whole split, in eval mode."""
    model.eval()
    device = loader.images.device
    loss_sum = torch.zeros((), device=device)
    errors = torch.zeros((), device=device, dtype=torch.long)
    for images, labels in loader.epoch(0):
        with amp():
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        errors += (logits.argmax(dim=1) != labels).sum()
    n = loader.num_examples
    return {"test_loss": loss_sum.item() / n, "test_error": 100.0 * errors.item() / n}


def fit(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train (or resume, or skip if already complete) the run described by ``cfg`` in ``run_dir``."""
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.optimizer.name == "sgd" and cfg.optimizer.rho != 0:
        log.info("optimizer=sgd: optimizer.rho=%s ignored (SGD is SAM with rho=0, one pass per step)", cfg.optimizer.rho)
    cfg.optimizer.rho = effective_rho(cfg.optimizer)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    chash = config_hash(config)

    done = read_result(run_dir)
    if done is not None and done.get("config_hash") == chash:
        log.info("%s is complete (final test error %.2f%%); nothing to do", run_dir, done["final_test_error"])
        return done

    tr = cfg.trainer
    device = resolve_device(tr.device)
    precision = resolve_precision(tr.precision, device)
    if tr.num_threads:
        torch.set_num_threads(tr.num_threads)
    seed_everything(cfg.seed)
    channels_last = tr.channels_last and device.type == "cuda"
    data: DataBundle = build_data(cfg.dataset, tr.batch_size, tr.eval_batch_size, device, cfg.seed, channels_last)
    model = build_model(cfg.model.arch, data.num_classes, data.in_chans, **cfg.model.kwargs).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, model, seed=cfg.seed)
    scaler = LossScaler(device) if precision == "fp16" else None
    m = cfg.optimizer.m if cfg.optimizer.m not in (None, tr.batch_size) else None
    step_kwargs = {"m": m, "scaler": scaler, "sync_perturbation": cfg.optimizer.sync_perturbation}
    steps_per_epoch = len(data.train)
    scheduler = build_scheduler(cfg.optimizer, optimizer, steps_per_epoch, tr.epochs)

    start_epoch, global_step, history, train_time = 0, 0, [], 0.0
    state = ckpt.load_checkpoint(run_dir) if tr.checkpoint else None
    if state is not None:
        ckpt.check_config_matches(semantic_config(state["config"]), semantic_config(config), run_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device)
        start_epoch, global_step, history, train_time = state["epoch"], state["step"], state["history"], state["train_time"]
        log.info("resuming %s from epoch %d (step %d)", run_dir, start_epoch, global_step)

    bn = batchnorm_modules(model)
    bn_mode = str(config["optimizer"]["bn"])
    forward = torch.compile(model) if tr.compile else model
    rng = RngReplay(device) if cfg.optimizer.rng_replay and uses_randomness(model) else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=tr.label_smoothing)
    amp = lambda: autocast(device, precision)  # noqa: E731
    writer = _summary_writer(run_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "%s | %s (%.2fM params) | %s rho=%g | %d epochs x %d steps, batch %d | %s %s",
        cfg.dataset.name, cfg.model.arch, n_params / 1e6, cfg.optimizer.name, cfg.optimizer.rho,
        tr.epochs, steps_per_epoch, tr.batch_size, device_name(device), precision,
    )
    wall_start = time.perf_counter()
    with logging_redirect_tqdm():
        for epoch in range(start_epoch, tr.epochs):
            t0 = time.perf_counter()
            train_stats, global_step = train_one_epoch(
                forward, data.train, optimizer, scheduler, epoch, global_step, loss_fn, amp,
                bn if bn_mode == "clean" else None, bn if bn_mode == "frozen" else None, rng, tr.progress, tr.log_every_steps,
                step_kwargs, lambda step, diag: [writer.add_scalar(k, v, step) for k, v in diag.items()],
            )
            epoch_time = time.perf_counter() - t0  # train_one_epoch ends with a sync (.item())
            train_time += epoch_time
            last_epoch = epoch + 1 == tr.epochs
            evaluated = last_epoch or (epoch + 1) % tr.eval_every == 0
            eval_stats = evaluate(forward, data.test, amp) if evaluated else {"test_loss": None, "test_error": None}
            record = {
                "epoch": epoch + 1,
                "step": global_step,
                "lr": optimizer.param_groups[0]["lr"],
                **train_stats,
                **eval_stats,
                "epoch_time_s": epoch_time,
                "images_per_s": steps_per_epoch * tr.batch_size / epoch_time,
            }
            history.append(record)
            test_msg = f"test loss {record['test_loss']:.4f} err {record['test_error']:.2f}%" if evaluated else "(no test eval)"
            log.info(
                "epoch %d/%d  train loss %.4f err %.2f%%  %s  %.1fs (%.0f img/s)",
                epoch + 1, tr.epochs, record["train_loss"], record["train_error"], test_msg, epoch_time, record["images_per_s"],
            )
            for key in ("train_loss", "train_error", "test_loss", "test_error", "lr", "images_per_s"):
                if record[key] is not None:
                    writer.add_scalar(key.replace("_", "/", 1), record[key], epoch + 1)
            if cfg.optimizer.rho > 0 and not optimizer.diagnostics:  # else logged per interval (by step)
                writer.add_scalar("sam/grad_norm", optimizer.grad_norm.item(), epoch + 1)
            writer.flush()
            if tr.checkpoint:
                ckpt.save_checkpoint(run_dir, {
                    "format": 1,
                    "epoch": epoch + 1,
                    "step": global_step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rng_state(device),
                    "history": history,
                    "train_time": train_time,
                    "config": config,
                    "config_hash": chash,
                })
            write_metrics(run_dir, history)
    writer.close()

    last = history[-1]
    result = {
        "status": "complete",
        "name": cfg.name,
        "final_test_error": last["test_error"],
        "final_test_loss": last["test_loss"],
        "final_train_error": last["train_error"],
        "epochs": tr.epochs,
        "steps": global_step,
        "seed": cfg.seed,
        "config": config,
        "config_hash": chash,
        "git_commit": git_commit(),
        "versions": versions(),
        "device": device_name(device),
        "precision": precision,
        "num_params": n_params,
        "wall_time_s": time.perf_counter() - wall_start,
        "train_time_s": train_time,
        "images_per_s": global_step * tr.batch_size / train_time if train_time else None,
        "peak_memory_mb": peak_memory_mb(device),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(run_dir / RESULT_FILE, result)
    log.info("done: final test error %.2f%% -> %s", result["final_test_error"], run_dir / RESULT_FILE)
    return result


def _summary_writer(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tb"))
