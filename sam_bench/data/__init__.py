"""Datasets as uint8 tensors on the training device (:class:`DeviceLoader`), or streamed from
disk for ImageNet and the finetuning sets (:class:`StreamLoader`, same interface)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from sam_bench.data import cifar, fashion_mnist, finetune, imagenet, svhn
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
from sam_bench.paths import data_dir

IN_MEMORY = ("cifar10", "cifar100", "cifar10_noisy", "cifar100_noisy", "fashion_mnist", "svhn", "synthetic")
STREAMED = ("imagenet",) + tuple(FINETUNE)
DATASETS = IN_MEMORY + STREAMED

log = logging.getLogger("sam_bench")

__all__ = ["DATASETS", "DataBundle", "DeviceLoader", "StreamLoader", "build_data", "files_problem", "load_arrays", "split_validation"]


@dataclass
class DataBundle:
    train: DeviceLoader | StreamLoader
    test: DeviceLoader | StreamLoader
    num_classes: int
    in_chans: int
    val: DeviceLoader | None = None  # the last ``val_size`` training images (dataset.val_size)
    noise: NoisyLabels | None = None  # the training images' label noise (drawn over the full set; the validation split keeps clean labels)
    noisy_train: DeviceLoader | None = None  # training images whose label was corrupted, noisy labels


def load_arrays(ds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y) on the CPU, uint8 NCHW images and int64 labels."""
    base = ds.name.removesuffix("_noisy")
    if base in ("cifar10", "cifar100"):
        arrays = load_cifar(base, data_dir(ds), ds.download)
    elif ds.name == "fashion_mnist":
        arrays = load_fashion_mnist(data_dir(ds), _system_dir(ds), ds.download)
    elif ds.name == "svhn":
        arrays = load_svhn(data_dir(ds), ds.download, ds.svhn_extra)
    elif ds.name == "synthetic":
        arrays = make_synthetic(ds.train_size or 5000, ds.test_size or 1000, ds.num_classes, ds.in_chans, ds.image_size, ds.data_seed)
    else:
        raise ConfigError(f"dataset.name={ds.name!r} is not an in-memory dataset; choose one of: {', '.join(IN_MEMORY)}")
    train_x, train_y, test_x, test_y = arrays
    if ds.train_subset:
        train_x, train_y = train_x[: ds.train_subset], train_y[: ds.train_subset]
    if ds.test_subset:
        test_x, test_y = test_x[: ds.test_subset], test_y[: ds.test_subset]
    c, h, w = train_x.shape[1:]
    if c != ds.in_chans or h != w or h > ds.image_size:
        raise ConfigError(f"dataset {ds.name}: images are {(c, h, w)}, config says (in_chans, image_size, image_size) = "
                          f"{(ds.in_chans, ds.image_size, ds.image_size)} (a larger image_size upsamples the batches, a smaller one is refused)")
    for split, y in (("training", train_y), ("test", test_y)):
        _check_labels(ds, split, y)
    return train_x, train_y, test_x, test_y


def _system_dir(ds) -> str | None:
    return ds.system_dir and os.path.expanduser(ds.system_dir)


def files_problem(ds, root: str) -> str | None:
    """The one-line refusal the loader of ``ds`` would raise for its files under ``root`` (missing,
    corrupt, or not where it looks), from checks cheap enough to run for each point of a sweep before
    the first one trains (each module's ``files_problem`` says what it reads); None when they pass,
    where a download would be tried, and for the synthetic set."""
    base = ds.name.removesuffix("_noisy")
    if base in cifar.CIFAR_CLASSES:
        return cifar.files_problem(base, root, ds.download)
    if ds.name == "fashion_mnist":
        return fashion_mnist.files_problem(root, _system_dir(ds), ds.download)
    if ds.name == "svhn":
        return svhn.files_problem(root, ds.download, ds.svhn_extra)
    if ds.name == "imagenet":
        return imagenet.files_problem(root, ds.num_classes)
    if ds.name in FINETUNE:
        return finetune.files_problem(ds.name, root, ds.download)
    return None


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
        if ds.resize < ds.image_size:
            raise ConfigError(f"dataset.resize={ds.resize} < dataset.image_size={ds.image_size}: evaluation would centre-crop "
                              f"{ds.image_size} px out of a {ds.resize} px image, mostly zero padding; set dataset.resize="
                              f"{ds.image_size + 32} (image_size + 32, the official code's crop padding)")
        if ds.val_size or ds.label_noise.rate or ds.cutout or ds.autoaugment or ds.train_subset or ds.test_subset:
            raise ConfigError(f"dataset {ds.name} is streamed from disk: val_size, label_noise, cutout, autoaugment, train_subset and "
                              f"test_subset apply to in-memory datasets ({', '.join(IN_MEMORY)}); set them to null")
        build = build_imagenet if ds.name == "imagenet" else build_finetune
        train, test = build(ds, batch_size, eval_batch_size, device, seed, channels_last)
        return DataBundle(train=train, test=test, num_classes=ds.num_classes, in_chans=ds.in_chans)
    train_x, train_y, test_x, test_y = load_arrays(ds)
    native = train_x.shape[-1]
    if ds.augment == "basic" and not ds.pad < native:
        raise ConfigError(f"dataset.pad={ds.pad} must be below the {native} px image size (reflect padding); the paper pads 4")
    # noise drawn over the full training set (a validation split leaves the training images' noise as it was); the
    # held-out labels stay clean, as the paper's "clean random 10% validation split" that chose ρ (Table 8)
    noise = None
    if ds.label_noise.rate > 0:
        noise = make_noisy_labels(train_y, ds.num_classes, ds.label_noise.rate, ds.label_noise.mode, ds.label_noise.seed)
    (train_x, train_y), val = split_validation(train_x, train_y, ds.val_size)
    if noise is not None:
        noise = noise.first(len(train_y))  # the images trained on: their rate, file and memorisation figure
        train_y = noise.noisy
    if batch_size > len(train_y):
        raise ConfigError(f"trainer.batch_size={batch_size} exceeds the {len(train_y)} training images of {ds.name}; lower trainer.batch_size")
    mean, std = list(ds.mean), list(ds.std)
    upsample_to = ds.image_size if ds.image_size > native else None  # Table 3: CIFAR at the pretrained net's resolution
    if upsample_to:
        log.info("dataset %s: %d px images are upsampled to image_size=%d (bicubic, per batch, after augmentation)",
                 ds.name, native, upsample_to)

    def eval_loader(x: torch.Tensor, y: torch.Tensor) -> DeviceLoader:
        return DeviceLoader(x.to(device), y.to(device), eval_batch_size, mean, std, train=False, channels_last=channels_last,
                            upsample_to=upsample_to)

    train = DeviceLoader(
        train_x.to(device), train_y.to(device), batch_size, mean, std,
        train=True, augment=ds.augment == "basic", pad=ds.pad, seed=seed, channels_last=channels_last,
        cutout=ds.cutout, cutout_per_image=ds.cutout_per_image, autoaugment=ds.autoaugment, upsample_to=upsample_to,
    )
    noisy_train = None
    if noise is not None:
        hit = noise.corrupted  # the corrupted labels of the training part
        noisy_train = eval_loader(train_x[hit], train_y[hit]) if hit.any() else None
    return DataBundle(
        train=train, test=eval_loader(test_x, test_y), num_classes=ds.num_classes, in_chans=ds.in_chans,
        val=eval_loader(*val) if val is not None else None, noise=noise, noisy_train=noisy_train,
    )
