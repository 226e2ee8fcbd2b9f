"""ImageNet (ILSVRC-2012) from the standard ImageFolder layout, streamed by :class:`StreamLoader`.

Preparing it (the usual pytorch/examples layout)::

    <data_root>/imagenet/train/n01440764/n01440764_10026.JPEG   # 1000 class folders, 1.28M images
    <data_root>/imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG  # 50k images, same 1000 folders

Get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org, untar the train tar and
each per-class tar inside it into train/<wnid>/, untar val into val/ and move each image into its
class folder (e.g. with the valprep.sh script of the pytorch/examples imagenet README, or
torchvision's ``ImageNet`` class which does it from the devkit). Nothing is downloaded here. A
train/ or val/ with image files loose at its top level (a flat val/, or a valprep.sh that stopped
half-way) is refused: ImageFolder would skip those files and evaluate on the rest. The numbers of
images found are logged, with a warning at ``num_classes=1000`` when they are not ILSVRC-2012's.

Training: Inception crop (area 0.08-1, aspect 3/4-4/3) to ``image_size`` + horizontal flip
(``dataset.augment=none``: as evaluation); evaluation: resize the short side to ``resize`` (256) + centre crop ``image_size`` (224).
Both resize bicubically (antialiased), as the official code's ``_resize`` (``resize_bicubic``, for
the training crop and the evaluation crop alike) and timm's EfficientNet configs do.
``gpu_decode`` ships raw bytes and decodes the JPEGs with nvJPEG
(``torchvision.io.decode_jpeg(device='cuda')``), cropping on the GPU; files that are not YCbCr or
grayscale JPEGs (ImageNet train holds a PNG and 22 CMYK JPEGs under .JPEG names) are decoded by PIL
on the CPU, as without ``gpu_decode``, and cropped on the GPU with the rest.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.io import read_file
from torchvision.transforms import v2

from sam_bench.data.stream import StreamLoader
from sam_bench.errors import DataError
from sam_bench.paths import data_dir

log = logging.getLogger(__name__)

# ILSVRC-2012 (the official code's TRAIN_IMAGES / EVAL_IMAGES)
TRAIN_IMAGES, VAL_IMAGES = 1_281_167, 50_000
BICUBIC = v2.InterpolationMode.BICUBIC
VALPREP = ("the devkit's flat val/ must be sorted into one folder per class, e.g. with the valprep.sh script of the "
           "pytorch/examples imagenet README")


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
        inception_crop(size),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
    ])


def inception_crop(size: int) -> v2.RandomResizedCrop:
    """Area 0.08-1, aspect 3/4-4/3, resized bicubically as the official ``_resize``."""
    return v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=BICUBIC, antialias=True)


def eval_resize(resize: int) -> v2.Resize:
    """Short side to ``resize``, bicubically (the official evaluation crop resizes with ``resize_bicubic`` too)."""
    return v2.Resize(resize, interpolation=BICUBIC, antialias=True)


def eval_transform(size: int, resize: int) -> v2.Transform:
    return v2.Compose([eval_resize(resize), v2.CenterCrop(size), v2.PILToTensor()])


def _top_level(path: str) -> tuple[int, list[str]]:
    """(image files directly in ``path``, its sub-folders sorted as ImageFolder's classes)."""
    images, folders = 0, []
    with os.scandir(path) as entries:
        for e in entries:
            if e.is_dir():
                folders.append(e.name)
            elif e.is_file() and has_file_allowed_extension(e.name, IMG_EXTENSIONS):
                images += 1
    return images, sorted(folders)


def _split_classes(path: str) -> list[str]:
    """The class folders of a split folder, from its top-level listing alone (the images below are
    not listed); a DataError when it is missing, has none, or has images loose beside them."""
    if not os.path.isdir(path):
        raise DataError(f"{path} is missing; prepare ImageNet in the ImageFolder layout (see sam_bench/data/imagenet.py) or set data_root=...")
    loose, classes = _top_level(path)
    if loose and classes:  # ImageFolder would skip the loose files silently: an interrupted valprep.sh
        raise DataError(f"{path} holds {loose} image files at its top level beside {len(classes)} class folders, which would be "
                        f"skipped (a half-sorted val/?); {VALPREP}")
    if not classes:
        raise DataError(f"{path}: no class folder in it; it needs one sub-folder of images per class ({VALPREP})")
    return classes


def image_folder(path: str, transform: Callable | None, loader: Callable = pil_rgb) -> ImageFolder:
    """torchvision's ImageFolder with clear errors for a missing or empty folder."""
    _split_classes(path)
    try:
        return ImageFolder(path, transform=transform, loader=loader)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{path}: {e}; it needs one sub-folder of images per class ({VALPREP})") from e


def augments(ds) -> bool:
    """Whether training images of a streamed dataset get the Inception crop + flip
    (``dataset.augment=basic``); with ``none`` they are prepared as the evaluation images are."""
    return getattr(ds, "augment", "basic") != "none"


def _check_classes(base: str, train: list[str], val: list[str], num_classes: int) -> None:
    """As many class folders in train/ as ``num_classes``, and the same in val/: labels are folder
    positions, so a class folder missing from (or extra in) val would shift every later label."""
    if len(train) != num_classes:
        raise DataError(f"{base}/train has {len(train)} class folders, but dataset.num_classes={num_classes}; "
                        f"set dataset.num_classes={len(train)} for a subset of ImageNet, or complete {base}/train")
    if val != train:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise DataError(f"{base}/val has other class folders than {base}/train (only in train: {only_train[:5]}, only in val: "
                        f"{only_val[:5]}); labels are folder positions, so val needs exactly train's class folders")


def files_problem(root: str, num_classes: int) -> str | None:
    """The one-line refusal :func:`build_imagenet` would raise before reading an image, from the
    top-level listings of train/ and val/ alone, else None (ImageNet is never downloaded). The
    1.28 M files below are listed by ImageFolder at load, which also refuses a class folder without
    images."""
    base = os.path.join(root, "imagenet")
    try:
        train, val = [_split_classes(os.path.join(base, split)) for split in ("train", "val")]
        _check_classes(base, train, val, num_classes)
    except DataError as e:
        return str(e)
    return None


def _log_counts(base: str, n_train: int, n_val: int, num_classes: int) -> None:
    """The number of images found; at 1000 classes, a warning when they are not ILSVRC-2012's (a
    partly extracted train tar or val tar evaluates silently on what is there)."""
    log.info("%s: %d train images, %d val images", base, n_train, n_val)
    if num_classes == 1000 and (n_train, n_val) != (TRAIN_IMAGES, VAL_IMAGES):
        log.warning("%s holds %d train and %d val images, ILSVRC-2012 has %d and %d: missing or extra files change the "
                    "reported numbers", base, n_train, n_val, TRAIN_IMAGES, VAL_IMAGES)


def build_imagenet(ds, batch_size: int, eval_batch_size: int, device: torch.device, seed: int, channels_last: bool):
    """(train, val) StreamLoaders over ``<root>/imagenet/{train,val}``; val is the reported split."""
    base = os.path.join(data_dir(ds), "imagenet")
    gpu = ds.gpu_decode
    if gpu and device.type != "cuda":  # decode_jpeg(device="cpu") then decodes in the training process, one batch at a time
        log.warning("dataset.gpu_decode=true: no CUDA device (training on %s), JPEGs are decoded on the CPU in the training "
                    "process, not in the loader's workers; drop dataset.gpu_decode or train on a GPU", device)
    tt = train_transform(ds.image_size) if augments(ds) else eval_transform(ds.image_size, ds.resize)
    train_ds = image_folder(os.path.join(base, "train"), None if gpu else tt, raw_bytes if gpu else pil_rgb)
    test_ds = image_folder(os.path.join(base, "val"), None if gpu else eval_transform(ds.image_size, ds.resize), raw_bytes if gpu else pil_rgb)
    _check_classes(base, train_ds.classes, test_ds.classes, ds.num_classes)
    _log_counts(base, len(train_ds), len(test_ds), ds.num_classes)
    common = dict(device=device, seed=seed, num_workers=ds.num_workers, channels_last=channels_last)
    te_gpu = v2.Compose([eval_resize(ds.resize), v2.CenterCrop(ds.image_size)])
    tr_gpu = v2.Compose([inception_crop(ds.image_size), v2.RandomHorizontalFlip()]) if augments(ds) else te_gpu
    train = StreamLoader(train_ds, batch_size, list(ds.mean), list(ds.std), train=True, gpu_transform=tr_gpu if gpu else None, **common)
    test = StreamLoader(test_ds, eval_batch_size, list(ds.mean), list(ds.std), train=False, gpu_transform=te_gpu if gpu else None, **common)
    return train, test
