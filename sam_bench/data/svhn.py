"""SVHN (Table 5: train + extra, 604,388 images) through torchvision's ``.mat`` format and md5 table.

Files live in ``<root>/svhn/`` as torchvision's ``SVHN(root=<root>/svhn)`` downloads them:
``train_32x32.mat``, ``extra_32x32.mat`` (1.3 GB) and ``test_32x32.mat``; scipy reads them.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torchvision.datasets import SVHN
from torchvision.datasets.utils import check_integrity

from sam_bench.errors import DataError


def _folder(root: str) -> str:
    return os.path.join(root, "svhn")


def _check(split: str, root: str, download: bool) -> None:
    url, filename, md5 = SVHN.split_list[split]
    path = os.path.join(_folder(root), filename)
    if check_integrity(path, md5):
        return
    existed = os.path.exists(path)
    if download:
        try:
            SVHN(_folder(root), split=split, download=True)
        except Exception as e:
            raise DataError(f"svhn: {path} is {'corrupt' if existed else 'missing'} and the download from {url} failed ({type(e).__name__}: {e}); place the file there") from e
        if check_integrity(path, md5):
            return
    if existed:
        raise DataError(f"svhn: {path} fails its md5 checksum (corrupt or truncated); delete it and run with dataset.download=true")
    raise DataError(f"svhn: {path} is missing; download {url} there or run with dataset.download=true")


def _read(split: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    ds = SVHN(_folder(root), split=split, download=False)  # labels 10 -> 0 done by torchvision
    return torch.from_numpy(np.ascontiguousarray(ds.data)), torch.from_numpy(ds.labels.astype(np.int64))


def load_svhn(root: str, download: bool, extra: bool = True) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y): uint8 (N, 3, 32, 32), int64 labels; train includes extra."""
    splits = ["train", "extra"] if extra else ["train"]
    for split in splits + ["test"]:
        _check(split, root, download)
    parts = [_read(s, root) for s in splits]
    test_x, test_y = _read("test", root)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), test_x, test_y
