"""BatchNorm handling for the two SAM passes.

The official code keeps the running statistics of the first (clean) pass and discards those of
the perturbed pass. Both passes still normalise with the statistics of the current batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_modules(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@contextmanager
def running_stats_frozen(bn_modules: list[_BatchNorm]) -> Iterator[None]:
    """Train-mode BN that normalises with batch statistics but leaves the running
    statistics and ``num_batches_tracked`` untouched (``track_running_stats=False`` in train mode
    does exactly that in PyTorch)."""
    switched = [m for m in bn_modules if m.training and m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


def set_bn_eval(bn_modules: list[_BatchNorm]) -> None:
    """BN as at test time (running statistics, no updates): the 'frozen' mode for finetuning."""
    for m in bn_modules:
        m.eval()
