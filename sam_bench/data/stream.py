"""A loader for datasets too large to live on the device (ImageNet, the finetuning sets).

Workers decode and augment images into uint8 tensors (4x less to copy than float), batches move
to the device through pinned memory and are normalised there. The iteration interface is
:class:`~sam_bench.data.loader.DeviceLoader`'s (``epoch(epoch, start_step)``, ``__len__``,
``num_examples``, ``device``), so the trainer does not care which one it gets. Under
torch.distributed each rank reads its shard through a ``DistributedSampler``.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from sam_bench.data.gpu_augment import normalize
from sam_bench.data.loader import derived_seed
from sam_bench.errors import DataError


class _SkipSampler(Sampler[int]):
    """A DistributedSampler for one epoch, starting ``skip`` indices in (resume mid-epoch)."""

    def __init__(self, inner: DistributedSampler, skip: int):
        self.inner, self.skip = inner, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


def _collate_bytes(batch: Sequence) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch], dtype=torch.int64)


def _one_line(e: Exception) -> str:
    """The original message of an error re-raised from a DataLoader worker (it embeds a traceback)."""
    last = str(e).strip().splitlines()[-1]
    return last.split("DataError: ", 1)[-1]


class StreamLoader:
    """Normalised float batches on ``device`` from a map-style dataset of (uint8 CHW, label)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        mean: list[float],
        std: list[float],
        *,
        train: bool,
        device: torch.device,
        seed: int = 0,
        num_workers: int = 8,
        channels_last: bool = False,
        gpu_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """``gpu_transform``: the dataset yields raw JPEG bytes, decoded on ``device`` with
        ``torchvision.io.decode_jpeg`` and transformed per image there (nvJPEG on CUDA)."""
        self.dataset, self.batch_size, self.train, self.seed = dataset, batch_size, train, seed
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.gpu_transform = gpu_transform
        if dist.is_available() and dist.is_initialized():
            self.world, self.rank = dist.get_world_size(), dist.get_rank()
        else:
            self.world, self.rank = 1, 0

    def _sampler(self, epoch: int) -> DistributedSampler:
        s = DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank, shuffle=self.train, seed=self.seed, drop_last=self.train)
        s.set_epoch(epoch)
        return s

    @property
    def num_examples(self) -> int:
        """Examples this rank sees per epoch."""
        return len(self._sampler(0))

    def __len__(self) -> int:
        n = self.num_examples
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _to_device(self, images) -> torch.Tensor:
        if self.gpu_transform is not None:
            from torchvision.io import ImageReadMode, decode_jpeg

            decoded = decode_jpeg(images, mode=ImageReadMode.RGB, device=self.device)
            images = torch.stack([self.gpu_transform(im) for im in decoded])
        else:
            images = images.to(self.device, non_blocking=True)
        return normalize(images, self.mean, self.std).contiguous(memory_format=self.memory_format)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from ``start_step`` on (same order for the same seed)."""
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=_SkipSampler(self._sampler(epoch), start_step * self.batch_size),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda" and self.gpu_transform is None,
            drop_last=self.train,
            persistent_workers=False,
            collate_fn=_collate_bytes if self.gpu_transform is not None else None,
            generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)),  # worker seeds per epoch
        )
        try:
            for images, labels in loader:
                yield self._to_device(images), labels.to(self.device, non_blocking=True)
        except DataError as e:
            raise DataError(_one_line(e)) from None
