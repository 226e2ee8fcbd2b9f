"""A loader for datasets too large to live on the device (ImageNet, the finetuning sets).

Workers decode and augment images into uint8 tensors (4x less to copy than float), batches move
to the device through pinned memory and are normalised there. The iteration interface is
:class:`~sam_bench.data.loader.DeviceLoader`'s (``epoch(epoch, start_step)``, ``__len__``,
``num_examples``, ``device``), so the trainer does not care which one it gets. Under
torch.distributed each rank reads only its slice of every global batch (``shards_by_rank``: the
trainer does not slice these batches again), and the random crop and flip of an image are seeded
by (seed, epoch, index), so a run resumed mid-epoch reads the same augmented images.
"""

from __future__ import annotations

import bisect
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from sam_bench.data.gpu_augment import normalize
from sam_bench.data.loader import derived_seed
from sam_bench.engine.distributed import rank_slice
from sam_bench.errors import DataError


class _RankBatches(Sampler[list[tuple[int, int]]]):
    """One epoch's batches from ``start_step`` on: the global batches a single process reads (one
    shuffle per (seed, epoch), the last partial batch dropped when training), each cut to this
    rank's slice as :class:`~sam_bench.engine.distributed.ShardedLoader` cuts a batch, so N ranks
    read together exactly the single process's batches and each decodes only its own images.
    Every index comes with its own augmentation seed (seed, epoch, index)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int, epoch: int,
                 world: int, rank: int, start_step: int):
        self.n, self.batch_size, self.shuffle, self.seed, self.epoch = n, batch_size, shuffle, seed, epoch
        self.world, self.rank, self.start_step = world, rank, start_step
        self.batches = n // batch_size if drop_last else -(-n // batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))).tolist()
        else:
            order = list(range(self.n))
        for b in range(self.start_step, self.batches):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            mine = batch[rank_slice(len(batch), self.world, self.rank)]
            if mine:  # the last evaluation batch may leave a rank nothing
                yield [(i, derived_seed(self.seed, self.epoch, i)) for i in mine]

    def __len__(self) -> int:
        return max(0, self.batches - self.start_step)


class _SeededItems(Dataset):
    """``dataset[i]`` with torch's CPU generator seeded for that one item: an image's random crop and
    flip depend on (seed, epoch, index) only, not on which worker reads it or when, so a resumed
    epoch repeats them. A file that cannot be decoded becomes a DataError naming it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, item_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(item_seed)
            try:
                image, label = self.dataset[index]
            except (OSError, SyntaxError, ValueError) as e:  # PIL inside a torchvision dataset class
                raise DataError(f"{item_path(self.dataset, index)} is unreadable ({type(e).__name__}: {e}); it is truncated or "
                                "corrupt: replace or delete it") from e
        return image, label, index


def item_path(dataset: Dataset, index: int) -> str:
    """The file behind ``dataset[index]`` (ImageFolder, torchvision's dataset classes, ConcatDataset
    of them), else a description by index."""
    if isinstance(dataset, ConcatDataset):
        part = bisect.bisect_right(dataset.cumulative_sizes, index)
        start = dataset.cumulative_sizes[part - 1] if part else 0
        return item_path(dataset.datasets[part], index - start)
    for name in ("samples", "_samples"):  # [(path, label), ...]
        if isinstance(getattr(dataset, name, None), list):
            return str(getattr(dataset, name)[index][0])
    for name in ("_image_files", "_images"):  # [path, ...]
        if isinstance(getattr(dataset, name, None), list):
            return str(getattr(dataset, name)[index])
    return f"image {index} of {type(dataset).__name__}"


def dataset_labels(dataset: Dataset) -> list[int] | None:
    """The labels a map-style dataset keeps in a list (ImageFolder, torchvision's dataset classes,
    ConcatDataset of them), without reading any image; None when it keeps none."""
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_labels(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [y for p in parts for y in p]
    for name in ("targets", "_labels"):
        if isinstance(getattr(dataset, name, None), list):
            return [int(y) for y in getattr(dataset, name)]
    if isinstance(getattr(dataset, "_samples", None), list):  # StanfordCars: [(path, label), ...]
        return [int(y) for _, y in dataset._samples]
    return None


def jpeg_components(data: torch.Tensor) -> int | None:
    """The number of colour components of a JPEG (1 grayscale, 3 YCbCr, 4 CMYK/YCCK), from its
    header as PIL reads it (no pixel is decoded), or None when the bytes are no JPEG (another format
    behind a .JPEG name: ImageNet train's n02105855_2933.JPEG is a PNG) or no readable header."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            return len(img.getbands()) if img.format == "JPEG" else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def pil_decode_rgb(data: torch.Tensor) -> torch.Tensor:
    """Any image PIL reads, from its bytes, as a uint8 RGB CHW tensor (PIL's ``convert("RGB")``, as
    ImageFolder's loader in sam_bench.data.imagenet gives without ``gpu_decode``)."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _one_line(e: Exception) -> str:
    """The original message of an error re-raised from a DataLoader worker (it embeds a traceback)."""
    last = str(e).strip().splitlines()[-1]
    return last.split("DataError: ", 1)[-1]


def _collate_bytes(batch: Sequence) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    """JPEG files of a batch as one flat uint8 tensor and their lengths: a worker hands the main
    process one tensor, not one per image (which also failed: "Bad file descriptor" while sharing)."""
    files = [b[0] for b in batch]
    flat = torch.cat(files) if files else torch.empty(0, dtype=torch.uint8)
    lengths = torch.tensor([len(f) for f in files], dtype=torch.int64)
    return (flat, lengths), torch.tensor([b[1] for b in batch], dtype=torch.int64), torch.tensor([b[2] for b in batch])


class StreamLoader:
    """Normalised float batches on ``device`` from a map-style dataset of (uint8 CHW, label).

    ``batch_size`` is the global batch and ``num_examples`` the whole split, as for
    :class:`~sam_bench.data.loader.DeviceLoader`; under torch.distributed each rank receives its
    slice of every batch (``shards_by_rank``)."""

    shards_by_rank = True

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
        """``gpu_transform``: the dataset yields raw file bytes, JPEGs decoded on ``device`` with
        ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA), other images by PIL on the CPU, and
        transformed per image on ``device``."""
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

    def _batches(self, epoch: int, start_step: int = 0) -> _RankBatches:
        return _RankBatches(len(self.dataset), self.batch_size, shuffle=self.train, drop_last=self.train, seed=self.seed,
                            epoch=epoch, world=self.world, rank=self.rank, start_step=start_step)

    @property
    def num_examples(self) -> int:
        """Examples in the split (all ranks together)."""
        return len(self.dataset)

    @property
    def labels(self) -> torch.Tensor:
        """Every label of the split in index order, as the dataset lists them without reading an
        image (ImageFolder's ``targets``, torchvision's ``_labels``); empty when it lists none.
        The trainer hashes them to refuse resuming a run whose labels changed."""
        found = dataset_labels(self.dataset)
        return torch.as_tensor(found if found is not None else [], dtype=torch.int64)

    def __len__(self) -> int:
        return self._batches(0).batches

    def _decode(self, images: list[torch.Tensor], seeds: list[int], indices: list[int]) -> torch.Tensor:
        """File bytes -> the transformed uint8 images on the device, each transform seeded like a
        worker's (:class:`_SeededItems`); a file that cannot be decoded named in a DataError.
        YCbCr and grayscale JPEGs are decoded together on the device (nvJPEG on CUDA); other files
        (a PNG named .JPEG, CMYK JPEGs) by PIL on the CPU, as the dataset's own loader would."""
        from torchvision.io import ImageReadMode, decode_jpeg

        decoded: list[torch.Tensor | None] = [None] * len(images)
        on_device = [jpeg_components(data) in (1, 3) for data in images]  # what decode_jpeg reads
        batched = [k for k, ok in enumerate(on_device) if ok]
        if batched:
            try:
                for k, image in zip(batched, decode_jpeg([images[k] for k in batched], mode=ImageReadMode.RGB, device=self.device)):
                    decoded[k] = image
            except RuntimeError:
                pass  # one file is bad: decoded one by one below, to name it
        for k, (data, index) in enumerate(zip(images, indices)):
            if decoded[k] is None:
                decoded[k] = self._decode_one(data, index, on_device[k])
        out = []
        for image, item_seed in zip(decoded, seeds):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(item_seed)
                out.append(self.gpu_transform(image))
        return torch.stack(out)

    def _decode_one(self, data: torch.Tensor, index: int, on_device: bool) -> torch.Tensor:
        """One file: decode_jpeg on the device when it is a YCbCr or grayscale JPEG (``on_device``),
        else (or when that fails) PIL on the CPU; a file neither reads is truncated or corrupt."""
        from torchvision.io import ImageReadMode, decode_jpeg

        error = None
        if on_device:
            try:
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError as e:
                error = str(e).strip().splitlines()[0]
        try:
            return pil_decode_rgb(data).to(self.device)
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{item_path(self.dataset, index)} is unreadable ({error or f'{type(e).__name__}: {e}'}); it is "
                            "truncated or corrupt: replace or delete it") from None

    def _to_device(self, images, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        if self.gpu_transform is not None:
            flat, lengths = images
            idx = indices.tolist()
            images = self._decode(list(flat.split(lengths.tolist())), [derived_seed(self.seed, epoch, i) for i in idx], idx)
        else:
            images = images.to(self.device, non_blocking=True)
        return normalize(images, self.mean, self.std).contiguous(memory_format=self.memory_format)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part of the batches of ``epoch`` from ``start_step`` on (same images, same
        augmentation for the same seed, whatever the number of workers or where it resumed)."""
        loader = DataLoader(
            _SeededItems(self.dataset),
            batch_sampler=self._batches(epoch, start_step),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda" and self.gpu_transform is None,
            persistent_workers=False,
            collate_fn=_collate_bytes if self.gpu_transform is not None else None,
            generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)),  # never the global RNG
        )
        try:
            for images, labels, indices in loader:
                yield self._to_device(images, indices, epoch), labels.to(self.device, non_blocking=True)
        except DataError as e:
            raise DataError(_one_line(e)) from None
