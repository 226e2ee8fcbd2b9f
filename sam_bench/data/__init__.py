"""Datasets as uint8 tensors on the training device (:class:`DeviceLoader`), or streamed from
disk for ImageNet and the finetuning sets (:class:`StreamLoader`, same interface)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sam_bench.data.cifar import load_cifar
from sam_bench.data.fashion_mnist import load_fashion_mnist
from sam_bench.data.finetune import FINETUNE, build_finetune
from sam_bench.data.imagenet import build_imagenet
from sam_bench.data.loader import DeviceLoader
from sam_bench.data.noisy import NoisyLabels, make_noisy_labels
from sam_bench.data.stream import StreamLoader
from sam_bench.data.svhn import load_svhn
from sam_bench.data.synthetic import make_synthetic
from sam_bench.errors import ConfigError, DataError

IN_MEMORY = ("cifar10", "cifar100", "cifar10_noisy", "cifar100_noisy", "fashion_mnist", "svhn", "synthetic")
STREAMED = ("imagenet",) + tuple(FINETUNE)
DATASETS = IN_MEMORY + STREAMED

__all__ = ["DATASETS", "DataBundle", "DeviceLoader", "StreamLoader", "build_data", "load_arrays", "split_validation"]


@dataclass
class DataBundle:
    train: DeviceLoader | StreamLoader
    test: DeviceLoader | StreamLoader
    num_classes: int
    in_chans: int
    val: DeviceLoader | None = None  # the last ``val_size`` training images (dataset.val_size)
    noise: NoisyLabels | None = None  # label noise over the full training set (before the split)
    noisy_train: DeviceLoader | None = None  # training images whose label was corrupted, noisy labels


def load_arrays(ds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y) on the CPU, uint8 NCHW images and int64 labels."""
    base = ds.name.removesuffix("_noisy")
    if base in ("cifar10", "cifar100"):
        arrays = load_cifar(base, ds.root, ds.download)
    elif ds.name == "fashion_mnist":
        arrays = load_fashion_mnist(ds.root, ds.system_dir, ds.download)
    elif ds.name == "svhn":
        arrays = load_svhn(ds.root, ds.download, ds.svhn_extra)
    elif ds.name == "synthetic":
        arrays = make_synthetic(ds.train_size or 5000, ds.test_size or 1000, ds.num_classes, ds.in_chans, ds.image_size, ds.data_seed)
    else:
        raise ConfigError(f"dataset.name={ds.name!r} is not an in-memory dataset; choose one of: {', '.join(IN_MEMORY)}")
    train_x, train_y, test_x, test_y = arrays
    if ds.train_subset:
        train_x, train_y = train_x[: ds.train_subset], train_y[: ds.train_subset]
    if ds.test_subset:
        test_x, test_y = test_x[: ds.test_subset], test_y[: ds.test_subset]
    expected = (ds.in_chans, ds.image_size, ds.image_size)
    if tuple(train_x.shape[1:]) != expected:
        raise ConfigError(f"dataset {ds.name}: images are {tuple(train_x.shape[1:])}, config says (in_chans, image_size, image_size) = {expected}")
    for split, y in (("training", train_y), ("test", test_y)):
        _check_labels(ds, split, y)
    return train_x, train_y, test_x, test_y


def _check_labels(ds, split: str, labels: torch.Tensor) -> None:
    """Every label in [0, num_classes): a corrupt label file or a wrong ``dataset.num_classes``
    fails here with its numbers, not as an index error deep in the loss."""
    if len(labels) and (labels.min() < 0 or labels.max() >= ds.num_classes):
        bad = labels[(labels < 0) | (labels >= ds.num_classes)]
        raise DataError(f"dataset {ds.name}: {len(bad)} {split} label(s) outside [0, {ds.num_classes}) (e.g. {int(bad[0])}); the label "
                        f"file is corrupt or dataset.num_classes={ds.num_classes} is wrong")


def split_validation(x: torch.Tensor, y: torch.Tensor, val_size: int | None):
    """Official split: train[:-val_size] for training, train[-val_size:] held out (45000/5000)."""
    if not val_size:
        return (x, y), None
    if not 0 < val_size < len(y):
        raise ConfigError(f"dataset.val_size={val_size} must be between 1 and {len(y) - 1} (the {len(y)} training images)")
    return (x[:-val_size], y[:-val_size]), (x[-val_size:], y[-val_size:])


def build_data(ds, batch_size: int, eval_batch_size: int, device: torch.device, seed: int, channels_last: bool) -> DataBundle:
    """Load ``ds`` and build the training, validation (optional) and test loaders."""
    if ds.name in STREAMED:
        if ds.val_size or ds.label_noise.rate or ds.cutout or ds.autoaugment:
            raise ConfigError(f"dataset {ds.name} is streamed from disk: val_size, label_noise, cutout and autoaugment apply to in-memory datasets ({', '.join(IN_MEMORY)})")
        build = build_imagenet if ds.name == "imagenet" else build_finetune
        train, test = build(ds, batch_size, eval_batch_size, device, seed, channels_last)
        return DataBundle(train=train, test=test, num_classes=ds.num_classes, in_chans=ds.in_chans)
    train_x, train_y, test_x, test_y = load_arrays(ds)
    noise = None
    if ds.label_noise.rate > 0:
        noise = make_noisy_labels(train_y, ds.num_classes, ds.label_noise.rate, ds.label_noise.mode, ds.label_noise.seed)
        train_y = noise.noisy
    (train_x, train_y), val = split_validation(train_x, train_y, ds.val_size)
    if batch_size > len(train_y):
        raise ConfigError(f"trainer.batch_size={batch_size} exceeds the {len(train_y)} training images of {ds.name}; lower trainer.batch_size")
    mean, std = list(ds.mean), list(ds.std)

    def eval_loader(x: torch.Tensor, y: torch.Tensor) -> DeviceLoader:
        return DeviceLoader(x.to(device), y.to(device), eval_batch_size, mean, std, train=False, channels_last=channels_last)

    train = DeviceLoader(
        train_x.to(device), train_y.to(device), batch_size, mean, std,
        train=True, augment=ds.augment == "basic", pad=ds.pad, seed=seed, channels_last=channels_last,
        cutout=ds.cutout, cutout_per_image=ds.cutout_per_image, autoaugment=ds.autoaugment,
    )
    noisy_train = None
    if noise is not None:
        hit = noise.corrupted[: len(train_y)]  # corrupted labels inside the training part
        noisy_train = eval_loader(train_x[hit], train_y[hit]) if hit.any() else None
    return DataBundle(
        train=train, test=eval_loader(test_x, test_y), num_classes=ds.num_classes, in_chans=ds.in_chans,
        val=eval_loader(*val) if val is not None else None, noise=noise, noisy_train=noisy_train,
    )
