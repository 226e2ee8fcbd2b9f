"""ImageNet's on-disk quirks: a half-sorted val/, the image counts, files behind a .JPEG name that
nvJPEG cannot decode (a PNG, CMYK), and the bicubic resizes of the official pipeline."""

import io
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from datafiles import imagenet_cfg, write_image_folder
from sam_bench.data.imagenet import _log_counts, build_imagenet, eval_transform, pil_rgb, train_transform
from sam_bench.data.stream import StreamLoader, jpeg_components, pil_decode_rgb
from sam_bench.errors import DataError

BICUBIC = v2.InterpolationMode.BICUBIC


@pytest.fixture
def imagenet_root(tmp_path):
    write_image_folder(tmp_path / "imagenet" / "train", per_class=3)
    write_image_folder(tmp_path / "imagenet" / "val", per_class=2, size=(30, 40), seed=1)
    return tmp_path


def build(root, **over):
    return build_imagenet(imagenet_cfg(root, **over), 4, 4, torch.device("cpu"), 0, False)


# ---------------------------------------------------------------- D1: half-sorted folders, counts


@pytest.mark.parametrize("split", ["val", "train"])
def test_images_loose_beside_class_folders_are_refused(imagenet_root, split):
    """An interrupted valprep.sh leaves images at the top of val/ that ImageFolder skips: the run
    would report an error over the sorted few. It is refused in one line naming the count."""
    loose = write_image_folder(imagenet_root / "extra", classes=("x",), per_class=3, seed=2)
    for i, f in enumerate(loose):
        shutil.move(str(f), imagenet_root / "imagenet" / split / f"ILSVRC2012_val_{i:08d}.JPEG")
    with pytest.raises(DataError, match=rf"imagenet/{split} holds 3 image files at its top level beside 2 class folders") as e:
        build(imagenet_root)
    assert "valprep.sh" in str(e.value) and "\n" not in str(e.value)


def test_a_class_count_other_than_num_classes_names_the_fix(imagenet_root):
    with pytest.raises(DataError, match=r"imagenet/train has 2 class folders, but dataset.num_classes=1000; "
                                        r"set dataset.num_classes=2 for a subset of ImageNet, or complete .*imagenet/train"):
        build(imagenet_root, num_classes=1000)


def test_a_flat_val_names_valprep(imagenet_root):
    val = imagenet_root / "imagenet" / "val"
    for f in list(val.rglob("*.JPEG")):
        shutil.move(str(f), val / f.name)
    for d in [p for p in val.iterdir() if p.is_dir()]:
        d.rmdir()
    with pytest.raises(DataError, match=r"imagenet/val: .*one sub-folder of images per class .*valprep.sh"):
        build(imagenet_root)


def test_non_image_files_at_the_top_do_not_count(imagenet_root):
    (imagenet_root / "imagenet" / "val" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    train, test = build(imagenet_root)
    assert test.num_examples == 4


def test_image_counts_are_logged_and_checked_at_1000_classes(imagenet_root, caplog):
    with caplog.at_level(logging.INFO, logger="sam_bench"):
        build(imagenet_root)
    assert [r.getMessage() for r in caplog.records] == [f"{imagenet_root / 'imagenet'}: 6 train images, 4 val images"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sam_bench"):
        _log_counts("/d/imagenet", 1_281_167, 50_000, 1000)  # ILSVRC-2012 complete
        _log_counts("/d/imagenet", 1_281_167, 6, 1000)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["/d/imagenet holds 1281167 train and 6 val images, ILSVRC-2012 has 1281167 and 50000: "
                        "missing or extra files change the reported numbers"]


# ---------------------------------------------------------------- D4: gpu_decode of non-JPEG / CMYK files


def encoded(img: Image.Image, fmt: str = "JPEG") -> torch.Tensor:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def odd_images(seed: int = 0) -> dict[str, Image.Image]:
    rng = np.random.default_rng(seed)
    return {
        "png": (Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), "PNG"),  # n02105855_2933.JPEG
        "cmyk": (Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), mode="CMYK"), "JPEG"),  # 22 in train
        "gray": (Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8), mode="L"), "JPEG"),
        "rgba_png": (Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), mode="RGBA"), "PNG"),
    }


def test_jpeg_components_sniffs_the_format():
    imgs = {name: encoded(img, fmt) for name, (img, fmt) in odd_images().items()}
    rgb = encoded(Image.new("RGB", (40, 30), (10, 200, 30)))
    assert [jpeg_components(imgs[k]) for k in ("png", "cmyk", "gray", "rgba_png")] == [None, 4, 1, None]
    assert jpeg_components(rgb) == 3 and jpeg_components(rgb[:3]) is None and jpeg_components(torch.zeros(0, dtype=torch.uint8)) is None
    assert jpeg_components(rgb[:20]) is None  # cut before the frame header


def test_gpu_decode_reads_what_pil_reads(tmp_path):
    """A PNG behind a .JPEG name (nvJPEG refuses it), a CMYK and a grayscale JPEG: the gpu_decode
    path gives the same 3-channel RGB pixels as the PIL loader of the gpu_decode=false path."""
    files = []
    for name, (img, fmt) in odd_images().items():
        img.save(tmp_path / f"{name}.JPEG", format=fmt)
        files.append((str(tmp_path / f"{name}.JPEG"), 0))

    class Files(torch.utils.data.Dataset):  # raw bytes, as build_imagenet's ImageFolder with gpu_decode
        samples = files

        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return torch.frombuffer(bytearray(open(files[i][0], "rb").read()), dtype=torch.uint8), 0

    loader = StreamLoader(Files(), 4, [0.0] * 3, [1 / 255] * 3, train=False, device=torch.device("cpu"), num_workers=0,
                          gpu_transform=lambda x: x)  # normalize(x/255 - 0, 1/255) gives the pixel values back
    (x, _), = list(loader.epoch(0))
    want = torch.stack([v2.functional.pil_to_tensor(pil_rgb(p)) for p, _ in files]).float()
    assert x.shape == (4, 3, 30, 40)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-3)


def test_gpu_decode_streams_a_png_and_a_cmyk_jpeg_of_imagenet_train(imagenet_root):
    """QA's repro: the run no longer stops at n02105855_2933.JPEG; the batches match the CPU path's."""
    for name, (img, fmt) in odd_images(1).items():
        img.save(imagenet_root / "imagenet" / "train" / "n01" / f"n01_{name}.JPEG", format=fmt)
    cpu, _ = build(imagenet_root, augment="none")
    gpu, _ = build(imagenet_root, augment="none", gpu_decode=True)
    a, b = [torch.cat([x for x, _ in loader.epoch(0)]) for loader in (cpu, gpu)]
    assert a.shape == b.shape == (8, 3, 16, 16)
    # PIL (CPU path) and tensor resizes differ by rounding only; a wrong channel count or order is > 0.5
    assert (a - b).abs().mean() < 0.1


def test_gpu_decode_still_names_a_corrupt_file(imagenet_root):
    bad = imagenet_root / "imagenet" / "val" / "n02" / "n02_1.JPEG"
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, format="PNG")
    bad.write_bytes(buf.getvalue()[:40])  # a truncated PNG: neither nvJPEG nor PIL reads it
    _, test = build(imagenet_root, gpu_decode=True)
    with pytest.raises(DataError, match=r"n02_1.JPEG is unreadable \(.*\); it is truncated or corrupt") as e:
        list(test.epoch(0))
    assert "\n" not in str(e.value)
    with pytest.raises((OSError, SyntaxError, ValueError)):
        pil_decode_rgb(torch.frombuffer(bytearray(bad.read_bytes()), dtype=torch.uint8))


# ---------------------------------------------------------------- D5: bicubic resizes


def test_crops_and_resizes_are_bicubic_antialiased(imagenet_root):
    """The official code resizes the Inception crop and the evaluation centre crop with
    resize_bicubic; timm's EfficientNet configs say bicubic too. Every resize of the pipeline
    (PIL path, gpu_decode path, training and evaluation) is bicubic and antialiased."""
    resizes = [train_transform(16).transforms[0], eval_transform(16, 20).transforms[0]]
    for gpu_decode in (False, True):
        for augment in ("basic", "none"):
            train, test = build(imagenet_root, gpu_decode=gpu_decode, augment=augment)
            for loader in (train, test):
                t = loader.gpu_transform if gpu_decode else loader.dataset.transform
                resizes.append(t.transforms[0])
    assert len(resizes) == 10
    for r in resizes:
        assert isinstance(r, (v2.RandomResizedCrop, v2.Resize)) and r.interpolation == BICUBIC and r.antialias is True


def test_a_small_image_goes_through_the_bicubic_transforms():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    out = eval_transform(16, 20)(img)  # short side 30 -> 20 (40 -> 26), centre 16x16
    ref = v2.functional.pil_to_tensor(img.resize((26, 20), Image.BICUBIC))[:, 2:18, 5:21]
    assert out.dtype == torch.uint8 and torch.equal(out, ref)
    assert not torch.equal(out, v2.functional.pil_to_tensor(img.resize((26, 20), Image.BILINEAR))[:, 2:18, 5:21])
    torch.manual_seed(0)
    crop = train_transform(16)(img)
    assert crop.shape == (3, 16, 16) and crop.dtype == torch.uint8
    tensor = v2.functional.pil_to_tensor(img)  # the gpu_decode path resizes tensors
    torch.manual_seed(0)
    assert v2.Compose(train_transform(16).transforms[:2])(tensor).shape == (3, 16, 16)


# ---------------------------------------------------------------- CUDA (scripts/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_of_a_png_cmyk_and_grayscale_jpeg(imagenet_root):
    for name, (img, fmt) in odd_images(1).items():
        img.save(imagenet_root / "imagenet" / "train" / "n01" / f"n01_{name}.JPEG", format=fmt)
    cpu, _ = build_imagenet(imagenet_cfg(imagenet_root, augment="none"), 4, 4, torch.device("cpu"), 0, False)
    gpu, _ = build_imagenet(imagenet_cfg(imagenet_root, augment="none", gpu_decode=True), 4, 4, torch.device("cuda"), 0, False)
    a, b = [torch.cat([x.cpu() for x, _ in loader.epoch(0)]) for loader in (cpu, gpu)]
    assert a.shape == b.shape == (8, 3, 16, 16)
    assert (a - b).abs().mean() < 0.15  # nvJPEG's chroma upsampling differs from libjpeg's (test_data_zoo)
