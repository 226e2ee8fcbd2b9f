"""CIFAR-10/100 through torchvision's on-disk format (python pickles) and checksummed download."""

from __future__ import annotations

import os

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from sam_bench.data.integrity import md5_matches
from sam_bench.errors import DataError

CIFAR_CLASSES = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def first_bad_file(cls: type[CIFAR10], root: str) -> str | None:
    """The first pickle (data batches, then the class-name meta file) that is missing or fails
    torchvision's md5 check, else None."""
    for filename, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        path = os.path.join(root, cls.base_folder, filename)
        if not md5_matches(path, md5):
            return path
    return None


class _CachedCheck:
    """torchvision's integrity check, run when the class is built (train and test alike), through
    the in-process md5 cache."""

    def _check_integrity(self) -> bool:
        return first_bad_file(type(self), self.root) is None


class _CIFAR10(_CachedCheck, CIFAR10):
    pass


class _CIFAR100(_CachedCheck, CIFAR100):
    pass


_READERS = {"cifar10": _CIFAR10, "cifar100": _CIFAR100}


def _describe(path: str) -> str:
    return f"{path} is missing" if not os.path.exists(path) else f"{path} fails its md5 checksum (corrupt or truncated)"


def _bad_file_message(name: str, root: str, bad: str) -> str:
    cls = CIFAR_CLASSES[name]
    if os.path.isfile(os.path.join(root, os.path.basename(bad))):  # data_root=.../cifar-10-batches-py: one level too deep
        hint = f"{root} holds the files themselves: set data_root to its parent, {os.path.dirname(os.path.abspath(root))}"
    elif os.path.exists(bad):
        hint = "delete it and run with dataset.download=true"
    else:
        hint = f"download {cls.url} and extract it in {os.path.abspath(root)} (it unpacks as {cls.base_folder}/), or run with dataset.download=true"
    return f"{name}: {_describe(bad)}; {hint}"


def files_problem(name: str, root: str, download: bool) -> str | None:
    """The one-line refusal :func:`load_cifar` would raise before reading an image, else None (also
    when a download would be tried): one md5 pass over the files, kept for the loader's own check."""
    if download:
        return None
    bad = first_bad_file(CIFAR_CLASSES[name], root)
    return None if bad is None else _bad_file_message(name, root, bad)


def load_cifar(name: str, root: str, download: bool) -> tuple[torch.Tensor, ...]:
    """Train and test images as uint8 (N, 3, 32, 32) and labels as int64, read by torchvision."""
    cls = CIFAR_CLASSES[name]
    bad = first_bad_file(cls, root)
    if bad is not None and download:
        try:  # not cls(download=True): its integrity check skips the meta file, so a bad one was never fetched again
            download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
        except Exception as e:  # network down, disk full, bad archive
            raise DataError(
                f"{name}: {_describe(bad)} and the download from {cls.url} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                f"Place the extracted '{cls.base_folder}/' folder in {os.path.abspath(root)} "
                "(set data_root=... or SAM_BENCH_DATA) and run again."
            ) from e
        bad = first_bad_file(cls, root)
    if bad is not None:
        raise DataError(_bad_file_message(name, root, bad))
    reader = _READERS[name]
    train, test = reader(root, train=True), reader(root, train=False)
    return _to_tensors(train) + _to_tensors(test)


def _to_tensors(ds: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
    return images, torch.as_tensor(ds.targets, dtype=torch.int64)
