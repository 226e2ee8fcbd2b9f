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
