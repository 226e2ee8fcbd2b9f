"""ImageNet (ILSVRC-2012) from the standard ImageFolder layout, streamed by :class:`StreamLoader`.

Preparing it (the usual pytorch/examples layout)::

    <data_root>/imagenet/train/n01440764/n01440764_10026.JPEG   # 1000 class folders, 1.28M images
    <data_root>/imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG  # 50k images, same 1000 folders

Get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org, untar the train tar and
each per-class tar inside it into train/<wnid>/, untar val into val/ and move each image into its
class folder (e.g. with the valprep.sh script of the pytorch/examples imagenet README, or
torchvision's ``ImageNet`` class which does it from the devkit). Nothing is downloaded here.

Training: Inception crop (area 0.08-1, aspect 3/4-4/3) to ``image_size`` + horizontal flip
(``dataset.augment=none``: as evaluation); evaluation: resize the short side to ``resize`` (256) + centre crop ``image_size`` (224).
``gpu_decode`` ships raw JPEG bytes and decodes them with nvJPEG
(``torchvision.io.decode_jpeg(device='cuda')``), cropping on the GPU.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.io import read_file
from torchvision.transforms import v2

from sam_bench.data.stream import StreamLoader
from sam_bench.errors import DataError
from sam_bench.paths import data_dir


def pil_rgb(path: str) -> Image.Image:
    """Open an image as RGB; a truncated or corrupt file becomes a DataError naming it."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # forces the full decode here, inside the try
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}); it is truncated or corrupt: replace or delete it") from e


def raw_bytes(path: str) -> torch.Tensor:
    """The file as a uint8 tensor, for GPU decoding."""
    try:
        return read_file(path)
    except (OSError, RuntimeError) as e:
        raise DataError(f"{path} is unreadable ({e}); replace or delete it") from e


def train_transform(size: int) -> v2.Transform:
    """Inception crop + flip (works on PIL images and on uint8 CHW tensors on any device)."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
    ])


def eval_transform(size: int, resize: int) -> v2.Transform:
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])


def image_folder(path: str, transform: Callable | None, loader: Callable = pil_rgb) -> ImageFolder:
    """torchvision's ImageFolder with clear errors for a missing or empty folder."""
    if not os.path.isdir(path):
        raise DataError(f"{path} is missing; prepare ImageNet in the ImageFolder layout (see sam_bench/data/imagenet.py) or set data_root=...")
    try:
        return ImageFolder(path, transform=transform, loader=loader)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{path}: {e}; it needs one sub-folder of images per class") from e


def augments(ds) -> bool:
    """Whether training images of a streamed dataset get the Inception crop + flip
    (``dataset.augment=basic``); with ``none`` they are prepared as the evaluation images are."""
    return getattr(ds, "augment", "basic") != "none"


def _same_classes(train_ds: ImageFolder, test_ds: ImageFolder, base: str) -> None:
    """Labels are folder positions: a class folder missing from (or extra in) val would shift every
    later label, so the two folder lists must be equal."""
    if test_ds.classes != train_ds.classes:
        only_train = sorted(set(train_ds.classes) - set(test_ds.classes))
        only_val = sorted(set(test_ds.classes) - set(train_ds.classes))
        raise DataError(f"{base}/val has other class folders than {base}/train (only in train: {only_train[:5]}, only in val: "
                        f"{only_val[:5]}); labels are folder positions, so val needs exactly train's class folders")


def build_imagenet(ds, batch_size: int, eval_batch_size: int, device: torch.device, seed: int, channels_last: bool):
    """(train, val) StreamLoaders over ``<root>/imagenet/{train,val}``; val is the reported split."""
    base = os.path.join(data_dir(ds), "imagenet")
    gpu = ds.gpu_decode
    tt = train_transform(ds.image_size) if augments(ds) else eval_transform(ds.image_size, ds.resize)
    train_ds = image_folder(os.path.join(base, "train"), None if gpu else tt, raw_bytes if gpu else pil_rgb)
    test_ds = image_folder(os.path.join(base, "val"), None if gpu else eval_transform(ds.image_size, ds.resize), raw_bytes if gpu else pil_rgb)
    if len(train_ds.classes) != ds.num_classes:
        raise DataError(f"{base}/train has {len(train_ds.classes)} class folders; dataset.num_classes={ds.num_classes}")
    _same_classes(train_ds, test_ds, base)
    common = dict(device=device, seed=seed, num_workers=ds.num_workers, channels_last=channels_last)
    te_gpu = v2.Compose([v2.Resize(ds.resize, antialias=True), v2.CenterCrop(ds.image_size)])
    tr_gpu = v2.Compose([v2.RandomResizedCrop(ds.image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                         v2.RandomHorizontalFlip()]) if augments(ds) else te_gpu
    train = StreamLoader(train_ds, batch_size, list(ds.mean), list(ds.std), train=True, gpu_transform=tr_gpu if gpu else None, **common)
    test = StreamLoader(test_ds, eval_batch_size, list(ds.mean), list(ds.std), train=False, gpu_transform=te_gpu if gpu else None, **common)
    return train, test
