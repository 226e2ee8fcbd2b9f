"""Datasets as uint8 tensors on the training device, wrapped in :class:`DeviceLoader`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sam_bench.data.cifar import load_cifar
from sam_bench.data.fashion_mnist import load_fashion_mnist
from sam_bench.data.loader import DeviceLoader
from sam_bench.data.synthetic import make_synthetic
from sam_bench.errors import ConfigError

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "synthetic")

__all__ = ["DATASETS", "DataBundle", "DeviceLoader", "build_data", "load_arrays"]


@dataclass
class DataBundle:
    train: DeviceLoader
    test: DeviceLoader
    num_classes: int
    in_chans: int


def load_arrays(ds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y) on the CPU, uint8 NCHW images and int64 labels."""
    if ds.name in ("cifar10", "cifar100"):
        arrays = load_cifar(ds.name, ds.root, ds.download)
    elif ds.name == "fashion_mnist":
        arrays = load_fashion_mnist(ds.root, ds.system_dir, ds.download)
    elif ds.name == "synthetic":
        arrays = make_synthetic(ds.train_size or 5000, ds.test_size or 1000, ds.num_classes, ds.in_chans, ds.image_size, ds.data_seed)
    else:
        raise ConfigError(f"dataset.name={ds.name!r} is unknown; choose one of: {', '.join(DATASETS)}")
    train_x, train_y, test_x, test_y = arrays
    if ds.train_subset:
        train_x, train_y = train_x[: ds.train_subset], train_y[: ds.train_subset]
    if ds.test_subset:
        test_x, test_y = test_x[: ds.test_subset], test_y[: ds.test_subset]
    expected = (ds.in_chans, ds.image_size, ds.image_size)
    if tuple(train_x.shape[1:]) != expected:
        raise ConfigError(f"dataset {ds.name}: images are {tuple(train_x.shape[1:])}, config says (in_chans, image_size, image_size) = {expected}")
    return train_x, train_y, test_x, test_y


def build_data(ds, batch_size: int, eval_batch_size: int, device: torch.device, seed: int, channels_last: bool) -> DataBundle:
    """Load ``ds`` onto ``device`` and build the training and test loaders."""
    train_x, train_y, test_x, test_y = load_arrays(ds)
    if batch_size > len(train_y):
        raise ConfigError(f"trainer.batch_size={batch_size} exceeds the {len(train_y)} training images of {ds.name}; lower trainer.batch_size")
    mean, std = list(ds.mean), list(ds.std)
    train = DeviceLoader(
        train_x.to(device), train_y.to(device), batch_size, mean, std,
        train=True, augment=ds.augment == "basic", pad=ds.pad, seed=seed, channels_last=channels_last,
    )
    test = DeviceLoader(test_x.to(device), test_y.to(device), eval_batch_size, mean, std, train=False, channels_last=channels_last)
    return DataBundle(train=train, test=test, num_classes=ds.num_classes, in_chans=ds.in_chans)
