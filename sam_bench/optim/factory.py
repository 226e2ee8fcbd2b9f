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


def build_optimizer(opt_cfg, model: nn.Module) -> SAM:
    """SAM (or SGD = SAM with rho 0) over SGD with (Nesterov) momentum, as the official code."""
    return SAM(
        [p for p in model.parameters() if p.requires_grad],
        torch.optim.SGD,
        rho=effective_rho(opt_cfg),
        weight_decay=opt_cfg.weight_decay,
        weight_decay_mode=str(opt_cfg.weight_decay_mode.value if hasattr(opt_cfg.weight_decay_mode, "value") else opt_cfg.weight_decay_mode),
        grad_clip=opt_cfg.grad_clip,
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
