"""The sharpness of Table 11: max_ε L(w+ε) − L(w) at the end of training, L the error rate (%) on
the current training batch.

The paper (App. C.6) finds the inner max with the run's own ascent: k projected steps of radius ρ
(Table 11 compares k = 1, 2, 3, 5). Here ε is found that way on each batch of one more pass over
the training set (the training augmentation, a fresh epoch index), from each device's batch
(under torchrun each rank's slice, the paper's setting; on one device the run's chunks of m, or
the whole batch), with the run's ρ, p and L2 term; the figure is the mean over batches of err(w+ε) − err(w). The
model is in training mode as in training (batch statistics, dropout drawing the same numbers in
every pass), and leaves as it came: weights restored exactly, BN running statistics untouched,
base-optimizer state unused, every module's training flag and every shake layer's ``true_gradient``
as they were.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from sam_bench.engine.step import set_true_gradient
from sam_bench.optim.bn import batchnorm_modules, running_stats_frozen, set_bn_eval
from sam_bench.optim.sam import SAM


def _error_rate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) != labels).double().mean()


def _chunks(batches, m: int | None):
    """Each batch, or each chunk of ``m`` examples of it."""
    for images, labels in batches:
        if m is None or m >= len(labels):
            yield images, labels
        else:
            yield from zip(images.split(m), labels.split(m))


def estimate_sharpness(
    model: nn.Module,
    optimizer: SAM,
    batches,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    amp: Callable[[], object],
    rng=None,
    bn_frozen: bool = False,
    m: int | None = None,
) -> tuple[torch.Tensor, int]:
    """(sum over ``batches`` of err(w+ε) − err(w) in %, as a device scalar; the number of batches).
    ``rng``: the trainer's :class:`~sam_bench.engine.step.RngReplay` (None: the model draws no
    random numbers); ``bn_frozen``: BN in eval mode, as trained with ``optimizer.bn=frozen``;
    ``m``: an m-sharpness run's m: each chunk of m examples is a batch of its own (its own ε and BN
    statistics), as a device is under torchrun."""
    bn = batchnorm_modules(model)
    modes = [(module, module.training) for module in model.modules()]  # restored per module (BN frozen, ...)
    shake = [(module, module.true_gradient) for module in model.modules() if hasattr(module, "true_gradient")]
    model.train()
    if bn_frozen:
        set_bn_eval(bn)
    set_true_gradient(model, True)  # every pass here is an ascent pass (shake layers: as in training)
    total, count = None, 0
    optimizer.zero_grad()
    perturbed = False  # the weights are at w + ε between first_step and restore
    try:
        with running_stats_frozen(bn):
            for images, labels in _chunks(batches, m):
                if rng is not None:
                    rng.save()

                def forward() -> torch.Tensor:
                    if rng is not None:
                        rng.rewind()
                    with amp():
                        return model(images)

                logits = forward()
                clean = _error_rate(logits, labels)
                loss_fn(logits.float(), labels).backward()
                optimizer.first_step(zero_grad=True)
                perturbed = True
                for _ in range(optimizer.ascent_steps - 1):
                    loss_fn(forward().float(), labels).backward()
                    optimizer.ascent_step(zero_grad=True)
                with torch.no_grad():
                    gap = 100.0 * (_error_rate(forward(), labels) - clean)
                optimizer.restore()
                perturbed = False
                total = gap if total is None else total + gap
                count += 1
        optimizer.zero_grad()
    finally:  # the model as it came: its weights (also when interrupted mid-batch), each module's training flag
        if perturbed:  # and each shake layer's true_gradient
            optimizer.restore()
            optimizer.zero_grad()
        for module, training in modes:
            module.training = training
        for module, value in shake:
            module.true_gradient = value
    return (total if total is not None else torch.zeros((), dtype=torch.float64)), count
