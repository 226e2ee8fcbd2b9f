"""Write small datasets in the exact on-disk formats the real loaders read."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np


def write_cifar(root: Path, name: str = "cifar10", n_per_batch: int = 20, n_test: int = 30, seed: int = 0) -> dict[str, str]:
    """torchvision's CIFAR python layout (pickled dicts, latin1); returns {filename: md5}."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files, label_key, classes = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels", 10
        meta_name, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder, files, label_key, classes = "cifar-100-python", ["train", "test"], "fine_labels", 100
        meta_name, meta = "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}
    out = root / folder
    out.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for f in files:
        n = n_test if "test" in f else (n_per_batch * (5 if name == "cifar100" else 1))
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G, B
        labels = rng.integers(0, classes, size=n).tolist()
        # the originals are Python 2 pickles (protocol 2) that torchvision reads with encoding="latin1"
        (out / f).write_bytes(pickle.dumps({"data": data, label_key: labels, "batch_label": f}, protocol=2))
        md5[f] = hashlib.md5((out / f).read_bytes()).hexdigest()
    (out / meta_name).write_bytes(pickle.dumps(meta, protocol=2))
    md5[meta_name] = hashlib.md5((out / meta_name).read_bytes()).hexdigest()
    return md5


def patch_cifar_md5(monkeypatch, cls, md5: dict[str, str]) -> None:
    """Point torchvision's checksum table at the generated files (the check itself still runs)."""
    monkeypatch.setattr(cls, "train_list", [[f, md5[f]] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5[f]] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5[cls.meta["filename"]]})


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX (big-endian) encoding of a uint8 array, as the MNIST family ships."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist_gz(directory: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """The four gzip IDX files, as Debian's dataset-fashion-mnist installs them."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        with gzip.open(directory / f"{name}.gz", "wb") as f:
            f.write(idx_bytes(arr))
    return arrays


def patch_fashion_md5(monkeypatch, arrays: dict[str, np.ndarray]) -> None:
    """Make the loader's official md5s those of the small files ``write_fashion_mnist_gz`` wrote."""
    from sam_bench.data import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "RAW_MD5", {name: hashlib.md5(idx_bytes(a)).hexdigest() for name, a in arrays.items()})


def write_svhn(directory: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """torchvision's SVHN ``<split>_32x32.mat`` files (X: H,W,C,N uint8; y: N,1 in 1..10, 10 = digit 0).

    Returns {split: (X, y, md5)}.
    """
    import scipy.io

    sizes = sizes or {"train": 24, "extra": 16, "test": 12}
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in sizes.items():
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        path = directory / f"{split}_32x32.mat"
        scipy.io.savemat(str(path), {"X": x, "y": y})
        out[split] = (x, y, hashlib.md5(path.read_bytes()).hexdigest())
    return out


def write_image_folder(root: Path, classes: tuple[str, ...] = ("n01", "n02"), per_class: int = 3, size: tuple[int, int] = (40, 30), seed: int = 0) -> list[Path]:
    """An ImageFolder tree of small RGB JPEGs written with PIL; returns the files written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            path = root / c / f"{c}_{i}.JPEG"
            Image.fromarray(arr).save(path, format="JPEG", quality=90)
            files.append(path)
    return files


def imagenet_cfg(root, **over):
    """A small streamed-dataset config (the keys build_imagenet reads), for ImageFolder trees under ``root``."""
    from types import SimpleNamespace

    cfg = dict(root=str(root), num_classes=2, image_size=16, resize=20, mean=[0.5] * 3, std=[0.25] * 3, num_workers=0, gpu_decode=False)
    cfg.update(over)
    return SimpleNamespace(**cfg)
