"""The training step: one pass for SGD, two for SAM. This is the hot path: no host syncs."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from sam_bench.optim.bn import running_stats_frozen
from sam_bench.optim.sam import SAM


def uses_randomness(model: nn.Module) -> bool:
    """Whether the forward pass draws random numbers (dropout, shake layers, drop-path)."""
    return any(isinstance(m, _DropoutNd) or getattr(m, "stochastic", False) or type(m).__name__ == "DropPath" for m in model.modules())


class RngReplay:
    """Saves the device RNG before the first pass and rewinds it before the second, so dropout
    and shake layers draw the same numbers in both passes (the official code reuses its key)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.state: torch.Tensor | None = None

    def save(self) -> None:
        self.state = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def rewind(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(self.state, self.device)
        else:
            torch.set_rng_state(self.state)


def train_step(
    model: nn.Module,
    optimizer: SAM,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast: Callable[[], object],
    bn_modules: list[_BatchNorm] | None = None,
    rng: RngReplay | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; returns the clean-pass loss and logits (detached).

    ``bn_modules``: when given, the perturbed pass leaves their running statistics alone
    (BN mode "clean"). ``rng``: when given, the perturbed pass replays the clean pass's draws.
    """
    two_pass = optimizer.two_pass
    if two_pass and rng is not None:
        rng.save()
    with autocast():
        logits = model(images)
        loss = loss_fn(logits, labels)
    loss.backward()
    if not two_pass:
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach(), logits.detach()
    optimizer.first_step(zero_grad=True)
    if rng is not None:
        rng.rewind()
    with running_stats_frozen(bn_modules or []), autocast():
        perturbed_loss = loss_fn(model(images), labels)
    perturbed_loss.backward()
    optimizer.second_step(zero_grad=True)
    return loss.detach(), logits.detach()
