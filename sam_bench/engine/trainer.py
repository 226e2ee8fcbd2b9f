"""fit / train_one_epoch / evaluate: the run orchestration around :func:`train_step`."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sam_bench.analysis.sharpness import estimate_sharpness
from sam_bench.data import DataBundle, DeviceLoader, build_data
from sam_bench.data.loader import derived_seed
from sam_bench.data.noisy import NOISE_FILE, noise_summary
from sam_bench.engine import checkpoint as ckpt
from sam_bench.engine.distributed import (
    DistInfo,
    RankFailed,
    all_reduce_sum,
    any_rank,
    init_distributed,
    per_rank_batch,
    shard,
    stop_together,
    wait_for_all_ranks,
)
from sam_bench.engine.faults import fault_point
from sam_bench.engine.precision import LossScaler, autocast, resolve_device, resolve_precision
from sam_bench.engine.rundir import (
    claim_hydra_files,
    ensure_writable,
    own_directory_hint,
    read_hydra_files,
    restore_hydra_files,
    run_lock,
    start_run_log,
)
from sam_bench.engine.signals import PreemptionHandler, Preempted
from sam_bench.engine.step import RngReplay, train_step, uses_randomness
from sam_bench.errors import CheckpointError, ConfigError, TrainingDiverged
from sam_bench.models import build_model
from sam_bench.optim import batchnorm_modules, build_optimizer, build_scheduler, effective_rho, set_bn_eval
from sam_bench.optim.sam import SAM
from sam_bench.schema import (
    COMPUTE_VERSION,
    compute_changes,
    config_hash,
    method_label,
    semantic_config,
    unversioned_warning,
    validate,
    validate_ranks,
    with_schema_defaults,
)
from sam_bench.tracking.results import (DIVERGED_FILE, METRICS_FILE, RESULT_FILE, WriteError, atomic_write_bytes, atomic_write_json,
                                        git_commit, read_divergence, read_result, versions, write_divergence, write_metrics)

log = logging.getLogger("sam_bench")


def _m_sharpness_engine(model: nn.Module, requested: str, m: int | None, batch: int, compiled: bool,
                        device: str = "cpu", compile_mode: str = "default", second_order: bool = False) -> str:
    """The m-sharpness engine this run uses ("auto" resolved for this model, its compile setting and
    device), logged once with the reason when "auto" takes vmap; a warning for a compile mode measured
    slow with it."""
    from sam_bench.optim.msam import why_vmap

    if m is None:
        return requested
    chunks = batch // m
    try:
        why = why_vmap(model, requested, chunks, compiled=compiled, device=device, second_order=second_order)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    engine = "vmap" if why else "split"
    if requested == "auto" and why:
        log.info("m-sharpness: engine auto takes vmap: %s", why)
    log.info("m-sharpness: m=%d, %d chunks per batch, engine %s (optimizer.m_engine=%s)%s", m, chunks, engine, requested,
             ("; its training steps run the compiled model" if engine == "split" else
              "; its training steps run the eager model (trainer.compile applies to evaluation)") if compiled else "")
    if engine == "split" and compiled and compile_mode == "reduce-overhead":
        log.warning("m-sharpness under trainer.compile_mode=reduce-overhead: CUDA graphs made the split engine's step "
                    "2.8x slower than compile mode default on an H200 (297 against 106 ms, WRN-28-10, "
                    "results/benchmarks.md); trainer.compile_mode=default is faster")
    return engine


def _check_sgd_ghost_bn(model: nn.Module, m: int | None, batch: int) -> None:
    """SGD (ρ = 0) with ``optimizer.m``: no ε, but BatchNorm per chunk of m examples, as the chunks of
    m-SAM (and the per-device batches of the official code, SGD baseline included) normalise."""
    if m is None:
        return
    from sam_bench.optim.chunked import ghost_batch_norm_unsupported

    why = ghost_batch_norm_unsupported(model)
    if why:
        raise ConfigError(why)
    log.info("SGD with optimizer.m=%d: BatchNorm normalises each of the %d chunks of %d examples on its own (ghost BN), "
             "as SAM's m-sharpness chunks do", m, batch // m, m)


def compile_model(net: nn.Module, mode: str) -> nn.Module:
    """``torch.compile`` with ``trainer.compile_mode`` ("default" = torch's default mode). Inductor
    caches compiled graphs on disk (FX graph and AOTAutograd caches, on by default;
    ``TORCHINDUCTOR_CACHE_DIR`` moves them), so a rerun of the same model recompiles quickly."""
    return torch.compile(net, mode=None if mode == "default" else mode)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random streams (dropout & co, SAM's random directions): ``seed``
    itself on rank 0, so one process draws what it always drew, and a hash of (seed, rank) on the
    others, which no other pair gives (``seed + rank`` gave run seed 0's rank 1 the draws of run seed
    1's rank 0)."""
    return seed if rank == 0 else derived_seed(seed, rank)


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


class FiniteGuard:
    """Watches the training loss (and SAM's ascent-gradient norm) for inf/NaN on the device.

    ``update`` runs every step without a host sync; ``check`` syncs once (at a log interval, an
    epoch end, before a checkpoint) and names the first bad step since the last check. Under
    torchrun the ranks agree in that check's one all-reduce: when any rank went non-finite, every
    rank raises (one rank alone left the others waiting in their next collective, and wrote no
    divergence record unless it was rank 0); the same all-reduce tells every rank whether any was
    asked to stop (``stop_requested``, a preemption signal): :attr:`stop`.
    """

    def __init__(self, device: torch.device, dist_info: DistInfo = DistInfo(), stop_requested: Callable[[], bool] = lambda: False):
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.good_steps = torch.zeros((), dtype=torch.long, device=device)  # finite steps since last check
        self.checked_step = 0  # global step of the last successful check
        self.last_checkpoint = "none written yet"
        self.dist_info, self.stop_requested = dist_info, stop_requested
        self.stop = False  # whether any rank was asked to stop, as of the check at step checked_step

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        finite = torch.isfinite(loss)
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm)
        self.ok.logical_and_(finite)
        self.good_steps += self.ok

    def check(self, global_step: int, epoch: int, weights: nn.Module | None = None, extra: torch.Tensor | None = None) -> list[float]:
        """Raise TrainingDiverged when the loss or gradient went non-finite since the last check (or,
        given ``weights``, when a weight or buffer of that model is non-finite); one host sync, which
        also reads ``extra`` (this rank's values, returned as a list)."""
        never = torch.full_like(self.good_steps, 2**62)
        flags = torch.stack([
            (~self.ok).long(),
            -torch.where(self.ok, never, self.good_steps),  # minus the finite steps before the first bad one
            (~_all_finite(weights)).long().to(self.ok.device) if weights is not None else torch.zeros_like(self.good_steps),
            torch.full_like(self.good_steps, int(self.dist_info.enabled and self.stop_requested())),
        ])
        if self.dist_info.enabled:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # any rank's flag; the earliest bad step
        values = flags.tolist() if extra is None else torch.cat([flags.double(), extra.detach().double().reshape(-1)]).tolist()
        bad, minus_good, bad_weights, stop = (int(v) for v in values[:4])  # read in the one host sync
        self.stop = bool(stop)
        if bad:
            raise TrainingDiverged(
                f"non-finite training loss or gradient at step {self.checked_step - minus_good + 1} (epoch {epoch + 1}); nothing "
                f"after the last good checkpoint ({self.last_checkpoint}) was saved. Lower optimizer.lr (or "
                "optimizer.grad_clip), then train into a new run directory"
            )
        if bad_weights:
            raise TrainingDiverged(
                f"non-finite weights after step {global_step} (epoch {epoch + 1}); not saved, the last good checkpoint is "
                f"{self.last_checkpoint}. Lower optimizer.lr (or optimizer.grad_clip), then train into a new run directory"
            )
        self.good_steps.zero_()
        self.checked_step = global_step
        return values[4:]


def _all_finite(model: nn.Module) -> torch.Tensor:
    """Whether every floating-point parameter and buffer of ``model`` is finite, as a device bool (no sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=next(iter(model.state_dict().values()), torch.empty(())).device)
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def new_epoch_progress(device: torch.device) -> dict[str, Any]:
    """Accumulators of a partly trained epoch: checkpointed, so a resumed epoch reports the same stats."""
    return {
        "epoch_step": 0,
        "seen": 0,
        "loss_sum": torch.zeros((), device=device),
        "correct": torch.zeros((), device=device, dtype=torch.long),
        "time_s": 0.0,
        "first_steps": 0,  # first steps of a process among this epoch's (see _FirstStepTimer)
        "first_steps_s": 0.0,  # their part of time_s
    }


def steady_images_per_s(steps: int, batch: int, time_s: float, first_steps: int = 0, first_steps_s: float = 0.0) -> float | None:
    """Training images per second of ``steps`` steps that took ``time_s``, without the ``first_steps``
    first steps of a process among them (``first_steps_s`` of the time: under trainer.compile, torch.compile
    compiles there, minutes against a step of milliseconds); over every step when no other one is left."""
    if steps > first_steps and time_s > first_steps_s:
        return (steps - first_steps) * batch / (time_s - first_steps_s)
    return steps * batch / time_s if time_s > 0 else None


def _gather_rank_rngs(optimizer: SAM, device: torch.device, dist_info: DistInfo) -> list[dict] | None:
    """Under torchrun, every rank's RNGs (dropout draws and the SAM generator differ per rank), for
    rank 0's checkpoint; None in a single process (``rng`` and the optimizer state hold them)."""
    if not dist_info.enabled:
        return None
    mine = {"rng": rng_state(device), "sam": optimizer.rng_state()}
    states: list[dict | None] = [None] * dist_info.world_size
    dist.all_gather_object(states, mine)
    return states


def _restore_rank_rngs(state: dict, optimizer: SAM, device: torch.device, dist_info: DistInfo) -> None:
    """This rank's RNGs from a checkpoint: its own entry of ``rng_ranks`` when the checkpoint has one
    per rank of this run, else the single process's."""
    ranks = state.get("rng_ranks")
    if dist_info.enabled and ranks is not None and len(ranks) == dist_info.world_size:
        set_rng_state(ranks[dist_info.rank]["rng"], device)
        if ranks[dist_info.rank]["sam"] is not None:
            optimizer.set_rng_state(ranks[dist_info.rank]["sam"], device)
    else:
        set_rng_state(state["rng"], device)


def _summed_over_ranks(progress: dict[str, Any], dist_info: DistInfo) -> dict[str, Any]:
    """A partly trained epoch's accumulators summed over ranks (every rank calls this together)."""
    loss_sum, correct = progress["loss_sum"], progress["correct"]
    sums = all_reduce_sum(torch.stack([loss_sum.double(), correct.double(),
                                       torch.tensor(float(progress["seen"]), device=loss_sum.device, dtype=torch.float64)]), dist_info)
    return {**progress, "loss_sum": sums[0].to(loss_sum.dtype), "correct": sums[1].to(correct.dtype), "seen": int(sums[2].item())}


#: TensorBoard tags of the epoch scalars that are not "<split>/<metric>" of their key
TB_TAGS = {"images_per_s": "train/images_per_s"}


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
    *,
    partial: dict[str, Any] | None = None,
    guard: FiniteGuard | None = None,
    after_step: Callable[[int, int, dict[str, Any]], None] | None = None,
    step_kwargs: dict | None = None,
    on_log: Callable[[int, dict], None] | None = None,
    dist_info: DistInfo = DistInfo(),
) -> tuple[dict[str, float], int]:
    """Train for one epoch (from ``partial['epoch_step']`` when resuming); returns (stats, global step).

    Host syncs of this loop: at every ``log_every``-th global step one, which reads the finite check
    (under torchrun the all-reduce by which the ranks agree on the check and on a preemption)
    together with the progress bar's running loss and SAM's diagnostics (``optimizer.diagnostics``:
    ``on_log`` gets their means); two at the end (the finite check, the epoch's totals). ``after_step(epoch, global_step, progress)`` runs after every step (checkpoints,
    preemption).
    """
    model.train()
    if bn_eval:
        set_bn_eval(bn_eval)
    device = loader.device
    acc = partial if partial is not None else new_epoch_progress(device)
    t0 = time.perf_counter() - acc["time_s"]
    bar = tqdm(total=len(loader), initial=acc["epoch_step"], desc=f"epoch {epoch + 1}", leave=False,
               disable=None if progress else True, dynamic_ncols=True)
    step_kwargs = step_kwargs or {}
    # under fp16 an overflowing gradient is the loss scaler's business (the step is skipped), not a divergence
    watch_grad_norm = optimizer.two_pass and step_kwargs.get("scaler") is None
    for i, (images, labels) in enumerate(loader.epoch(epoch, acc["epoch_step"]), start=acc["epoch_step"]):
        if scheduler is not None:
            scheduler.step_update(global_step)
        loss, logits = train_step(model, optimizer, images, labels, loss_fn, amp, bn_frozen_in_pass2, rng, **step_kwargs)
        acc["loss_sum"] += loss.float() * labels.numel()
        acc["correct"] += (logits.argmax(dim=1) == labels).sum()
        acc["seen"] += labels.numel()
        acc["epoch_step"] = i + 1
        global_step += 1
        if guard is not None:
            guard.update(loss, optimizer.grad_norm if watch_grad_norm else None)
        bar.update(1)
        fault_point("step")  # (tests) a signal here is one the check below, at a log interval, carries to every rank
        if global_step % log_every == 0:  # intervals of the global step: the same whatever the epoch length
            running = None if bar.disable else acc["loss_sum"] / acc["seen"]  # the progress bar's, read with the check
            diag = optimizer.take_diagnostics() if on_log is not None else None
            running_loss, diag_sums = _read_log_interval(guard, global_step, epoch, running, diag)
            if diag_sums is not None:
                on_log(global_step, optimizer.diagnostics_means(diag_sums))
            if running_loss is not None:
                bar.set_postfix(loss=f"{running_loss:.3f}")
        acc["time_s"] = time.perf_counter() - t0
        if after_step is not None:
            after_step(epoch, global_step, acc)
    bar.close()
    if guard is not None:
        guard.check(global_step, epoch)
    totals = all_reduce_sum(torch.stack([acc["loss_sum"].double(), acc["correct"].double(),
                                         torch.tensor(float(acc["seen"]), device=device, dtype=torch.float64)]), dist_info)
    loss_sum, correct, seen = totals.tolist()
    return {"train_loss": loss_sum / seen, "train_error": 100.0 * (1.0 - correct / seen)}, global_step


def _read_log_interval(guard: FiniteGuard | None, global_step: int, epoch: int, running: torch.Tensor | None,
                       diag: torch.Tensor | None) -> tuple[float | None, list[float] | None]:
    """The log interval's one host sync: the finite check (when guarded) with the running loss and
    the diagnostics' sums read along; returns (running loss, diagnostics' sums), None for either not given."""
    extra = [t.detach().double().reshape(-1) for t in (running, diag) if t is not None]
    if guard is not None:
        values = guard.check(global_step, epoch, extra=torch.cat(extra) if extra else None)
    else:
        values = torch.cat(extra).tolist() if extra else []
    running_loss = values.pop(0) if running is not None else None
    return running_loss, (values if diag is not None else None)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader, amp, dist_info: DistInfo = DistInfo()) -> dict[str, float]:
    """Test loss, error and (with more than 5 classes) top-5 error (%) over the whole split, in eval
    mode (summed over ranks under DDP)."""
    model.eval()
    device = loader.device
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, errors, top-5 errors
    classes = 0
    for images, labels in loader.epoch(0):
        with amp():
            logits = model(images)
        classes = logits.shape[1]
        missed5 = (logits.topk(min(5, classes), dim=1).indices != labels[:, None]).all(dim=1)
        sums += torch.stack([F.cross_entropy(logits.float(), labels, reduction="sum").double(),
                             (logits.argmax(dim=1) != labels).sum().double(), missed5.sum().double()])
    loss_sum, errors, errors5 = all_reduce_sum(sums, dist_info).tolist()
    n = loader.num_examples
    out = {"test_loss": loss_sum / n, "test_error": 100.0 * errors / n}
    if classes > 5:
        out["test_top5_error"] = 100.0 * errors5 / n
    return out


def fit(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train (or resume, or skip if already complete) the run described by ``cfg`` in ``run_dir``.

    Holds the run directory's lock throughout, and turns SIGTERM, SIGUSR1, SIGUSR2 or a first Ctrl-C
    (SIGINT) into a checkpoint and :class:`Preempted` (see :mod:`sam_bench.engine.signals`).
    """
    validate(cfg)
    run_dir = Path(run_dir)
    device_type = resolve_device(cfg.trainer.device).type
    dist_info = init_distributed(device_type)
    if not dist_info.is_main:
        log.setLevel(logging.WARNING)  # one log, one set of files: rank 0's
    ensure_writable(run_dir)
    with _locked_by_rank0(run_dir, dist_info, device_type), PreemptionHandler() as preempt:
        try:
            return _fit(cfg, run_dir, preempt, dist_info)
        except TrainingDiverged as e:
            if dist_info.is_main and not e.recorded:
                try:
                    write_divergence(run_dir, _run_config(cfg, dist_info)[1], str(e))
                except OSError as err:  # the divergence is the news; a full disk must not hide it
                    log.warning("could not record the divergence in %s (%s)", run_dir / DIVERGED_FILE, err.strerror or err)
            raise
        except WriteError as e:  # a full disk, say: the line the CLI prints goes to train.log too
            if not isinstance(e, RankFailed):  # rank 0's line is there already
                _log_failure(e)
            raise


def _log_failure(error: Exception) -> None:
    """Log ``error`` (into train.log under the CLI); when the disk that failed holds train.log too,
    the line is lost quietly, without logging's "--- Logging error ---" traceback."""
    raise_exceptions = logging.raiseExceptions
    logging.raiseExceptions = False
    try:
        log.error("%s", error)
    finally:
        logging.raiseExceptions = raise_exceptions


@contextlib.contextmanager
def _writing(path: Path, run_dir: Path, checkpointing: bool):
    """An OSError writing ``path`` (disk full, quota, I/O error) as :class:`WriteError`: one line
    naming the file, the cause and what re-running the command does, not a traceback."""
    try:
        yield
    except OSError as e:
        raise WriteError(ckpt.write_failure(path, e, run_dir, checkpointing)) from e


@contextlib.contextmanager
def _locked_by_rank0(run_dir: Path, dist_info: DistInfo, device_type: str):
    """Rank 0 holds the run directory's lock; under torchrun every rank learns whether it got it
    before any of them touches the directory (a second job's other ranks would otherwise go on to
    read its checkpoints and clean up its temporaries)."""
    with contextlib.ExitStack() as stack:
        refused = None
        if dist_info.is_main:
            try:
                stack.enter_context(run_lock(run_dir))
            except ConfigError as e:
                refused = e
        device = torch.device("cuda", dist_info.local_rank) if device_type == "cuda" else torch.device("cpu")  # NCCL: CUDA tensors
        if dist_info.enabled and any_rank(refused is not None, dist_info, device) and refused is None:
            raise ConfigError(f"{run_dir} is in use by another sam-bench process (rank 0 could not lock it)")
        if refused is not None:
            raise refused
        yield


def _fit(cfg: DictConfig, run_dir: Path, preempt: PreemptionHandler, dist_info: DistInfo = DistInfo()) -> dict[str, Any]:
    started = time.perf_counter()  # this process's part of the run's wall time
    main = dist_info.is_main
    if cfg.optimizer.name == "sgd" and cfg.optimizer.rho != 0:
        log.info("optimizer=sgd: optimizer.rho=%s ignored (SGD is SAM with rho=0, one pass per step)", cfg.optimizer.rho)
    cfg.optimizer.rho = effective_rho(cfg.optimizer)
    config, chash = _run_config(cfg, dist_info)
    done = _finished_or_diverged(cfg, run_dir, config, chash, main)
    if done is not None:
        return done

    tr = cfg.trainer
    device = _run_device(tr.device, dist_info)
    if any_rank(preempt.requested, dist_info, device):  # a signal noted since the CLI started (signals.catch_early)
        again = "resume" if tr.checkpoint and ckpt.checkpoint_files(run_dir) else "start"
        raise Preempted(f"stopped by {preempt.signal_name or 'a preemption signal to another rank'} before training "
                        f"began, nothing written; re-run the same command to {again}")
    run = _build_run(cfg, config, device, dist_info)
    guard = FiniteGuard(device, dist_info, stop_requested=lambda: preempt.requested)
    state = _Progress(started=started)
    with stop_together(dist_info, device):  # also a barrier: no rank reads the directory while rank 0 cleans it
        if tr.checkpoint and main:  # rank 0 alone: another rank's cleanup could delete a temporary it is writing
            ckpt.remove_stale_temporaries(run_dir)
    hydra_files = _command_files(run_dir)  # this command's, kept in the checkpoints it writes
    _resume(cfg, run_dir, run, state, guard, config, dist_info, device)
    if main:  # its checks passed: the directory's .hydra/ files are this run's now (kept for a refused command to put back)
        claim_hydra_files(run_dir)
    start_run_log(run_dir)  # and its train.log (every rank: each one's handler holds its lines until now)
    commit = git_commit()
    if not state.commits or state.commits[-1] != commit:
        state.commits.append(commit)
    noise_sha = None  # rank 0 alone writes the noise file (and the result that names its hash)
    with stop_together(dist_info, device):
        if run.data.noise is not None and main:  # after the config check: a refused resume leaves the run's own noise file alone
            noise_sha = _save_noise_file(run.data.noise, run_dir, tr.checkpoint)
    checkpoints = _Checkpointer(run_dir, tr, run, state, guard, preempt, dist_info, device,
                                {"config": config, "config_hash": chash, "labels_hash": run.labels_hash, "hydra_files": hydra_files})

    bn_mode = str(config["optimizer"]["bn"])
    forward, bn = _wrap_model(run.model, tr, dist_info, device, state.start_epoch)
    rng = RngReplay(device) if cfg.optimizer.rng_replay and uses_randomness(run.model) else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=tr.label_smoothing)
    amp = lambda: autocast(device, run.precision)  # noqa: E731
    with stop_together(dist_info, device):
        writer = _EventWriter(run_dir, state.global_step, tr.checkpoint) if main else _NullWriter()
    n_params = sum(p.numel() for p in run.model.parameters())
    data, optimizer = run.data, run.optimizer
    steps_per_epoch = len(data.train)
    log.info(
        "%s | %s (%.2fM params) | %s rho=%g | %d epoch%s x %d steps, batch %d | %s %s",
        cfg.dataset.name, cfg.model.arch, n_params / 1e6, method_label(cfg.optimizer), effective_rho(cfg.optimizer),
        tr.epochs, "" if tr.epochs == 1 else "s", steps_per_epoch, tr.batch_size, device_name(device), run.precision,
    )
    first_step = _FirstStepTimer(device, checkpoints.after_step, state.partial)
    with logging_redirect_tqdm():
        for epoch in range(state.start_epoch, tr.epochs):
            acc, state.partial = state.partial or new_epoch_progress(data.train.device), None  # the epoch's accumulators
            t0 = time.perf_counter() - acc["time_s"]
            train_stats, state.global_step = train_one_epoch(
                forward, data.train, optimizer, run.scheduler, epoch, state.global_step, loss_fn, amp,
                bn if bn_mode == "clean" else None, bn if bn_mode == "frozen" else None, rng, tr.progress, tr.log_every_steps,
                partial=acc, guard=guard, after_step=first_step, step_kwargs=run.step_kwargs, dist_info=dist_info,
                on_log=lambda step, diag: [writer.add_scalar(k, v, step) for k, v in diag.items()],
            )
            epoch_time = time.perf_counter() - t0  # train_one_epoch ends with a sync (.tolist())
            state.train_time += epoch_time
            state.first_steps += acc["first_steps"]
            state.first_steps_time += acc["first_steps_s"]
            last_epoch = epoch + 1 == tr.epochs
            evaluated = last_epoch or (epoch + 1) % tr.eval_every == 0
            eval_stats = evaluate(forward, data.test, amp, dist_info) if evaluated else {"test_loss": None, "test_error": None}
            if data.val is not None:  # held-out split every epoch (model selection); test stays for the report
                eval_stats.update({k.replace("test_", "val_"): v for k, v in evaluate(forward, data.val, amp, dist_info).items()})
            record = {
                "epoch": epoch + 1,
                "step": state.global_step,
                "lr": optimizer.param_groups[0]["lr"],
                **train_stats,
                **eval_stats,
                "epoch_time_s": epoch_time,
                "images_per_s": steady_images_per_s(steps_per_epoch, tr.batch_size, epoch_time, acc["first_steps"],
                                                    acc["first_steps_s"]),
            }
            state.history.append(record)
            _log_epoch(writer, record, tr.epochs, evaluated, optimizer, last_epoch, cfg.optimizer.rho)
            writer.flush()  # before the checkpoint (a kill after it would lose the epoch's events); a failure waits
            due = last_epoch or (epoch + 1) % tr.checkpoint_every_epochs == 0 or (epoch + 1) in tr.keep_epochs
            written = checkpoints.save(epoch + 1, state.global_step, None) if tr.checkpoint and due else None
            with stop_together(dist_info, device):
                if main:
                    with _writing(run_dir / METRICS_FILE, run_dir, tr.checkpoint):
                        write_metrics(run_dir, state.history)
                writer.raise_failure()  # a TensorBoard write error, now that the epoch's checkpoint and metrics are written
            if not last_epoch:  # after the last one, finishing (result.json) is quicker than stopping
                checkpoints.stop_if_preempted(epoch + 1, state.global_step, None, written)
    with stop_together(dist_info, device):
        writer.close()
        if main and state.start_epoch >= tr.epochs:  # killed between the last checkpoint and metrics.jsonl: resumed to here
            with _writing(run_dir / METRICS_FILE, run_dir, tr.checkpoint):
                write_metrics(run_dir, state.history)
    sharpness = _final_sharpness(cfg, run.model, optimizer, data.train, loss_fn, amp, rng, bn_mode, dist_info, run.m) \
        if tr.final_sharpness else None

    noise_stats = {}
    if data.noise is not None:
        fitted = 100.0 - evaluate(forward, data.noisy_train, amp, dist_info)["test_error"] if data.noisy_train is not None else None
        noise_stats = noise_summary(state.history, fitted, data.noise, noise_sha)
    result = {**_result_record(cfg, run, state, config, chash, commit, sharpness, n_params, device), **noise_stats}
    with stop_together(dist_info, device):  # every rank's exit status says whether the result was written
        if main:
            with _writing(run_dir / RESULT_FILE, run_dir, tr.checkpoint):
                atomic_write_json(run_dir / RESULT_FILE, result)
            (run_dir / DIVERGED_FILE).unlink(missing_ok=True)  # an earlier config's record (this one completed)
    log.info("done: final test error %.2f%% -> %s", result["final_test_error"], run_dir / RESULT_FILE)
    return result


def _finished_or_diverged(cfg: DictConfig, run_dir: Path, config: dict, chash: str, main: bool) -> dict[str, Any] | None:
    """The run's result when ``run_dir`` holds this config's finished run (nothing to do), else None;
    refuses (CheckpointError) another config's finished result when no checkpoint decides, and
    (TrainingDiverged) a config that diverged there before."""
    done = read_result(run_dir)
    if done is not None and done.get("config_hash") != chash and isinstance(done.get("config"), dict) \
            and (not cfg.trainer.checkpoint or not ckpt.checkpoint_files(run_dir)):
        # no checkpoint to compare with (deleted to free space), or none read (trainer.checkpoint=false): the
        # result's config decides, so another config's finished run is never overwritten
        try:
            _check_resumable(done["config"], config, run_dir, what="the finished result (result.json)",
                             versioned="compute_version" in done)
        except CheckpointError:
            if main:
                _restore_hydra_config(run_dir, done["config"], {})
            raise
        done = {**done, "config_hash": chash}  # an older version's record of this very config
    if done is not None and done.get("config_hash") == chash:
        log.info("%s is complete (final test error %.2f%%); nothing to do", run_dir, done["final_test_error"])
        return done
    diverged = read_divergence(run_dir)
    if diverged is not None and diverged.get("config_hash") == chash:  # deterministic: it would diverge again
        raise TrainingDiverged(f"this config diverged in {run_dir} before ({str(diverged.get('error')).split(';')[0]}); "
                               f"delete the run directory to train it again, or change optimizer.lr or optimizer.grad_clip",
                               recorded=True)
    return None


def _run_device(requested: str, dist_info: DistInfo) -> torch.device:
    """``trainer.device`` resolved; under torchrun on CUDA, this rank's GPU."""
    device = resolve_device(requested)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    return device


@dataclass
class _Run:
    """What a run trains, built from its config (this rank's part under torchrun)."""

    data: DataBundle
    model: nn.Module
    optimizer: SAM
    scaler: LossScaler | None
    scheduler: Any
    step_kwargs: dict[str, Any]  # train_step's m-sharpness, scaler and perturbation-sync settings
    m: int | None  # optimizer.m when it splits this rank's batch, else None
    precision: str
    labels_hash: str  # of the training labels: catches a changed label-noise file on resume


def _build_run(cfg: DictConfig, config: dict, device: torch.device, dist_info: DistInfo) -> _Run:
    """Threads, determinism and seeds set; data, model, optimizer, loss scaler, schedule and the
    step's keyword arguments built (each rank its slice of the batches and its own generator)."""
    tr = cfg.trainer
    validate_ranks(cfg, dist_info.world_size)
    rank_batch = per_rank_batch(tr.batch_size, dist_info)
    precision = resolve_precision(tr.precision, device)
    if tr.num_threads is not None:
        torch.set_num_threads(tr.num_threads)
    if tr.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.use_deterministic_algorithms(tr.deterministic)
    seed_everything(rank_seed(cfg.seed, dist_info.rank))  # dropout & co differ per rank; DDP broadcasts rank 0's weights
    channels_last = tr.channels_last and device.type == "cuda"
    data: DataBundle = build_data(cfg.dataset, tr.batch_size, tr.eval_batch_size, device, cfg.seed, channels_last)
    # same global batches on every rank, each keeps its slice
    data.train, data.test, data.val, data.noisy_train = (shard(x, dist_info) for x in (data.train, data.test, data.val, data.noisy_train))
    model = build_model(cfg.model.arch, data.num_classes, data.in_chans, **cfg.model.kwargs).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # each rank its own generator (optimizer.p=random: every device draws its own direction)
    optimizer = build_optimizer(cfg.optimizer, model, seed=rank_seed(cfg.seed, dist_info.rank))
    scaler = LossScaler(device) if precision == "fp16" else None
    m = cfg.optimizer.m if cfg.optimizer.m not in (None, rank_batch) else None
    if optimizer.two_pass:
        m_engine = _m_sharpness_engine(model, str(config["optimizer"]["m_engine"]), m, rank_batch, tr.compile, device.type,
                                       str(tr.compile_mode), optimizer.second_order)
    else:
        m_engine = None
        _check_sgd_ghost_bn(model, m, rank_batch)
    step_kwargs = {"m": m, "m_engine": m_engine, "scaler": scaler, "sync_perturbation": cfg.optimizer.sync_perturbation}
    scheduler = build_scheduler(cfg.optimizer, optimizer, len(data.train), tr.epochs)
    return _Run(data, model, optimizer, scaler, scheduler, step_kwargs, m, precision, ckpt.content_digest(data.train.labels))


@dataclass
class _Progress:
    """Where training stands: from the start, or as a checkpoint left it (resumed); updated as it goes."""

    start_epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    train_time: float = 0.0
    partial: dict[str, Any] | None = None  # a partly trained epoch's accumulators (new_epoch_progress)
    commits: list = field(default_factory=list)  # the code versions this run trained with, oldest first (a resume may bring a newer one)
    first_steps: int = 0  # the first steps of a process among the completed epochs' (_FirstStepTimer) ...
    first_steps_time: float = 0.0  # ... and their part of train_time
    earlier_wall_time: float = 0.0  # the wall time of the run's earlier processes, each up to its last checkpoint
    started: float = 0.0  # time.perf_counter() when this process began the run (not checkpointed)

    def wall_time(self) -> float:
        """The run's wall time so far: the earlier processes' (as their last checkpoint recorded it) and this one's."""
        return self.earlier_wall_time + self.process_wall_time()

    def process_wall_time(self) -> float:
        return time.perf_counter() - self.started


def _resume(cfg: DictConfig, run_dir: Path, run: _Run, state: _Progress, guard: FiniteGuard, config: dict,
            dist_info: DistInfo, device: torch.device) -> None:
    """Restore ``run`` and ``state`` from ``run_dir``'s newest verified checkpoint, if any (refusing
    another config's, as under ``trainer.checkpoint=false``, which reads none to resume from)."""
    tr, main = cfg.trainer, dist_info.is_main
    loaded = ckpt.load_checkpoint(run_dir) if tr.checkpoint else None
    if not tr.checkpoint:  # nothing is resumed, but another config's run there is refused all the same
        _refuse_another_runs_checkpoint(run_dir, config, run.labels_hash, main)
    if loaded is None:
        return
    saved, path = loaded
    _check_same_run(saved, path, config, run.labels_hash, run_dir, main, resuming=True)
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    if run.scaler is not None and saved.get("scaler") is not None:
        run.scaler.load_state_dict(saved["scaler"])
    _restore_rank_rngs(saved, run.optimizer, device, dist_info)
    state.start_epoch, state.global_step, state.history, state.train_time = saved["epoch"], saved["step"], saved["history"], saved["train_time"]
    state.commits = list(saved.get("git_commits") or [])
    # recorded since 2026-11-29: an older checkpoint's processes count as 0 s, and their first steps are not known
    state.earlier_wall_time = saved.get("wall_time", 0.0)
    state.first_steps, state.first_steps_time = saved.get("first_steps", 0), saved.get("first_steps_time", 0.0)
    if saved.get("partial") is not None:
        partial = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in saved["partial"].items()}
        partial = {"first_steps": 0, "first_steps_s": 0.0, **partial}  # not in an older checkpoint's: none known
        if dist_info.rank != 0:  # the checkpoint holds the sums over ranks: rank 0 carries them
            partial.update(seen=0, loss_sum=torch.zeros_like(partial["loss_sum"]), correct=torch.zeros_like(partial["correct"]))
        state.partial = partial
    guard.checked_step = state.global_step
    guard.last_checkpoint = f"{path}, step {state.global_step}"
    wait_for_all_ranks(dist_info, device)  # every rank has read the checkpoint before rank 0 renames files
    with stop_together(dist_info, device):
        if main:
            path = ckpt.complete_rotation(run_dir, path)
            ckpt.set_aside_damaged_newest(run_dir, path)
            with _writing(run_dir / METRICS_FILE, run_dir, tr.checkpoint):
                write_metrics(run_dir, state.history)  # a kill between the checkpoint and its metrics.jsonl left that a line short
    if state.start_epoch >= tr.epochs:
        log.info("%s holds the finished training (epoch %d of %d); writing its result", path, state.start_epoch, tr.epochs)
    else:
        log.info("resuming %s from epoch %d step %d (global step %d)", run_dir, state.start_epoch + 1,
                 state.partial["epoch_step"] if state.partial else 0, state.global_step)


def _save_noise_file(noise, run_dir: Path, checkpointing: bool) -> str:
    """Write the run's label-noise record; returns its sha256 (named in the result)."""
    with _writing(run_dir / NOISE_FILE, run_dir, checkpointing):
        noise_file, noise_sha = noise.save(run_dir)
    log.info("label noise %s %.0f%% (seed %d): realised %.2f%% -> %s sha256 %s", noise.mode, 100 * noise.rate,
             noise.seed, 100 * noise.realised_rate, noise_file.name, noise_sha[:12])
    return noise_sha


class _Checkpointer:
    """The run's checkpoints: :meth:`save` (the full state; rank 0 writes it), :meth:`stop_if_preempted`
    and :meth:`after_step`, train_one_epoch's hook (preemption, mid-epoch checkpoints)."""

    def __init__(self, run_dir: Path, tr: DictConfig, run: _Run, state: _Progress, guard: FiniteGuard,
                 preempt: PreemptionHandler, dist_info: DistInfo, device: torch.device, identity: dict[str, Any]):
        self.run_dir, self.tr, self.run, self.state, self.guard = run_dir, tr, run, state, guard
        self.preempt, self.dist_info, self.device = preempt, dist_info, device
        self.identity = identity  # config, config_hash, labels_hash, hydra_files: what every checkpoint says of the run

    def save(self, epoch_done: int, step: int, progress: dict[str, Any] | None) -> Path:
        """Checkpoint the full state; refuses (TrainingDiverged) to write non-finite weights."""
        run, dist_info = self.run, self.dist_info
        epoch = epoch_done if progress is not None else epoch_done - 1  # 0-based epoch being trained
        self.guard.check(step, epoch, weights=run.model)  # the loss, the gradient and the weights (on every rank)
        if progress is not None and dist_info.enabled:  # the epoch's running stats over all ranks
            progress = _summed_over_ranks(progress, dist_info)
        ranks_rng = _gather_rank_rngs(run.optimizer, self.device, dist_info)
        with stop_together(dist_info, self.device):  # rank 0 writes; the others hold the same state
            path = self._write(epoch_done, step, progress, ranks_rng) if dist_info.is_main else self.run_dir / ckpt.CHECKPOINT
        return path

    def _write(self, epoch_done: int, step: int, progress: dict[str, Any] | None, ranks_rng: list[dict] | None) -> Path:
        """Rank 0's part of :meth:`save`: the checkpoint file."""
        run, tr = self.run, self.tr
        keep = ckpt.kept_name(epoch_done) if progress is None and epoch_done in tr.keep_epochs else None
        path = ckpt.save_checkpoint(self.run_dir, {
            "epoch": epoch_done,  # completed epochs
            "step": step,
            "partial": None if progress is None else {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in progress.items()},
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "rng": rng_state(self.device),
            "rng_ranks": ranks_rng,
            "history": self.state.history,
            "train_time": self.state.train_time,
            "first_steps": self.state.first_steps,
            "first_steps_time": self.state.first_steps_time,
            "wall_time": self.state.wall_time(),
            "config": self.identity["config"],
            "config_hash": self.identity["config_hash"],
            "labels_hash": self.identity["labels_hash"],
            "hydra_files": self.identity["hydra_files"],
            "git_commits": self.state.commits,
            "compute_version": COMPUTE_VERSION,
        }, keep_as=keep)
        if keep:
            log.info("epoch %d's checkpoint kept as %s", epoch_done, self.run_dir / keep)
        self.guard.last_checkpoint = f"{path}, step {step}"
        return path

    def stop_if_preempted(self, epoch_done: int, step: int, progress: dict[str, Any] | None, written: Path | None = None) -> None:
        """Checkpoint and stop if a preemption signal came; ``written``: this state's checkpoint was
        just saved (the epoch end), so it is not written again (that would rotate the previous
        epoch's fallback away)."""
        tr, preempt, guard = self.tr, self.preempt, self.guard
        if self.dist_info.enabled:  # all ranks stop at the same step: agree at log intervals and epoch ends
            if progress is not None and step % tr.log_every_steps:
                return
            # at a log interval the finite check's all-reduce (just done, in train_one_epoch) told whether any rank was asked
            agreed = guard.stop if progress is not None and guard.checked_step == step else \
                any_rank(preempt.requested, self.dist_info, self.device)
            if not agreed:
                return
        elif not preempt.requested:
            return
        if written is None and tr.checkpoint:
            written = self.save(epoch_done, step, progress)
        where = f"{written} written" if tr.checkpoint else "not written (trainer.checkpoint=false)"
        again = "re-run the same command to resume" if tr.checkpoint else "a re-run starts over from epoch 1"
        by = preempt.signal_name or "a preemption signal to another rank"  # under torchrun one rank may have got it
        stopped = f"stopped by {by} at step {step}; checkpoint {where}; {again}"
        log.warning("preempted: %s", stopped)  # in train.log too, between the last epoch line and the resume's
        raise Preempted(stopped)

    def after_step(self, epoch: int, step: int, progress: dict[str, Any]) -> None:
        self.stop_if_preempted(epoch, step, progress)
        every = self.tr.checkpoint_every_steps
        if self.tr.checkpoint and every and step % every == 0 and progress["epoch_step"] < len(self.run.data.train):
            self.save(epoch, step, progress)  # mid-epoch recovery point (the epoch end writes its own)


class _FirstStepTimer:
    """train_one_epoch's ``after_step`` hook (``then``, the checkpointer's, runs after it): times this
    process's first training step into the epoch's accumulators (``first_steps``, ``first_steps_s``), for
    the throughput figures to leave out. torch.compile compiles its graphs in that step (minutes for a
    large model, against milliseconds a step); caches and allocators warm up there too. It reads the
    epoch clock train_one_epoch keeps (``time_s``) and waits once, in that first step only, for the
    device to finish it: no cost in any later step but one test."""

    def __init__(self, device: torch.device, then: Callable[[int, int, dict[str, Any]], None], partial: dict[str, Any] | None):
        self.device, self.then = device, then
        self.clock_at_start: float | None = partial["time_s"] if partial else 0.0  # the epoch clock as this process begins

    def __call__(self, epoch: int, step: int, progress: dict[str, Any]) -> None:
        if self.clock_at_start is not None:
            entered = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the step's queued kernels belong to it
            step_s = progress["time_s"] - self.clock_at_start + time.perf_counter() - entered
            progress["first_steps"] += 1
            progress["first_steps_s"] += step_s
            self.clock_at_start = None
        self.then(epoch, step, progress)


def _wrap_model(model: nn.Module, tr: DictConfig, dist_info: DistInfo, device: torch.device, start_epoch: int
                ) -> tuple[nn.Module, list]:
    """The module the steps run (DDP, SyncBatchNorm, torch.compile as configured) and the BatchNorm
    modules that run in it."""
    net = model
    if dist_info.enabled:
        if tr.sync_bn:
            if device.type != "cuda":
                raise ConfigError("trainer.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm runs on GPUs only); set trainer.sync_bn=false")
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # replaces model's BN modules in place
        # BN statistics stay per rank as in the official code (the step averages the running stats)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None, **_no_buffer_sync())
    bn = batchnorm_modules(model)  # after the SyncBatchNorm conversion: the modules that run
    forward = compile_model(net, tr.compile_mode) if tr.compile else net
    if tr.compile:
        log.info("torch.compile (mode %s): the first training step and the first evaluation compile their graphs "
                 "(minutes for a large model; Inductor's on-disk cache shortens reruns); epoch %d's time includes it, "
                 "the images/s figures leave that step out",
                 tr.compile_mode, start_epoch + 1)
    return forward, bn


def _log_epoch(writer, record: dict[str, Any], epochs: int, evaluated: bool, optimizer: SAM, last_epoch: bool, rho: float) -> None:
    """The epoch's line in the log and its scalars in TensorBoard."""
    test_msg = f"test loss {record['test_loss']:.4f} err {record['test_error']:.2f}%" if evaluated else "(no test eval)"
    if record.get("val_error") is not None:
        test_msg += f"  val err {record['val_error']:.2f}%"
    log.info(
        "epoch %d/%d  train loss %.4f err %.2f%%  %s  %.1fs (%.0f img/s)",
        record["epoch"], epochs, record["train_loss"], record["train_error"], test_msg, record["epoch_time_s"], record["images_per_s"],
    )
    # x-axis: the global step, as the per-interval SAM diagnostics, so that a resume can hide (purge_step)
    # whatever a killed run had written past its checkpoint; `epoch` maps steps to epochs
    step = record["step"]
    writer.add_scalar("epoch", record["epoch"], step)
    for key in ("train_loss", "train_error", "test_loss", "test_error", "test_top5_error", "val_loss", "val_error",
                "val_top5_error", "lr", "images_per_s"):
        if record.get(key) is not None:
            writer.add_scalar(TB_TAGS.get(key, key.replace("_", "/", 1)), record[key], step)
    if last_epoch and optimizer.diagnostics:  # the last, partial log interval's means
        for k, v in optimizer.read_diagnostics().items():
            writer.add_scalar(k, v, step)
    if rho > 0 and not optimizer.diagnostics:  # else logged per interval (by step)
        writer.add_scalar("sam/grad_norm", optimizer.grad_norm.item(), step)


def _result_record(cfg: DictConfig, run: _Run, state: _Progress, config: dict, chash: str, commit: str | None,
                   sharpness: float | None, n_params: int, device: torch.device) -> dict[str, Any]:
    """result.json's content (the label-noise summary aside)."""
    tr, data, last = cfg.trainer, run.data, state.history[-1]
    return {
        "status": "complete",
        "name": cfg.name,
        "final_test_error": last["test_error"],
        "final_test_loss": last["test_loss"],
        "final_train_error": last["train_error"],
        **{f"final_{k}": last[k] for k in ("test_top5_error", "val_error", "val_loss", "val_top5_error") if last.get(k) is not None},
        **({"final_sharpness": sharpness} if sharpness is not None else {}),
        "epochs": tr.epochs,
        "steps": state.global_step,
        # the images each split held (the test error is over all of test_images): a half-prepared folder shows here
        "train_images": data.train.num_examples,
        "test_images": data.test.num_examples,
        **({"val_images": data.val.num_examples} if data.val is not None else {}),
        "seed": cfg.seed,
        "config": config,
        "config_hash": chash,
        "git_commit": commit,
        "git_commits": state.commits,  # every version that trained part of it, when a resume ran newer code
        "compute_version": COMPUTE_VERSION,
        "versions": versions(),
        "device": device_name(device),
        "precision": run.precision,
        "num_params": n_params,
        "wall_time_s": state.wall_time(),  # every process of the run, each earlier one up to its last checkpoint
        "wall_time_last_process_s": state.process_wall_time(),
        "train_time_s": state.train_time,
        "first_step_time_s": state.first_steps_time,  # each process's first step (compiling, with trainer.compile)
        "images_per_s": steady_images_per_s(state.global_step, tr.batch_size, state.train_time, state.first_steps,
                                            state.first_steps_time),
        "peak_memory_mb": peak_memory_mb(device),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _run_config(cfg: DictConfig, dist_info: DistInfo) -> tuple[dict[str, Any], str]:
    """The run's config as a plain dict (with the number of ranks under torchrun: it sets SAM's m)
    and its hash, which identifies the run (resume, result, divergence record)."""
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if dist_info.world_size > 1:  # the ranks set SAM's m (the per-rank batch): part of what the run computes
        config["ranks"] = dist_info.world_size
    return config, config_hash(config)


#: Hydra's records of the command line a job ran with (besides config.yaml, rebuilt from the config)
COMMAND_FILES = ("overrides.yaml", "hydra.yaml")


def _command_files(run_dir: Path) -> dict[str, str]:
    """The text of each of ``.hydra/``'s :data:`COMMAND_FILES` that exists."""
    return {name: data.decode() for name, data in read_hydra_files(run_dir).items() if name in COMMAND_FILES and data is not None}


def _check_resumable(saved: dict, config: dict, run_dir: Path, what: str, versioned: bool) -> None:
    """Refuse (CheckpointError naming the keys) when ``saved``, the config of ``what`` in ``run_dir``,
    is another experiment than ``config``. Keys that a newer version added and the saved config
    lacks count as their schema default, so upgrading sam-bench does not strand a run. ``ranks``
    (torchrun's process count, which sets SAM's m) is 1 where a config lacks it, for files that
    record a compute_version (``versioned``); older files did not say, and are not compared on it."""
    current, before = semantic_config(config), semantic_config(with_schema_defaults(saved))
    if versioned or "ranks" in saved:
        ranks_then, ranks_now = before.get("ranks", 1), current.get("ranks", 1)
        others_equal = {k: v for k, v in before.items() if k != "ranks"} == {k: v for k, v in current.items() if k != "ranks"}
        if ranks_then != ranks_now and others_equal:
            raise CheckpointError(
                f"{run_dir} holds {what} trained by {ranks_then} process(es) and this command runs {ranks_now}: the number "
                "of ranks sets SAM's m (each perturbs with its own batch); re-run it as it was launched ("
                + (f"torchrun --nproc_per_node={ranks_then} ..." if ranks_then > 1 else "without torchrun")
                + f"), or give this one its own directory ({own_directory_hint()})")
        before["ranks"], current["ranks"] = ranks_then, ranks_now
    else:
        current.pop("ranks", None)
    ckpt.check_config_matches(before, current, run_dir, what)


def _refuse_another_runs_checkpoint(run_dir: Path, config: dict, labels_hash: str, main: bool) -> None:
    """Under ``trainer.checkpoint=false`` (which neither resumes nor writes checkpoints): refuse, as a
    resume would, when ``run_dir``'s checkpoint is another config's or was trained on other labels,
    so that the run this command overwrites (metrics.jsonl, result.json, tb/) is its own."""
    try:
        loaded = ckpt.load_checkpoint(run_dir)
    except CheckpointError:  # none readable: nothing to compare with (result.json, when there is one, was)
        return
    if loaded is not None:
        _check_same_run(*loaded, config, labels_hash, run_dir, main, resuming=False)


def _check_same_run(state: dict, path: Path, config: dict, labels_hash: str, run_dir: Path, main: bool, resuming: bool) -> None:
    """Refuse (CheckpointError) when the checkpoint ``state`` read from ``path`` is another config's
    run, one trained on other labels, or (``resuming``) one that older code computed otherwise; the
    refused command's ``.hydra/`` files are put back first."""
    try:
        _check_resumable(state["config"], config, run_dir, what="a checkpoint", versioned="compute_version" in state)
        if resuming:
            _check_compute_version(state.get("compute_version"), path, config)
        if state.get("labels_hash", labels_hash) != labels_hash:
            raise CheckpointError(f"{path} was trained on different training labels (dataset files or label-noise settings "
                                  "changed); restore them or train into a new run directory")
    except CheckpointError:
        if main:
            _restore_hydra_config(run_dir, state["config"], state.get("hydra_files") or {})
        raise


def _check_compute_version(saved: int | None, path: Path, config: dict) -> None:
    """Refuse to continue a checkpoint whose code computed this config otherwise: a change of
    :data:`sam_bench.schema.COMPUTE_CHANGES` after its version that concerns this config. A checkpoint
    from before the number (None) is taken as version 2, and warned about the padding change (2),
    which it may or may not predate."""
    if saved is not None and saved > COMPUTE_VERSION:
        raise CheckpointError(f"{path} was written by a newer sam-bench (compute_version {saved}, this code {COMPUTE_VERSION}); "
                              "resume it with that version")
    changes = compute_changes(config, since=2 if saved is None else saved)
    if changes:
        raise CheckpointError(
            f"{path} was trained by code that computed this config otherwise (its compute_version: "
            f"{'none recorded, before 2026-11-29' if saved is None else saved}; this code {COMPUTE_VERSION}: "
            f"{'; '.join(changes)}): resuming would mix the two; finish it with the sam-bench that wrote it (its git "
            "commit) or train into a new run directory")
    if saved is None:
        log.warning("%s: the resumed run may mix two computations; train into a new run directory to be sure", unversioned_warning(path))


def _restore_hydra_config(run_dir: Path, config: dict, files: dict[str, str]) -> None:
    """Hydra rewrote ``.hydra/`` with the refused command's files before the trainer ran: put them
    back as they were (:func:`~sam_bench.engine.rundir.restore_hydra_files`: as the CLI noted them, or
    as the run that owns the directory recorded them), else (a directory of an older version, outside
    a single run) the config the directory's run was trained with (the report names an unfinished run
    from config.yaml) and, when ``files`` holds them (a checkpoint's, those written since they were
    added), the command line files of the command that wrote it."""
    hydra_dir = Path(run_dir) / ".hydra"
    if not hydra_dir.is_dir() or restore_hydra_files(run_dir):
        return
    atomic_write_bytes(hydra_dir / "config.yaml",
                       OmegaConf.to_yaml(OmegaConf.create({k: v for k, v in config.items() if k != "ranks"})).encode())
    for name in COMMAND_FILES:
        if name in files:
            atomic_write_bytes(hydra_dir / name, files[name].encode())


def _final_sharpness(cfg, model, optimizer, train, loss_fn, amp, rng, bn_mode: str, dist_info: DistInfo,
                     m: int | None) -> float | None:
    """Table 11's sharpness (:mod:`sam_bench.analysis.sharpness`) over one more epoch of training
    batches, each rank on its own slice with its own ε (the raw model: no gradient all-reduce), or
    each chunk of m examples in an m-sharpness run on one device."""
    if not optimizer.two_pass:
        log.info("trainer.final_sharpness: skipped, rho = 0 (SGD) has no perturbation to measure")
        return None
    t0 = time.perf_counter()
    total, count = estimate_sharpness(model, optimizer, train.epoch(cfg.trainer.epochs), loss_fn, amp, rng, bn_mode == "frozen", m)
    device = next(model.parameters()).device
    total, count = all_reduce_sum(torch.stack([total.to(device, torch.float64), torch.tensor(float(count), device=device, dtype=torch.float64)]),
                                  dist_info).tolist()
    sharpness = total / count
    log.info("sharpness max_eps err(w+eps) - err(w) = %.3f%% (rho %g, %d ascent step(s), %d device batches, %.0fs)", sharpness,
             cfg.optimizer.rho, optimizer.ascent_steps, int(count), time.perf_counter() - t0)
    return sharpness


def _no_buffer_sync() -> dict[str, bool]:
    """DDP keyword that stops the per-forward buffer broadcast (renamed in recent torch)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class _NullWriter:
    """The event writer of ranks other than 0: logs nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def raise_failure(self) -> None:
        pass

    def close(self) -> None:
        pass


class _EventWriter:
    """TensorBoard's SummaryWriter under ``<run dir>/tb``, whose write errors wait: the first one (a
    full disk; TensorBoard's writer thread reports it at a later call) stops further events and is
    raised, as :class:`WriteError`, by :meth:`raise_failure`, which the epoch loop calls once the
    epoch's checkpoint is written, or by :meth:`close`. A TensorBoard failure never costs the epoch."""

    def __init__(self, run_dir: Path, resumed_at: int, checkpointing: bool):
        self.run_dir, self.path, self.checkpointing = run_dir, run_dir / "tb", checkpointing
        self.error: OSError | None = None
        _quiet_event_writer_thread()
        with _writing(self.path, run_dir, checkpointing):
            self.writer = _summary_writer(run_dir, resumed_at)

    def _call(self, method: str, *args, **kwargs) -> None:
        if self.error is None:
            try:
                getattr(self.writer, method)(*args, **kwargs)
            except OSError as e:
                self.error = e

    def add_scalar(self, *args, **kwargs) -> None:
        self._call("add_scalar", *args, **kwargs)

    def flush(self) -> None:
        self._call("flush")

    def raise_failure(self) -> None:
        if self.error is not None:
            raise WriteError(ckpt.write_failure(self.path, self.error, self.run_dir, self.checkpointing)) from self.error

    def close(self) -> None:
        self._call("close")
        self.raise_failure()


def _quiet_event_writer_thread() -> None:
    """TensorBoard's writer thread dies of a write error with a traceback on stderr, and hands the
    error on to the next call, which :class:`_EventWriter` reports in one line: keep the thread's
    traceback for errors other than OSError."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "sam_bench", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook.sam_bench = True
    threading.excepthook = hook


def _summary_writer(run_dir: Path, resumed_at: int):
    """TensorBoard's writer; resuming after step ``resumed_at`` hides the events a killed run had
    written past its checkpoint (``purge_step``), which the resumed run writes again; so does a run
    that starts over where events are already (killed before its first checkpoint, or
    ``trainer.checkpoint=false``)."""
    from torch.utils.tensorboard import SummaryWriter

    tb = run_dir / "tb"
    earlier = resumed_at or any(tb.glob("*tfevents*"))
    return SummaryWriter(log_dir=str(tb), purge_step=resumed_at + 1 if earlier else None)
