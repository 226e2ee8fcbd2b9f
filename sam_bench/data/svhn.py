"""SVHN (Table 5: train + extra, 604,388 images) through torchvision's ``.mat`` format and md5 table.

Files live in ``<root>/svhn/`` as torchvision's ``SVHN(root=<root>/svhn)`` downloads them:
``train_32x32.mat``, ``extra_32x32.mat`` (1.3 GB) and ``test_32x32.mat``; scipy reads them.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import torch
from torchvision.datasets import SVHN

from sam_bench.data.integrity import md5_matches
from sam_bench.errors import DataError


class _SVHN(SVHN):
    """torchvision's SVHN whose md5 check, run when the class is built, goes through the
    in-process cache (the 1.3 GB extra file was hashed twice per load)."""

    def _check_integrity(self) -> bool:
        return md5_matches(os.path.join(self.root, self.filename), self.split_list[self.split][2])


def _folder(root: str) -> str:
    return os.path.join(root, "svhn")


def _path(split: str, root: str) -> str:
    return os.path.join(_folder(root), SVHN.split_list[split][1])


def _corrupt(path: str) -> str:
    return f"svhn: {path} fails its md5 checksum (corrupt or truncated); delete it and run with dataset.download=true"


def _missing(split: str, path: str) -> str:
    return f"svhn: {path} is missing; download {SVHN.split_list[split][0]} there or run with dataset.download=true"


def _check(split: str, root: str, download: bool) -> None:
    url, _, md5 = SVHN.split_list[split]
    path = _path(split, root)
    if md5_matches(path, md5):
        return
    existed = os.path.exists(path)
    if download:
        try:
            _SVHN(_folder(root), split=split, download=True)
        except Exception as e:
            raise DataError(f"svhn: {path} is {'corrupt' if existed else 'missing'} and the download from {url} failed ({type(e).__name__}: {e}); place the file there") from e
        if md5_matches(path, md5):
            return
    raise DataError(_corrupt(path) if existed else _missing(split, path))


def _mat_incomplete(path: str) -> bool:
    """Whether ``path`` is no file, or a MATLAB 5 file that ends before its last variable does: the
    byte counts in the tags of its top-level elements (each variable, compressed or not) add up past
    the file's size. Only the tags are read; a file this cannot parse, or one cut exactly between two
    variables, is left to the md5 check."""
    if not os.path.isfile(path):
        return True
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(128)
        if len(header) < 128 or not header.startswith(b"MATLAB 5.0"):
            return False
        order = "<" if header[126:128] == b"IM" else ">"
        pos = 128
        while pos < size:
            f.seek(pos)
            tag = f.read(8)
            if len(tag) < 8:
                return True
            _, nbytes = struct.unpack(order + "II", tag)
            if nbytes == 0:
                return False
            pos += 8 + nbytes  # as scipy's reader steps from one variable to the next
    return pos > size


def files_problem(root: str, download: bool, extra: bool = True) -> str | None:
    """The one-line refusal :func:`load_svhn` would raise without a download, else None (also when a
    download would be tried). ``train`` and ``test`` (182 and 64 MB): md5, cached for the loader.
    ``extra`` (1.3 GB, seconds of md5): there and complete (:func:`_mat_incomplete`) but not hashed;
    the loader's md5 check still catches a damaged copy of the right length."""
    if download:
        return None
    for split in ["train", "extra", "test"] if extra else ["train", "test"]:
        path = _path(split, root)
        if not os.path.exists(path):
            return _missing(split, path)
        if _mat_incomplete(path) if split == "extra" else not md5_matches(path, SVHN.split_list[split][2]):
            return _corrupt(path)
    return None


def _read(split: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    ds = _SVHN(_folder(root), split=split, download=False)  # labels 10 -> 0 done by torchvision
    return torch.from_numpy(np.ascontiguousarray(ds.data)), torch.from_numpy(ds.labels.astype(np.int64))


def load_svhn(root: str, download: bool, extra: bool = True) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y): uint8 (N, 3, 32, 32), int64 labels; train includes extra."""
    splits = ["train", "extra"] if extra else ["train"]
    for split in splits + ["test"]:
        _check(split, root, download)
    parts = [_read(s, root) for s in splits]
    test_x, test_y = _read("test", root)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), test_x, test_y
