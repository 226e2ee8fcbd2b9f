"""A GPU-resident loader: the whole uint8 dataset lives on the device, batches are gathered and
augmented there (airbench style). Shuffling and augmentation draw from generators seeded by
(seed, epoch, step), so any step of any epoch can be reproduced without saving RNG state.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from sam_bench.data.autoaugment import BatchAutoAugment
from sam_bench.data.gpu_augment import cutout, flip_pad_crop, normalize

_MIX = 0x9E3779B97F4A7C15
AUTOAUGMENT_CHUNK = 8192  # images per AutoAugment call: its ~50 op launches are paid per call


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (splitmix-style), stable across runs and platforms."""
    h = 0
    for k in keys:
        h = ((h ^ (k + _MIX + (h << 6) + (h >> 2))) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


class DeviceLoader:
    """Batches of normalised float images and labels from uint8 tensors already on ``device``."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: list[float],
        std: list[float],
        *,
        train: bool,
        augment: bool = False,
        pad: int = 4,
        seed: int = 0,
        channels_last: bool = False,
        cutout: int | None = None,
        cutout_per_image: bool = False,
        autoaugment: str | None = None,
        upsample_to: int | None = None,
    ):
        self.images, self.labels = images, labels
        self.upsample_to = upsample_to
        self.batch_size = batch_size
        self.train, self.augment, self.pad, self.seed = train, augment, pad, seed
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=images.device)
        self.cutout, self.cutout_per_image = cutout, cutout_per_image
        # AutoAugment's per-image choices are drawn on the CPU (see autoaugment.py): no host sync
        self.autoaugment = BatchAutoAugment(autoaugment) if autoaugment else None
        self.cpu_generator = torch.Generator()
        self._augmented: tuple[int, torch.Tensor] | None = None  # (epoch, AutoAugmented training set)

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        """Steps per epoch: training drops the last partial batch (as the official code)."""
        n = self.num_examples
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input: upsampled to ``upsample_to`` when set, in the training memory format.

        Finetuning a pretrained network on CIFAR (Table 3) feeds it at its own resolution: the
        official code augments and normalises the 32 px batch, then resizes it bicubically
        (``dataset_source._resize``). Done per batch on the device, as the dataset stays 32 px."""
        if self.upsample_to is not None:
            x = F.interpolate(x, size=(self.upsample_to, self.upsample_to), mode="bicubic", align_corners=False)
        return x.contiguous(memory_format=self.memory_format)

    def autoaugmented(self, epoch: int) -> torch.Tensor:
        """The whole training set through AutoAugment for ``epoch`` (uint8, on the device).

        One fresh draw per image per epoch, as a per-image transform in a DataLoader would give,
        but in chunks of AUTOAUGMENT_CHUNK images so the per-call launch cost is amortised.
        Seeded by (seed, epoch, chunk): resuming mid-epoch recomputes the same images.
        """
        if self._augmented is None or self._augmented[0] != epoch:
            self._augmented = None  # free last epoch's copy first
            chunks = []
            for c, start in enumerate(range(0, self.num_examples, AUTOAUGMENT_CHUNK)):
                g = self.cpu_generator.manual_seed(derived_seed(self.seed, epoch, c, 1))
                chunks.append(self.autoaugment(self.images[start : start + AUTOAUGMENT_CHUNK], g))
            self._augmented = (epoch, torch.cat(chunks))
        return self._augmented[1]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of ``epoch`` from ``start_step`` on (same batches on every call)."""
        if not self.train:
            for i in range(start_step, len(self)):
                sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
                yield self._finish(normalize(self.images[sl], self.mean, self.std)), self.labels[sl]
            return
        g = self.generator
        g.manual_seed(derived_seed(self.seed, epoch))
        order = torch.randperm(self.num_examples, device=self.images.device, generator=g)
        # AutoAugment on uint8, before flip/crop (official order)
        source = self.autoaugmented(epoch) if self.autoaugment is not None else self.images
        for i in range(start_step, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = source[idx]
            g.manual_seed(derived_seed(self.seed, epoch, i + 1))
            if self.augment:
                x = flip_pad_crop(x, self.pad, g)
            x = normalize(x, self.mean, self.std)
            if self.cutout:  # after normalisation, fill 0 (official)
                x = cutout(x, self.cutout, self.cutout_per_image, g)
            yield self._finish(x), self.labels[idx]
