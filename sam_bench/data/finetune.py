"""The finetuning datasets of Table 3 that torchvision provides, at the model's resolution.

Each comes from its torchvision class under ``<data_root>`` (checksummed download where the
dataset's host still serves it; Stanford Cars must be placed by hand, see torchvision's docs).
Training: Inception crop + flip to ``image_size`` (``dataset.augment=none``: as evaluation); evaluation: resize to ``resize`` + centre crop,
as for ImageNet. Streamed by :class:`StreamLoader` with the same interface as the CIFAR loader.
"""

from __future__ import annotations

from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets as tvd

from sam_bench.data.imagenet import augments, eval_transform, train_transform
from sam_bench.data.stream import StreamLoader
from sam_bench.errors import DataError
from sam_bench.paths import data_dir

# name -> (torchvision class, training splits, test split, extra kwargs, classes)
FINETUNE = {
    "flowers102": (tvd.Flowers102, ("train", "val"), "test", {}, 102),
    "oxford_pets": (tvd.OxfordIIITPet, ("trainval",), "test", {"target_types": "category"}, 37),
    "stanford_cars": (tvd.StanfordCars, ("train",), "test", {}, 196),
    "fgvc_aircraft": (tvd.FGVCAircraft, ("trainval",), "test", {"annotation_level": "variant"}, 100),
    "food101": (tvd.Food101, ("train",), "test", {}, 101),
}


#: What torchvision expects under the data root, for the error message (torchvision's own layouts)
LAYOUT = {
    "flowers102": "flowers-102/ with jpg/, imagelabels.mat and setid.mat",
    "oxford_pets": "oxford-iiit-pet/ with images/ and annotations/",
    "stanford_cars": "stanford_cars/ with devkit/, cars_train/, cars_test/ and cars_test_annos_withlabels.mat "
                     "(its download URL is gone: fetch it by hand)",
    "fgvc_aircraft": "fgvc-aircraft-2013b/ with data/",
    "food101": "food-101/ with images/ and meta/",
}


def _open(name: str, split: str, root: str, download: bool, transform) -> Dataset:
    cls, _, _, kwargs, _ = FINETUNE[name]
    try:
        return cls(root, split=split, transform=transform, download=download, **kwargs)
    except Exception as e:  # torchvision: RuntimeError("Dataset not found or corrupted ..."), network errors
        reason = (str(e).strip().splitlines() or [""])[0]
        fix = (f"the download failed or is not possible: place the files by hand, torchvision's layout: {root}/{LAYOUT[name]}"
               if download else f"run with dataset.download=true (needs network) or place the files by hand: {root}/{LAYOUT[name]}")
        raise DataError(f"{name}: the {split!r} split under {root} is missing or corrupt ({type(e).__name__}: {reason}); {fix}") from e


def files_problem(name: str, root: str, download: bool) -> str | None:
    """The one-line refusal :func:`build_finetune` would raise for a split that is not there, else
    None (also when a download would be tried): each split's torchvision class is built as the
    loader builds it, which checks its folders (and the md5 of Flowers-102's two small .mat files)
    and reads its index files; no image is opened."""
    if download:
        return None
    _, train_splits, test_split, _, _ = FINETUNE[name]
    try:
        for split in (*train_splits, test_split):
            _open(name, split, root, download=False, transform=None)
    except DataError as e:
        return str(e)
    return None


def build_finetune(ds, batch_size: int, eval_batch_size: int, device, seed: int, channels_last: bool):
    """(train, test) StreamLoaders for ``ds.name`` at ``ds.image_size``."""
    _, train_splits, test_split, _, classes = FINETUNE[ds.name]
    if ds.num_classes != classes:
        raise DataError(f"{ds.name} has {classes} classes, but dataset.num_classes={ds.num_classes}; set dataset.num_classes={classes}")
    tt = train_transform(ds.image_size) if augments(ds) else eval_transform(ds.image_size, ds.resize)
    parts = [_open(ds.name, s, data_dir(ds), ds.download, tt) for s in train_splits]
    train_ds = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    test_ds = _open(ds.name, test_split, data_dir(ds), ds.download, eval_transform(ds.image_size, ds.resize))
    common = dict(device=device, seed=seed, num_workers=ds.num_workers, channels_last=channels_last)
    return (
        StreamLoader(train_ds, batch_size, list(ds.mean), list(ds.std), train=True, **common),
        StreamLoader(test_ds, eval_batch_size, list(ds.mean), list(ds.std), train=False, **common),
    )
