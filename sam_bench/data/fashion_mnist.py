"""Fashion-MNIST from torchvision's layout, Debian's package, or torchvision's download.

Lookup order: ``<root>/FashionMNIST/raw/`` (torchvision's layout); else the gzip IDX files of a
system directory (Debian's ``dataset-fashion-mnist`` installs them in
``/usr/share/datasets/fashion-mnist``), extracted once into that layout; else torchvision's
checksummed download. Every IDX file is checked against the md5 of the official release before
torchvision reads it (the decompressed files: Debian's ``.gz`` files differ from the official ones
byte for byte, their contents do not).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import zlib

import torch
from torchvision.datasets import FashionMNIST

from sam_bench.data.integrity import file_md5
from sam_bench.errors import DataError
from sam_bench.tracking.results import FILE_MODE

_GZ_FILES = [name for name, _ in FashionMNIST.resources]
#: md5 of each decompressed IDX file of the official release (zalandoresearch/fashion-mnist), as
#: public loaders list them; Debian's dataset-fashion-mnist decompresses to exactly these.
RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
_CHUNK = 1 << 20


def _raw_dir(root: str) -> str:
    return os.path.join(root, "FashionMNIST", "raw")


def _missing_raw(root: str) -> list[str]:
    return [f for f in (os.path.splitext(g)[0] for g in _GZ_FILES) if not os.path.isfile(os.path.join(_raw_dir(root), f))]


def _wrong_md5(name: str, got: str, where: str, fix: str) -> str:
    return (f"fashion_mnist: {where} is not the official {name} (md5 {got}, expected {RAW_MD5[name]}): "
            f"the file is damaged or another dataset's; {fix}")


def _extract_from(system_dir: str, root: str) -> None:
    """Decompress the four ``.gz`` files into torchvision's raw folder (atomic per file), each
    checked against :data:`RAW_MD5` before it takes its place."""
    raw = _raw_dir(root)
    try:
        os.makedirs(raw, exist_ok=True)
    except OSError as e:  # data_root is a file, or not writable
        raise DataError(f"fashion_mnist: cannot create {os.path.abspath(raw)} to extract {system_dir}'s files into ({e}); "
                        "point data_root at a writable directory") from e
    reinstall = "reinstall the package (apt-get install --reinstall dataset-fashion-mnist)"
    for gz in _GZ_FILES:
        name = os.path.splitext(gz)[0]
        src, dst = os.path.join(system_dir, gz), os.path.join(raw, name)
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=".tmp-")
        os.fchmod(fd, FILE_MODE)  # readable by others as torchvision's own download would be, not mkstemp's 0600
        digest = hashlib.md5()
        try:
            with gzip.open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                while chunk := fin.read(_CHUNK):
                    digest.update(chunk)
                    fout.write(chunk)
        except (OSError, EOFError, zlib.error) as e:  # missing, truncated, or corrupt deflate data
            os.unlink(tmp)
            raise DataError(f"fashion_mnist: cannot decompress {src} ({e}); {reinstall}") from e
        if digest.hexdigest() != RAW_MD5[name]:
            os.unlink(tmp)
            raise DataError(_wrong_md5(name, digest.hexdigest(), f"{src} decompressed", reinstall))
        os.replace(tmp, dst)


def _raw_files_problem(root: str) -> str | None:
    """Each IDX file in torchvision's raw folder is the official one (about 0.1-0.2 s for the four
    files, once per process: :mod:`sam_bench.data.integrity`), else the refusal."""
    for name, expected in RAW_MD5.items():
        path = os.path.join(_raw_dir(root), name)
        got = file_md5(path)
        if got != expected:
            return _wrong_md5(name, got, os.path.abspath(path), f"delete {os.path.abspath(_raw_dir(root))} to extract or download it again")
    return None


def _gz_source(root: str, system_dir: str | None) -> str | None:
    """The directory holding the four gzip files: Debian's, or torchvision's raw folder they were copied into."""
    return next((d for d in (system_dir, _raw_dir(root)) if d and all(os.path.isfile(os.path.join(d, g)) for g in _GZ_FILES)), None)


def _incomplete_system_dir(system_dir: str | None) -> str | None:
    """The refusal of a system directory that exists without all four gzip files (refused even where
    a download would be possible: the package is damaged)."""
    if not (system_dir and os.path.isdir(system_dir)):
        return None
    lacking = [g for g in _GZ_FILES if not os.path.isfile(os.path.join(system_dir, g))]
    return (f"fashion_mnist: dataset.system_dir={system_dir} lacks {', '.join(lacking)}; reinstall the package "
            "(apt-get install --reinstall dataset-fashion-mnist) or set dataset.system_dir=null")


def _without_a_copy(root: str, system_dir: str | None, download: bool) -> str | None:
    """With neither the raw files nor gzip files to extract: the refusal, else None (a download is tried)."""
    if problem := _incomplete_system_dir(system_dir):
        return problem
    if download:
        return None
    where = f" and dataset.system_dir={system_dir} does not exist" if system_dir else ""
    return (f"fashion_mnist: {_missing_raw(root)[0]} is missing in {os.path.abspath(_raw_dir(root))}{where}; install "
            "dataset-fashion-mnist (apt-get) or run with dataset.download=true")


def files_problem(root: str, system_dir: str | None, download: bool) -> str | None:
    """The one-line refusal :func:`load_fashion_mnist` would raise without a download, else None:
    the raw IDX files' md5s (cached for the loader), or, without them, whether the gzip files are
    there to extract (existence only: they are decompressed and checked as they are extracted) or
    a download would be tried."""
    if not _missing_raw(root):
        return _raw_files_problem(root)
    if _gz_source(root, system_dir):
        return None
    return _without_a_copy(root, system_dir, download)


def _download(root: str) -> None:
    try:
        FashionMNIST(root, train=True, download=True)
    except Exception as e:
        raise DataError(
            f"fashion_mnist: {_missing_raw(root)[0]} is missing in {os.path.abspath(_raw_dir(root))} and the download from "
            f"{FashionMNIST.mirrors[0]} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Install "
            "Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or copy the four gzip IDX files there."
        ) from e


def load_fashion_mnist(root: str, system_dir: str | None, download: bool) -> tuple[torch.Tensor, ...]:
    """Train and test images as uint8 (N, 1, 28, 28) and labels as int64."""
    if _missing_raw(root):
        source = _gz_source(root, system_dir)
        if source:  # Debian's directory, or the gzip files copied into torchvision's raw folder
            _extract_from(source, root)
        elif problem := _without_a_copy(root, system_dir, download):
            raise DataError(problem)
        else:
            _download(root)
    if problem := _raw_files_problem(root):
        raise DataError(problem)
    out: list[torch.Tensor] = []
    for train in (True, False):
        try:
            ds = FashionMNIST(root, train=train, download=False)
        except Exception as e:  # truncated / corrupt IDX file
            split = "train" if train else "t10k"
            raise DataError(
                f"fashion_mnist: {os.path.abspath(_raw_dir(root))}/{split}-*-ubyte is unreadable ({type(e).__name__}: {e}); "
                "delete the FashionMNIST folder to re-extract or re-download it"
            ) from e
        if ds.data.shape[1:] != (28, 28) or len(ds.data) != len(ds.targets):
            raise DataError(f"fashion_mnist: {_raw_dir(root)} holds images of shape {tuple(ds.data.shape)}; expected (N, 28, 28) with one label each")
        out += [ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64)]
    return tuple(out)
