"""torch.distributed (torchrun) support: process group, rank-sharded batches, reductions.

Each rank iterates over the same global batches (same seed, same augmentation draws) and keeps
its own contiguous slice of ``batch_size / world_size`` examples, so a DDP run computes exactly
what a single process with m-sharpness m = per-rank batch computes. The preset's batch size is
the global one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from sam_bench.errors import ConfigError, SamBenchError
from sam_bench.tracking.results import WriteError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _leave_process_group() -> None:
    """At interpreter exit: shut the process group down while the interpreter still runs. Left to
    static destruction, gloo's threads were destroyed unjoined now and then ("terminate called
    without an active exception", SIGABRT) after a run had finished and written its result."""
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        atexit.register(_leave_process_group)
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def per_rank_batch(global_batch: int, info: DistInfo) -> int:
    if global_batch % info.world_size:
        raise ConfigError(
            f"trainer.batch_size={global_batch} is the global batch and must divide evenly over {info.world_size} ranks; "
            f"use a multiple of {info.world_size}"
        )
    return global_batch // info.world_size


class ShardedLoader:
    """Wraps a loader: every rank sees the same global batches and keeps its own slice."""

    def __init__(self, loader, info: DistInfo):
        self.loader, self.info = loader, info

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):  # device, labels, num_examples, ... of the wrapped loader
        return getattr(self.loader, name)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader.epoch(epoch, start_step):
            sl = rank_slice(len(labels), self.info.world_size, self.info.rank)
            yield images[sl], labels[sl]


def rank_slice(n: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous part of a batch of ``n`` (the last ranks' may be short or empty)."""
    per = -(-n // world)
    return slice(rank * per, min((rank + 1) * per, n))


def shard(loader, info: DistInfo):
    """``loader`` giving each rank its slice of every batch: wrapped in :class:`ShardedLoader`, unless
    it cuts the batches itself (``shards_by_rank``: a streamed loader reads only its own images)."""
    if loader is None or not info.enabled or getattr(loader, "shards_by_rank", False):
        return loader
    return ShardedLoader(loader, info)


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (every rank must call it at the same point)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wait_for_all_ranks(info: DistInfo, device: torch.device) -> None:
    """A barrier (as a one-element all-reduce on ``device``, which every backend has); a no-op in one process."""
    any_rank(False, info, device)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over ranks (identity in a single process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class RankFailed(WriteError):
    """Another rank failed at what it alone does (rank 0 writing the run's files): this rank stops
    with it, its message that rank's line (one line and exit status 1 from the CLI, as a WriteError)."""


@contextlib.contextmanager
def stop_together(info: DistInfo, device: torch.device) -> Iterator[None]:
    """Around what one rank does alone while the others would go on (rank 0 writing a checkpoint,
    metrics.jsonl, result.json): afterwards the ranks agree in one all-reduce whether any failed there,
    and if one did, every rank raises: that rank its own error, the others :class:`RankFailed` with
    its line. Without it the others went on into their next collective and waited there for the rank
    that had stopped: on gloo until its process was gone (then a "Connection closed by peer"
    traceback of their own), on NCCL until torchrun killed them (SIGKILL 30 s after its SIGTERM,
    which the preemption handler takes as a request to stop) or NCCL's timeout. Only rank-local work
    belongs inside: a collective that fails inside would fail this all-reduce too. In one process:
    nothing."""
    if not info.enabled:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - raised again below, once the other ranks know
        error = e
    if not any_rank(error is not None, info, device):
        return
    lines: list[str | None] = [None] * info.world_size
    dist.all_gather_object(lines, None if error is None else _one_line(error))
    if error is not None:
        raise error
    rank, line = next((r, line) for r, line in enumerate(lines) if line is not None)
    raise RankFailed(f"rank {rank} stopped the run: {line}")


def _one_line(error: Exception) -> str:
    """``error`` as the CLI prints it: our errors' own line, another's type and first line."""
    text = str(error).splitlines()[0] if str(error) else ""
    return text if isinstance(error, SamBenchError) else f"{type(error).__name__}: {text}"
