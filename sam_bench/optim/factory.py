"""Build the optimizer and LR schedule from the ``optimizer`` config group."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler

from sam_bench.optim.sam import SAM

log = logging.getLogger(__name__)


def effective_rho(opt_cfg) -> float:
    """SGD is SAM with rho = 0 whatever optimizer.rho says (so one sweep can cover both)."""
    return 0.0 if opt_cfg.name == "sgd" else float(opt_cfg.rho)


def _value(x):
    return x.value if hasattr(x, "value") else x


def param_groups(model: nn.Module, adaptive: bool) -> list[dict]:
    """One group of trainable parameters; for ASAM two, split as SamsungLabs/ASAM ``asam.py``:
    parameters whose name contains "weight" (kernels and BN scales) get T = |w| + η, the others
    (biases, BN shifts) T = 1."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not adaptive:
        return [{"params": [p for _, p in named]}]
    scaled = [p for n, p in named if "weight" in n]
    plain = [p for n, p in named if "weight" not in n]
    return [g for g in ({"params": scaled, "adaptive": True}, {"params": plain, "adaptive": False}) if g["params"]]


def build_optimizer(opt_cfg, model: nn.Module, seed: int = 0) -> SAM:
    """SAM (or SGD = SAM with rho 0) over SGD with (Nesterov) momentum, as the official code.
    ``opt_cfg``: the ``optimizer`` config (:class:`sam_bench.schema.OptimizerConfig`); every field
    is read as it stands, so its defaults are the schema's, never a second set here."""
    return SAM(
        param_groups(model, bool(opt_cfg.adaptive)),
        torch.optim.SGD,
        rho=effective_rho(opt_cfg),
        weight_decay=opt_cfg.weight_decay,
        weight_decay_mode=str(_value(opt_cfg.weight_decay_mode)),
        grad_clip=opt_cfg.grad_clip,
        adaptive=bool(opt_cfg.adaptive),
        eta=float(opt_cfg.eta),
        p=str(opt_cfg.p),
        ascent_steps=int(opt_cfg.ascent_steps),
        second_order=bool(opt_cfg.second_order),
        diagnostics=bool(opt_cfg.diagnostics),
        seed=seed,
        lr=opt_cfg.lr,
        momentum=opt_cfg.momentum,
        nesterov=opt_cfg.nesterov and opt_cfg.momentum > 0,
    )


def build_scheduler(opt_cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int) -> Scheduler | None:
    """Per-step schedule (timm), a pure function of the step: call ``step_update(step)``.

    cosine: lr·(1 + cos(π·t/T))/2 from lr to 0 over all T steps, no warmup unless asked
    (flax ``create_cosine_learning_rate_schedule`` as the official code uses).
    """
    if opt_cfg.schedule == "constant":
        return None
    warmup = int(round(opt_cfg.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(
        optimizer,
        t_initial=steps_per_epoch * epochs - warmup,
        lr_min=0.0,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        cycle_limit=1,
        t_in_epochs=False,
    )
