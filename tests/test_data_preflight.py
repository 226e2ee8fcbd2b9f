"""Each dataset's cheap file check (``files_problem``), run by the CLI for every sweep point before the
first trains; the in-process md5 cache; the gpu_decode-on-the-CPU warning."""

import logging
import os
import shutil
import time

import pytest
import torch
import torchvision.datasets.utils as tv_utils
from torchvision.datasets import CIFAR10, SVHN

from conftest import cli_env_under, sam_bench_forked
from datafiles import idx_bytes, imagenet_cfg, patch_cifar_md5, patch_fashion_md5, write_cifar, write_fashion_mnist_gz, write_image_folder, write_svhn
from sam_bench.data import build_data, cifar, fashion_mnist, finetune, imagenet, integrity, svhn
from sam_bench.errors import DataError


def _age(*paths, seconds: int = 3600) -> None:
    """Set the files' mtime back: the cache keeps no digest of a file modified in the last seconds."""
    then = time.time_ns() - seconds * 10**9
    for p in paths:
        os.utime(p, ns=(then, then))


def _count_calls(monkeypatch, module, name: str) -> list[str]:
    """The base names of the files ``module.name(path, ...)`` is called on, in order."""
    calls, real = [], getattr(module, name)

    def counting(path, *args, **kwargs):
        calls.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The files sam_bench's md5 helper hashes."""
    return _count_calls(monkeypatch, integrity, "_hash")


@pytest.fixture
def tv_hashed(monkeypatch) -> list[str]:
    """The files torchvision's own integrity checks hash."""
    return _count_calls(monkeypatch, tv_utils, "calculate_md5")


def _raised(fn, *args, **kwargs) -> str:
    """The message of the DataError ``fn`` raises."""
    with pytest.raises(DataError) as e:
        fn(*args, **kwargs)
    return str(e.value)


# ---------------------------------------------------------------- the md5 cache


def test_a_verified_file_is_hashed_once_and_again_after_it_changes(tmp_path, hashed):
    path = tmp_path / "batch"
    path.write_bytes(b"a" * 100)
    _age(path, seconds=3600)
    first = integrity.file_md5(str(path))
    assert integrity.file_md5(str(path)) == first and hashed == ["batch"]
    path.write_bytes(b"b" * 100)  # same size, another mtime
    _age(path, seconds=3000)
    second = integrity.file_md5(str(path))
    assert second != first and len(hashed) == 2
    mtime = path.stat().st_mtime_ns
    path.write_bytes(b"b" * 101)  # another size, the same mtime
    os.utime(path, ns=(mtime, mtime))
    assert integrity.file_md5(str(path)) != second and len(hashed) == 3
    assert integrity.md5_matches(str(path), integrity.file_md5(str(path))) and len(hashed) == 3
    assert not integrity.md5_matches(str(tmp_path / "absent"), first)


def test_a_file_modified_seconds_ago_is_hashed_each_time(tmp_path, hashed):
    """A rewrite within the filesystem's timestamp granularity keeps size and mtime: no digest is
    kept for a file that recent."""
    path = tmp_path / "fresh"
    path.write_bytes(b"x" * 10)
    integrity.file_md5(str(path))
    integrity.file_md5(str(path))
    assert hashed == ["fresh", "fresh"]


def test_cifar_files_checked_before_the_run_are_not_hashed_again_by_the_loader(tmp_path, monkeypatch, hashed, tv_hashed):
    """The preflight, load_cifar's own check and torchvision's check at each construction (train and
    test) hashed the 180 MB of CIFAR-10 four times in one process; now once."""
    patch_cifar_md5(monkeypatch, CIFAR10, write_cifar(tmp_path))
    _age(*(tmp_path / CIFAR10.base_folder).iterdir())
    assert cifar.files_problem("cifar10", str(tmp_path), download=False) is None
    assert len(hashed) == 7
    train_x, *_ = cifar.load_cifar("cifar10", str(tmp_path), download=False)
    assert train_x.shape == (100, 3, 32, 32) and len(hashed) == 7
    assert set(tv_hashed) <= {"batches.meta"}  # the class names, a few hundred bytes, read by torchvision itself


def test_svhn_files_are_hashed_once_per_load(tmp_path, monkeypatch, hashed, tv_hashed):
    """torchvision's SVHN hashed the 1.3 GB extra file again after the loader's own check."""
    files = write_svhn(tmp_path / "svhn")
    monkeypatch.setattr(SVHN, "split_list", {s: [u, f, files[s][2]] for s, (u, f, _) in SVHN.split_list.items()})
    _age(*(tmp_path / "svhn").iterdir())
    svhn.load_svhn(str(tmp_path), download=False)
    assert sorted(hashed) == ["extra_32x32.mat", "test_32x32.mat", "train_32x32.mat"] and tv_hashed == []


# ---------------------------------------------------------------- CIFAR


def test_cifar_check_says_what_the_loader_says(tmp_path, monkeypatch):
    patch_cifar_md5(monkeypatch, CIFAR10, write_cifar(tmp_path))
    assert cifar.files_problem("cifar10", str(tmp_path), download=False) is None
    batch = tmp_path / CIFAR10.base_folder / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:-10])
    message = cifar.files_problem("cifar10", str(tmp_path), download=False)
    assert "data_batch_2 fails its md5 checksum" in message
    assert message == _raised(cifar.load_cifar, "cifar10", str(tmp_path), False)
    assert cifar.files_problem("cifar10", str(tmp_path), download=True) is None  # the loader would download it again


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_check_without_a_copy_says_what_the_loader_says(tmp_path):
    root = str(tmp_path / "root")
    message = fashion_mnist.files_problem(root, None, download=False)
    assert "train-images-idx3-ubyte is missing" in message and message == _raised(fashion_mnist.load_fashion_mnist, root, None, False)
    assert fashion_mnist.files_problem(root, str(tmp_path / "nowhere"), download=True) is None  # torchvision would download it


def test_fashion_mnist_check_refuses_an_incomplete_system_dir_even_where_it_could_download(tmp_path):
    write_fashion_mnist_gz(tmp_path / "system")
    (tmp_path / "system" / "t10k-images-idx3-ubyte.gz").unlink()
    root, system = str(tmp_path / "root"), str(tmp_path / "system")
    message = fashion_mnist.files_problem(root, system, download=True)
    assert "lacks t10k-images-idx3-ubyte.gz" in message and message == _raised(fashion_mnist.load_fashion_mnist, root, system, True)


def test_fashion_mnist_check_accepts_gzip_files_to_extract_and_checks_the_extracted_ones(tmp_path, monkeypatch):
    arrays = write_fashion_mnist_gz(tmp_path / "system")
    patch_fashion_md5(monkeypatch, arrays)
    root, system = str(tmp_path / "root"), str(tmp_path / "system")
    assert fashion_mnist.files_problem(root, system, download=False) is None
    assert not (tmp_path / "root").exists()  # the check extracts nothing
    fashion_mnist.load_fashion_mnist(root, system, download=False)
    assert fashion_mnist.files_problem(root, None, download=False) is None
    flipped = arrays["t10k-labels-idx1-ubyte"].copy()
    flipped[0] = (flipped[0] + 1) % 10
    (tmp_path / "root" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(flipped))
    message = fashion_mnist.files_problem(root, None, download=True)  # a bad raw file is refused, download or not
    assert "raw/t10k-labels-idx1-ubyte is not the official" in message
    assert message == _raised(fashion_mnist.load_fashion_mnist, root, None, True)


# ---------------------------------------------------------------- SVHN


@pytest.fixture
def svhn_root(tmp_path, monkeypatch):
    files = write_svhn(tmp_path / "svhn")
    monkeypatch.setattr(SVHN, "split_list", {s: [u, f, files[s][2]] for s, (u, f, _) in SVHN.split_list.items()})
    return tmp_path


def test_svhn_check_says_what_the_loader_says(svhn_root):
    root = str(svhn_root)
    assert svhn.files_problem(root, download=False) is None
    test = svhn_root / "svhn" / "test_32x32.mat"
    test.write_bytes(test.read_bytes()[:-1] + b"!")  # same length, other bytes: md5
    message = svhn.files_problem(root, download=False)
    assert "test_32x32.mat fails its md5 checksum" in message and message == _raised(svhn.load_svhn, root, False)
    (svhn_root / "svhn" / "train_32x32.mat").unlink()
    message = svhn.files_problem(root, download=False, extra=False)
    assert "train_32x32.mat is missing" in message and message == _raised(svhn.load_svhn, root, False, False)
    assert svhn.files_problem(root, download=True) is None


@pytest.mark.parametrize("compressed", [False, True])
def test_svhn_check_finds_a_truncated_extra_file_without_hashing_it(svhn_root, hashed, compressed):
    """extra_32x32.mat (1.3 GB) is checked for length from its MAT-file tags alone; a damaged copy
    of the right length is left to the loader's md5 check."""
    import numpy as np
    import scipy.io

    extra = svhn_root / "svhn" / "extra_32x32.mat"
    rng = np.random.default_rng(0)
    scipy.io.savemat(str(extra), {"X": rng.integers(0, 256, size=(32, 32, 3, 16), dtype=np.uint8),
                                  "y": rng.integers(1, 11, size=(16, 1)).astype(np.uint8)}, do_compression=compressed)
    assert svhn.files_problem(str(svhn_root), download=False) is None and "extra_32x32.mat" not in hashed
    full = extra.read_bytes()
    for cut in (1, 100, len(full) - 130):
        extra.write_bytes(full[:-cut])
        message = svhn.files_problem(str(svhn_root), download=False)
        assert message == f"svhn: {extra} fails its md5 checksum (corrupt or truncated); delete it and run with dataset.download=true"
    extra.write_bytes(full[:-1] + bytes([full[-1] ^ 1]))  # the right length: passes here, refused by the loader's md5
    assert svhn.files_problem(str(svhn_root), download=False, extra=True) is None
    assert "extra_32x32.mat fails its md5" in _raised(svhn.load_svhn, str(svhn_root), False)


# ---------------------------------------------------------------- ImageNet


@pytest.fixture
def imagenet_root(tmp_path):
    write_image_folder(tmp_path / "imagenet" / "train", per_class=2)
    write_image_folder(tmp_path / "imagenet" / "val", per_class=1, seed=1)
    return tmp_path


def _build_imagenet(root, **over):
    return imagenet.build_imagenet(imagenet_cfg(root, **over), 2, 2, torch.device("cpu"), 0, False)


def _break_val(root, how):
    val = root / "imagenet" / "val"
    if how == "missing":
        shutil.rmtree(val)
    elif how == "no class folder":
        shutil.rmtree(val)
        val.mkdir()
    elif how == "loose images":
        shutil.move(str(next(val.rglob("*.JPEG"))), val / "ILSVRC2012_val_00000001.JPEG")
    elif how == "other classes":
        (val / "n02").rename(val / "n03")


@pytest.mark.parametrize("how", ["missing", "no class folder", "loose images", "other classes"])
def test_imagenet_check_says_what_the_loader_says(imagenet_root, how):
    assert imagenet.files_problem(str(imagenet_root), 2) is None
    _break_val(imagenet_root, how)
    message = imagenet.files_problem(str(imagenet_root), 2)
    assert message is not None and message == _raised(_build_imagenet, imagenet_root)


def test_imagenet_check_names_a_class_count_other_than_num_classes(imagenet_root):
    message = imagenet.files_problem(str(imagenet_root), 1000)
    assert "train has 2 class folders, but dataset.num_classes=1000" in message
    assert message == _raised(_build_imagenet, imagenet_root, num_classes=1000)


def test_imagenet_check_lists_only_the_top_of_train_and_val(imagenet_root, monkeypatch):
    """1.28 M files: the class folders are not listed (ImageFolder does that at load)."""
    listed = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(os.path.relpath(path, imagenet_root)) or real(path))
    assert imagenet.files_problem(str(imagenet_root), 2) is None
    assert sorted(listed) == [os.path.join("imagenet", "train"), os.path.join("imagenet", "val")]


# ---------------------------------------------------------------- finetuning sets


def test_finetune_check_says_what_the_loader_says(tmp_path):
    from types import SimpleNamespace

    message = finetune.files_problem("flowers102", str(tmp_path), download=False)
    assert message.startswith("flowers102: the 'train' split under")
    cfg = SimpleNamespace(name="flowers102", root=str(tmp_path), num_classes=102, image_size=32, resize=36, mean=[0.5] * 3,
                          std=[0.25] * 3, num_workers=0, download=False)
    assert message == _raised(finetune.build_finetune, cfg, 4, 4, torch.device("cpu"), 0, False)
    assert finetune.files_problem("flowers102", str(tmp_path), download=True) is None


# ---------------------------------------------------------------- the CLI's dispatch


@pytest.mark.parametrize("name,overrides", [
    ("cifar100_noisy", []),
    ("fashion_mnist", ["dataset.system_dir=null"]),
    ("svhn", []),
    ("imagenet", []),
    ("flowers102", []),
])
def test_the_preflight_refuses_each_dataset_as_its_trainer_would(compose_train, tmp_path, name, overrides):
    """The sweep's check of a point without its files: the trainer's own one-line message, once per
    (dataset, directory)."""
    from sam_bench.cli import _missing_data

    cfg = compose_train([f"dataset={name}", "dataset.download=false", f"data_root={tmp_path}", *overrides])
    checked: set = set()
    message = _missing_data(cfg.dataset, checked)
    assert message is not None and "\n" not in message
    assert message == _raised(build_data, cfg.dataset, 4, 4, torch.device("cpu"), 0, False)
    assert _missing_data(cfg.dataset, checked) is None  # checked once


def test_the_preflight_passes_a_dataset_whose_files_are_there(compose_train, tmp_path):
    from sam_bench.cli import _missing_data

    write_image_folder(tmp_path / "imagenet" / "train", classes=tuple(f"n{i:02d}" for i in range(3)), per_class=1)
    write_image_folder(tmp_path / "imagenet" / "val", classes=tuple(f"n{i:02d}" for i in range(3)), per_class=1)
    cfg = compose_train(["dataset=imagenet", "dataset.num_classes=3", f"data_root={tmp_path}"])
    assert _missing_data(cfg.dataset, set()) is None
    cfg = compose_train(["dataset=synthetic", "dataset.download=false", f"data_root={tmp_path}"])
    assert _missing_data(cfg.dataset, set()) is None


@pytest.mark.slow
def test_a_sweep_point_of_fashion_mnist_without_its_files_fails_before_any_point_trains(tmp_path):
    tiny = ["dataset.train_size=64", "dataset.test_size=32", "model=wrn", "model.kwargs.depth=10", "model.kwargs.width=1",
            "trainer.batch_size=32", "trainer.eval_batch_size=32", "trainer.epochs=1", "trainer.progress=false"]
    proc = sam_bench_forked(["train", "-m", *tiny, "dataset=synthetic,fashion_mnist", "dataset.download=false", "dataset.system_dir=null",
                             f"data_root={tmp_path / 'empty'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cli_env_under(tmp_path))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"train-images-idx3-ubyte is missing in {tmp_path / 'empty' / 'FashionMNIST' / 'raw'}" in lines[0]
    assert lines[0].endswith("(sweep point dataset=fashion_mnist)") and not (tmp_path / "sweep").exists()


# ---------------------------------------------------------------- gpu_decode on the CPU


@pytest.mark.parametrize("gpu_decode", [False, True])
def test_gpu_decode_on_the_cpu_is_warned_about_once(imagenet_root, caplog, gpu_decode):
    with caplog.at_level(logging.WARNING, logger="sam_bench"):
        train, test = _build_imagenet(imagenet_root, gpu_decode=gpu_decode)
        next(iter(train.epoch(0)))
        next(iter(test.epoch(0)))
    warned = [r.getMessage() for r in caplog.records if "gpu_decode" in r.getMessage()]
    if not gpu_decode:
        assert warned == []
    else:
        assert len(warned) == 1 and warned[0].startswith("dataset.gpu_decode=true: no CUDA device (training on cpu), JPEGs are "
                                                         "decoded on the CPU") and "drop dataset.gpu_decode or train on a GPU" in warned[0]
