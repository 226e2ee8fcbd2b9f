"""Loaders on files written in the real on-disk formats; the GPU-style batch augmentation."""

import gzip
import hashlib
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, CIFAR100

from datafiles import idx_bytes, patch_cifar_md5, patch_fashion_md5, write_cifar, write_fashion_mnist_gz
from sam_bench.data import DeviceLoader
from sam_bench.data.cifar import load_cifar
from sam_bench.data.fashion_mnist import load_fashion_mnist
from sam_bench.data.gpu_augment import flip_pad_crop, normalize
from sam_bench.data.synthetic import make_synthetic
from sam_bench.errors import DataError


@pytest.mark.parametrize("name,cls", [("cifar10", CIFAR10), ("cifar100", CIFAR100)])
def test_cifar_loader_reads_torchvision_format(tmp_path, monkeypatch, name, cls):
    md5 = write_cifar(tmp_path, name)
    patch_cifar_md5(monkeypatch, cls, md5)
    train_x, train_y, test_x, test_y = load_cifar(name, str(tmp_path), download=False)
    assert train_x.dtype == torch.uint8 and train_x.shape == (100, 3, 32, 32)
    assert test_x.shape == (30, 3, 32, 32) and train_y.dtype == torch.int64
    # pixel (r, g, b) of image 0 at row 1, col 2 equals the raw pickle's planes
    first = "data_batch_1" if name == "cifar10" else "train"
    raw = pickle.loads((tmp_path / cls.base_folder / first).read_bytes(), encoding="latin1")
    row = raw["data"][0]
    assert [int(train_x[0, c, 1, 2]) for c in range(3)] == [int(row[c * 1024 + 1 * 32 + 2]) for c in range(3)]
    label_key = "labels" if name == "cifar10" else "fine_labels"
    assert train_y[:5].tolist() == raw[label_key][:5]


def test_cifar_missing_file_is_a_clear_error(tmp_path, monkeypatch):
    md5 = write_cifar(tmp_path)
    patch_cifar_md5(monkeypatch, CIFAR10, md5)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3 is missing.*cifar-10-python.tar.gz"):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_cifar_corrupt_file_fails_its_checksum(tmp_path, monkeypatch):
    md5 = write_cifar(tmp_path)
    patch_cifar_md5(monkeypatch, CIFAR10, md5)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(DataError, match=r"test_batch fails its md5 checksum"):
        load_cifar("cifar10", str(tmp_path), download=False)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_cifar_meta_file_is_checked_like_the_batches(tmp_path, monkeypatch, damage):
    md5 = write_cifar(tmp_path)
    patch_cifar_md5(monkeypatch, CIFAR10, md5)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.unlink() if damage == "missing" else meta.write_bytes(meta.read_bytes()[:10])
    want = r"batches.meta is missing.*cifar-10-python.tar.gz" if damage == "missing" else r"batches.meta fails its md5 checksum"
    with pytest.raises(DataError, match=want):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_cifar_data_root_one_level_too_deep_says_so(tmp_path, monkeypatch):
    md5 = write_cifar(tmp_path)
    patch_cifar_md5(monkeypatch, CIFAR10, md5)
    deep = tmp_path / "cifar-10-batches-py"
    with pytest.raises(DataError, match=rf"{deep} holds the files themselves: set data_root to its parent, {tmp_path}$"):
        load_cifar("cifar10", str(deep), download=False)


def test_cifar_with_only_its_meta_file_missing_is_downloaded_again(tmp_path, monkeypatch):
    """torchvision's own download checks the data batches only, so a missing batches.meta was never
    fetched: the run failed with "download failed" although nothing was tried."""
    import sam_bench.data.cifar as cifar

    md5 = write_cifar(tmp_path)
    patch_cifar_md5(monkeypatch, CIFAR10, md5)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    kept = meta.read_bytes()
    meta.unlink()
    fetched = []

    def fake_download(url, root, filename, md5):
        fetched.append((url, filename))
        meta.write_bytes(kept)  # the archive's extraction puts the folder back

    monkeypatch.setattr(cifar, "download_and_extract_archive", fake_download)
    train_x, *_ = load_cifar("cifar10", str(tmp_path), download=True)
    assert fetched == [(CIFAR10.url, CIFAR10.filename)] and train_x.shape == (100, 3, 32, 32)


def test_fashion_mnist_from_system_gz_files(tmp_path, monkeypatch):
    arrays = write_fashion_mnist_gz(tmp_path / "system")
    patch_fashion_md5(monkeypatch, arrays)
    train_x, train_y, test_x, test_y = load_fashion_mnist(str(tmp_path / "root"), str(tmp_path / "system"), download=False)
    assert train_x.shape == (64, 1, 28, 28) and train_x.dtype == torch.uint8
    assert np.array_equal(train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(test_y.numpy(), arrays["t10k-labels-idx1-ubyte"].astype(np.int64))
    assert (tmp_path / "root" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()  # torchvision's layout


def test_fashion_mnist_missing_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is missing.*dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "root"), str(tmp_path / "nowhere"), download=False)


def test_fashion_mnist_truncated_file_is_a_clear_error(tmp_path, monkeypatch):
    patch_fashion_md5(monkeypatch, write_fashion_mnist_gz(tmp_path / "system"))
    load_fashion_mnist(str(tmp_path / "root"), str(tmp_path / "system"), download=False)
    raw = tmp_path / "root" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is not the official .*delete .*raw to extract or download it again"):
        load_fashion_mnist(str(tmp_path / "root"), None, download=False)


def test_fashion_mnist_corrupt_system_gz_is_a_clear_error_and_leaves_no_temporary(tmp_path):
    write_fashion_mnist_gz(tmp_path / "system")
    gz = tmp_path / "system" / "train-images-idx3-ubyte.gz"
    data = bytearray(gzip.compress(gzip.decompress(gz.read_bytes()), mtime=0))  # a 10-byte header
    data[10] ^= 0xFF  # the first bytes of the deflate stream: zlib.error, which is not an OSError
    data[11] ^= 0xFF
    gz.write_bytes(bytes(data))
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(data))
    with pytest.raises(DataError, match=r"cannot decompress .*train-images-idx3-ubyte.gz.*reinstall"):
        load_fashion_mnist(str(tmp_path / "root"), str(tmp_path / "system"), download=False)
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    assert [p.name for p in raw.iterdir() if p.name.startswith(".tmp-")] == []


def test_fashion_mnist_gzip_files_copied_into_the_raw_folder_are_extracted_readable_by_others(tmp_path, monkeypatch):
    """The error message says "copy the gzip IDX files there": that now works, and what is extracted gets the
    umask's mode (mkstemp's 0600 left the files unreadable to the rest of a shared data root's group)."""
    import os
    import shutil

    arrays = write_fashion_mnist_gz(tmp_path / "system")
    patch_fashion_md5(monkeypatch, arrays)
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    shutil.copytree(tmp_path / "system", raw)
    old = os.umask(0o022)
    try:
        from sam_bench.tracking import results

        mode = results._file_mode()
        _, train_y, _, _ = load_fashion_mnist(str(tmp_path / "root"), None, download=False)
    finally:
        os.umask(old)
    assert np.array_equal(train_y.numpy(), arrays["train-labels-idx1-ubyte"].astype(np.int64))
    assert mode == 0o644 and (raw / "train-images-idx3-ubyte").stat().st_mode & 0o777 == results.FILE_MODE


def test_fashion_mnist_from_debians_package_matches_the_official_md5s(tmp_path):
    """The real files (the README installs dataset-fashion-mnist): Debian's .gz decompress to the
    official release, whose md5s the loader checks, and it gives the official split sizes."""
    from sam_bench.data.fashion_mnist import RAW_MD5

    system = Path("/usr/share/datasets/fashion-mnist")
    assert system.is_dir(), "install Debian's dataset-fashion-mnist, as the README's install command does"
    assert {p.name: hashlib.md5(gzip.decompress(p.read_bytes())).hexdigest() for p in system.glob("*.gz")} \
        == {f"{name}.gz": md5 for name, md5 in RAW_MD5.items()}
    train_x, train_y, test_x, test_y = load_fashion_mnist(str(tmp_path / "root"), str(system), download=False)
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(train_y).tolist() == [6000] * 10 and torch.bincount(test_y).tolist() == [1000] * 10


def test_fashion_mnist_other_files_are_refused_before_extraction_and_in_the_raw_folder(tmp_path, monkeypatch):
    """Files that are valid IDX but not the official ones (another dataset, a damaged copy) are refused
    with the file, both md5s and the fix: at extraction nothing takes its place; in the raw folder at
    every load."""
    arrays = write_fashion_mnist_gz(tmp_path / "system")
    with pytest.raises(DataError, match=r"system/train-images-idx3-ubyte.gz decompressed is not the official "
                                        r"train-images-idx3-ubyte \(md5 [0-9a-f]{32}, expected f4a8712d7a061bf5bd6d2ca38dc4d50a\).*reinstall"):
        load_fashion_mnist(str(tmp_path / "root"), str(tmp_path / "system"), download=False)
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == []  # no temporary, no unchecked file
    patch_fashion_md5(monkeypatch, arrays)
    load_fashion_mnist(str(tmp_path / "root"), str(tmp_path / "system"), download=False)
    labels = raw / "train-labels-idx1-ubyte"
    flipped = arrays["train-labels-idx1-ubyte"].copy()
    flipped[0] = (flipped[0] + 1) % 10  # one label changed: still a readable IDX file
    labels.write_bytes(idx_bytes(flipped))
    with pytest.raises(DataError, match=r"raw/train-labels-idx1-ubyte is not the official train-labels-idx1-ubyte"):
        load_fashion_mnist(str(tmp_path / "root"), None, download=False)


def test_fashion_mnist_system_dir_missing_one_file_names_it(tmp_path):
    write_fashion_mnist_gz(tmp_path / "system")
    (tmp_path / "system" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"dataset.system_dir=.*system lacks t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(str(tmp_path / "root"), str(tmp_path / "system"), download=False)


def test_fashion_mnist_nowhere_names_the_system_dir_it_looked_in(tmp_path):
    """A dataset.system_dir that does not exist is named (it was left out: the fix 'install the
    package' read as if the package were missing from its default place)."""
    with pytest.raises(DataError, match=r"raw; install") as plain:
        load_fashion_mnist(str(tmp_path / "root"), None, download=False)
    assert "system_dir" not in str(plain.value)
    with pytest.raises(DataError, match=r"is missing in .*raw and dataset.system_dir=.*nowhere does not exist; install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "root"), str(tmp_path / "nowhere"), download=False)


def test_a_data_root_with_a_tilde_is_the_home_directory(tmp_path, monkeypatch):
    """dataset.root=~/data used to be read as a folder named '~' in the working directory."""
    from types import SimpleNamespace

    from sam_bench.data import load_arrays

    patch_fashion_md5(monkeypatch, write_fashion_mnist_gz(tmp_path / "home" / "system"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    ds = SimpleNamespace(name="fashion_mnist", root="~/data", system_dir="~/system", download=False,
                         train_subset=None, test_subset=None, in_chans=1, image_size=28, num_classes=10)
    assert load_arrays(ds)[0].shape == (64, 1, 28, 28)
    assert (tmp_path / "home" / "data" / "FashionMNIST" / "raw").is_dir() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("num_classes,label", [(10, 200), (5, 9)])  # a corrupt byte; num_classes too small
def test_labels_outside_num_classes_are_a_clear_error(tmp_path, monkeypatch, num_classes, label):
    """A corrupt label byte, or a dataset.num_classes smaller than the data's, fails at loading."""
    from types import SimpleNamespace

    from sam_bench.data import load_arrays

    arrays = write_fashion_mnist_gz(tmp_path / "system")
    labels = arrays["train-labels-idx1-ubyte"]
    labels[:] = np.minimum(labels, num_classes - 1)
    labels[3] = label  # the only label outside [0, num_classes)
    with gzip.open(tmp_path / "system" / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(idx_bytes(labels))
    patch_fashion_md5(monkeypatch, arrays)
    ds = SimpleNamespace(name="fashion_mnist", root=str(tmp_path / "root"), system_dir=str(tmp_path / "system"), download=False,
                         train_subset=None, test_subset=None, in_chans=1, image_size=28, num_classes=num_classes)
    with pytest.raises(DataError, match=rf"fashion_mnist: \d+ training label\(s\) outside \[0, {num_classes}\) \(e.g. {label}\)"):
        load_arrays(ds)


def test_synthetic_test_set_does_not_depend_on_the_training_set_size():
    small, large = make_synthetic(64, 16, 10, 3, 8, seed=3), make_synthetic(128, 16, 10, 3, 8, seed=3)
    assert torch.equal(small[2], large[2]) and torch.equal(small[3], large[3])


def test_synthetic_is_seeded_and_learnable_shape():
    a = make_synthetic(64, 16, 10, 3, 32, seed=3)
    b = make_synthetic(64, 16, 10, 3, 32, seed=3)
    c = make_synthetic(64, 16, 10, 3, 32, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert a[0].dtype == torch.uint8 and a[0].shape == (64, 3, 32, 32)
    # class means differ far more than noise: nearest-class-mean on train separates test well
    x, y, tx, ty = make_synthetic(2000, 500, 10, 3, 32, seed=0)
    means = torch.stack([x[y == k].float().mean(0) for k in range(10)])
    pred = torch.cdist(tx.float().flatten(1), means.flatten(1)).argmin(1)
    assert (pred == ty).float().mean() > 0.9


def reference_flip_pad_crop(img: torch.Tensor, flip: bool, dy: int, dx: int, pad: int) -> torch.Tensor:
    """One image, the slow obvious way: flip, reflect-pad, crop."""
    if flip:
        img = img.flip(-1)
    padded = F.pad(img.float()[None], (pad, pad, pad, pad), mode="reflect")[0]
    h, w = img.shape[-2:]
    return padded[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w].to(img.dtype)


def test_flip_pad_crop_equals_per_image_reference():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    out = flip_pad_crop(images, 4, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # replay the same draws
    dy = torch.randint(-4, 5, (32, 1), generator=g)
    dx = torch.randint(-4, 5, (32, 1), generator=g)
    flip = torch.rand((32, 1), generator=g) < 0.5
    for i in range(32):
        want = reference_flip_pad_crop(images[i], bool(flip[i]), int(dy[i]), int(dx[i]), 4)
        assert torch.equal(out[i], want), i
    assert 4 < int(flip.sum()) < 28 and len(set(dy.flatten().tolist())) > 3


def test_flip_pad_crop_is_deterministic_per_seed():
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    a = flip_pad_crop(images, 4, torch.Generator().manual_seed(1))
    b = flip_pad_crop(images, 4, torch.Generator().manual_seed(1))
    c = flip_pad_crop(images, 4, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_normalize_matches_definition():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.25, 0.2])
    want = (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x, mean, std), want)


def test_device_loader_epochs_are_reproducible_and_drop_last():
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(50)
    loader = DeviceLoader(x, y, 16, [0.5] * 3, [0.25] * 3, train=True, augment=True, pad=2, seed=7)
    assert len(loader) == 3
    e0 = list(loader.epoch(0))
    again = list(loader.epoch(0))
    e1 = list(loader.epoch(1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, again))
    assert not torch.equal(e0[0][1], e1[0][1])
    labels = torch.cat([b[1] for b in e0])
    assert len(labels) == 48 and len(set(labels.tolist())) == 48  # a permutation, last partial batch dropped
    # resuming at step 2 yields exactly the remaining batch
    tail = list(loader.epoch(0, start_step=2))
    assert len(tail) == 1 and torch.equal(tail[0][0], e0[2][0])
    test = DeviceLoader(x, y, 16, [0.5] * 3, [0.25] * 3, train=False)
    assert len(test) == 4 and torch.equal(torch.cat([b[1] for b in test.epoch(0)]), y)


@pytest.mark.parametrize("download", [False, True])
def test_finetune_missing_dataset_says_what_to_place_where_and_no_advice_already_taken(tmp_path, monkeypatch, download):
    """download=false: run with download=true or place the files (torchvision's layout named); download=true
    (the default) that failed: place them by hand, never 'run with dataset.download=true' again."""
    from types import SimpleNamespace

    from sam_bench.data import finetune

    class Unreachable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")

    entry = finetune.FINETUNE["stanford_cars"]
    monkeypatch.setitem(finetune.FINETUNE, "stanford_cars", (Unreachable, *entry[1:]))
    cfg = SimpleNamespace(name="stanford_cars", root=str(tmp_path), num_classes=196, image_size=32, resize=36, mean=[0.5] * 3,
                          std=[0.25] * 3, num_workers=0, download=download)
    with pytest.raises(DataError) as err:
        finetune.build_finetune(cfg, 4, 4, torch.device("cpu"), 0, False)
    msg = str(err.value)
    assert f"{tmp_path}/stanford_cars/ with devkit/, cars_train/, cars_test/" in msg and "by hand" in msg
    assert ("run with dataset.download=true" in msg) is not download
