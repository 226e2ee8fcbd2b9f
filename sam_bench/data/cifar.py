"""CIFAR-10/100 through torchvision's on-disk format (python pickles) and checksummed download."""

from __future__ import annotations

import os

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from sam_bench.errors import DataError

CIFAR_CLASSES = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def _first_bad_file(cls: type[CIFAR10], root: str) -> str | None:
    """The first pickle (data batches, then the class-name meta file) that is missing or fails
    torchvision's md5 check, else None."""
    for filename, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        path = os.path.join(root, cls.base_folder, filename)
        if not check_integrity(path, md5):
            return path
    return None


def _describe(path: str) -> str:
    return f"{path} is missing" if not os.path.exists(path) else f"{path} fails its md5 checksum (corrupt or truncated)"


def load_cifar(name: str, root: str, download: bool) -> tuple[torch.Tensor, ...]:
    """Train and test images as uint8 (N, 3, 32, 32) and labels as int64, read by torchvision."""
    cls = CIFAR_CLASSES[name]
    bad = _first_bad_file(cls, root)
    if bad is not None and download:
        try:  # not cls(download=True): its integrity check skips the meta file, so a bad one was never fetched again
            download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
        except Exception as e:  # network down, disk full, bad archive
            raise DataError(
                f"{name}: {_describe(bad)} and the download from {cls.url} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                f"Place the extracted '{cls.base_folder}/' folder in {os.path.abspath(root)} "
                "(set data_root=... or SAM_BENCH_DATA) and run again."
            ) from e
        bad = _first_bad_file(cls, root)
    if bad is not None:
        if os.path.isfile(os.path.join(root, os.path.basename(bad))):  # data_root=.../cifar-10-batches-py: one level too deep
            hint = f"{root} holds the files themselves: set data_root to its parent, {os.path.dirname(os.path.abspath(root))}"
        elif os.path.exists(bad):
            hint = "delete it and run with dataset.download=true"
        else:
            hint = f"download {cls.url} and extract it in {os.path.abspath(root)} (it unpacks as {cls.base_folder}/), or run with dataset.download=true"
        raise DataError(f"{name}: {_describe(bad)}; {hint}")
    train, test = cls(root, train=True), cls(root, train=False)
    return _to_tensors(train) + _to_tensors(test)


def _to_tensors(ds: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
    return images, torch.as_tensor(ds.targets, dtype=torch.int64)
