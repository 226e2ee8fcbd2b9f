"""The official SAM code's AutoAugment, applied batched on the device with per-image randomness.

Reference: google-research/sam (HEAD dae9904, files unchanged since 1c8af51) ``autoaugment/policies.py``
and ``autoaugment/autoaugment.py``, a fork of the TPU EfficientNet AutoAugment
(tensorflow/tpu ``models/official/efficientnet/autoaugment.py``), as called by
``sam_jax/datasets/augmentation.auto_augmentation``: cifar10 and cifar100 use ``policy_cifar()``, SVHN
``policy_svhn()``. Everything below was re-implemented from reading that source (no code copied); each
function names the official function it follows.

- Policies (``policies.py``): ``cifar10`` = ``policy_cifar()``, all 95 sub-policies (exp0s + exp1s +
  exp2s, in that order; also the CIFAR-100 policy, as in the official code), ``svhn`` =
  ``policy_svhn()`` (25), ``imagenet`` = ``policy_imagenet()`` (25).
- Hyperparameters (``distort_image_with_autoaugment``): ``HParams(cutout_const=100,
  translate_const=250)``; fill ("replace") value 128 for Rotate, ShearX/Y, TranslateX/Y and Cutout
  (``build_and_apply_nas_policy``: ``replace_value = [128, 128, 128]``).
- Sampling (``select_and_apply_random_policy``, ``_apply_func_with_prob``, ``_randomly_negate_tensor``):
  one sub-policy uniformly per image; each of its two ops applied with its probability; the
  signed ops (Rotate, Shear, Translate) negated with probability 1/2, independently per op.
- Magnitudes (``level_to_arg``): see :func:`level_to_arg`. With translate_const=250 on a 32 px image,
  TranslateX/Y at level >= 2 (>= 50 px) leaves only the fill value: the whole image becomes 128 (as
  in the official code). Cutout at levels 3/4 is a 60/80 px square, i.e. most of the image.
- Pixel semantics (TF ops on uint8 HWC images; here uint8 NCHW): see each ``_op`` function. Notable
  TF quirks kept on purpose: Contrast blends towards the constant ``H*W/256`` (= 4 on 32x32; the
  official ``contrast`` takes the histogram's sum, not its mean), Color uses TF's
  ``rgb_to_grayscale`` (weights 0.2989/0.5870/0.1140, truncated), blends truncate instead of
  rounding, Posterize's 0-bit case keeps the top bit (TF clamps a shift of 8 to 7), geometric ops
  sample the nearest pixel with ``std::round`` (half away from zero) on float32 coordinates (TF
  ``ImageProjectiveTransform``, tensorflow-addons ``rotate``/``translate``/``transform`` as pinned
  by the official requirements: TF 2.3.1, tfa 0.11.2).

Remaining differences from the official code (all at the level of float rounding ties):
- Sharpness: the 3x3 smoothing (kernel [[1,1,1],[1,5,1],[1,1,1]]/13) is computed exactly
  (integer sum // 13); TF sums float32 products, which can land one grey level lower when the sum
  is an exact multiple of 13, depending on its summation order.
- Color's grayscale and Rotate's cos/sin are float32 like TF, but the summation order of the
  3-term dot product and the last bit of cos/sin may differ from TF's Eigen kernels; a pixel that
  falls exactly on a rounding boundary can then differ by one grey level (Color) or one pixel
  position (Rotate).
- Random numbers come from a torch CPU generator, not TF's, so the draws differ (same distribution).
- The official ops assume RGB; images with another channel count are refused.
- Solarize at level 10 (threshold 256, only in the ImageNet policy) inverts no pixel here; TF may
  refuse the uint8 constant 256.

Batching: each image draws its sub-policy index, two coins, two signs and two Cutout centres from a
CPU generator (no device->host sync). For each of the two slots the images are grouped by op name
and each group is transformed in one batched call with per-image arguments (at most 16 groups per
slot), on the images' device. :class:`DeviceLoader` runs it over each epoch's training set in chunks
of ``AUTOAUGMENT_CHUNK`` images, before the flip/pad/crop (the official order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sam_bench.errors import ConfigError

MAX_LEVEL = 10.0  # autoaugment.py _MAX_LEVEL
CUTOUT_CONST = 100  # distort_image_with_autoaugment: HParams(cutout_const=100, translate_const=250)
TRANSLATE_CONST = 250
REPLACE = 128  # build_and_apply_nas_policy: replace_value = [128, 128, 128]

# policies.py policy_cifar(): exp0_0..exp0_3, exp1_0..exp1_6, exp2_0..exp2_7 (5 sub-policies each),
# concatenated in that order. Entries: (op, probability, level 0-10).
POLICY_CIFAR: list[tuple[tuple[str, float, int], tuple[str, float, int]]] = [
    # exp0_0
    (("Invert", 0.1, 7), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, 8), ("Equalize", 0.9, 2)),
    # exp0_1
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 3)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, 2), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, 8), ("Invert", 0.1, 3)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, 1)),
    # exp0_2
    (("Solarize", 0.4, 5), ("AutoContrast", 0.0, 2)),
    (("TranslateY", 0.7, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, 0), ("Solarize", 0.4, 3)),
    (("Equalize", 0.7, 5), ("Invert", 0.1, 3)),
    (("TranslateY", 0.7, 9), ("TranslateY", 0.7, 9)),
    # exp0_3
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 1)),
    (("TranslateY", 0.8, 9), ("TranslateY", 0.9, 9)),
    (("AutoContrast", 0.8, 0), ("TranslateY", 0.7, 9)),
    (("TranslateY", 0.2, 7), ("Color", 0.9, 6)),
    (("Equalize", 0.7, 6), ("Color", 0.4, 9)),
    # exp1_0
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, 5), ("Equalize", 0.5, 1)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    # exp1_1
    (("Brightness", 0.3, 7), ("AutoContrast", 0.5, 8)),
    (("AutoContrast", 0.9, 4), ("AutoContrast", 0.5, 6)),
    (("Solarize", 0.3, 5), ("Equalize", 0.6, 5)),
    (("TranslateY", 0.2, 4), ("Sharpness", 0.3, 3)),
    (("Brightness", 0.0, 8), ("Color", 0.8, 8)),
    # exp1_2
    (("Solarize", 0.2, 6), ("Color", 0.8, 6)),
    (("Solarize", 0.2, 6), ("AutoContrast", 0.8, 1)),
    (("Solarize", 0.4, 1), ("Equalize", 0.6, 5)),
    (("Brightness", 0.0, 0), ("Solarize", 0.5, 2)),
    (("AutoContrast", 0.9, 5), ("Brightness", 0.5, 3)),
    # exp1_3
    (("Contrast", 0.7, 5), ("Brightness", 0.0, 2)),
    (("Solarize", 0.2, 8), ("Solarize", 0.1, 5)),
    (("Contrast", 0.5, 1), ("TranslateY", 0.2, 9)),
    (("AutoContrast", 0.6, 5), ("TranslateY", 0.0, 9)),
    (("AutoContrast", 0.9, 4), ("Equalize", 0.8, 4)),
    # exp1_4
    (("Brightness", 0.0, 7), ("Equalize", 0.4, 7)),
    (("Solarize", 0.2, 5), ("Equalize", 0.7, 5)),
    (("Equalize", 0.6, 8), ("Color", 0.6, 2)),
    (("Color", 0.3, 7), ("Color", 0.2, 4)),
    (("AutoContrast", 0.5, 2), ("Solarize", 0.7, 2)),
    # exp1_5
    (("AutoContrast", 0.2, 0), ("Equalize", 0.1, 0)),
    (("ShearY", 0.6, 5), ("Equalize", 0.6, 5)),
    (("Brightness", 0.9, 3), ("AutoContrast", 0.4, 1)),
    (("Equalize", 0.8, 8), ("Equalize", 0.7, 7)),
    (("Equalize", 0.7, 7), ("Solarize", 0.5, 0)),
    # exp1_6
    (("Equalize", 0.8, 4), ("TranslateY", 0.8, 9)),
    (("TranslateY", 0.8, 9), ("TranslateY", 0.6, 9)),
    (("TranslateY", 0.9, 0), ("TranslateY", 0.5, 9)),
    (("AutoContrast", 0.5, 3), ("Solarize", 0.3, 4)),
    (("Solarize", 0.5, 3), ("Equalize", 0.4, 4)),
    # exp2_0
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, 7), ("AutoContrast", 0.4, 8)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, 3)),
    # exp2_1
    (("AutoContrast", 0.1, 5), ("Brightness", 0.0, 0)),
    (("Cutout", 0.2, 4), ("Equalize", 0.1, 1)),
    (("Equalize", 0.7, 7), ("AutoContrast", 0.6, 4)),
    (("Color", 0.1, 8), ("ShearY", 0.2, 3)),
    (("ShearY", 0.4, 2), ("Rotate", 0.7, 0)),
    # exp2_2
    (("ShearY", 0.1, 3), ("AutoContrast", 0.9, 5)),
    (("TranslateY", 0.3, 6), ("Cutout", 0.3, 3)),
    (("Equalize", 0.5, 0), ("Solarize", 0.6, 6)),
    (("AutoContrast", 0.3, 5), ("Rotate", 0.2, 7)),
    (("Equalize", 0.8, 2), ("Invert", 0.4, 0)),
    # exp2_3
    (("Equalize", 0.9, 5), ("Color", 0.7, 0)),
    (("Equalize", 0.1, 1), ("ShearY", 0.1, 3)),
    (("AutoContrast", 0.7, 3), ("Equalize", 0.7, 0)),
    (("Brightness", 0.5, 1), ("Contrast", 0.1, 7)),
    (("Contrast", 0.1, 4), ("Solarize", 0.6, 5)),
    # exp2_4
    (("Solarize", 0.2, 3), ("ShearX", 0.0, 0)),
    (("TranslateX", 0.3, 0), ("TranslateX", 0.6, 0)),
    (("Equalize", 0.5, 9), ("TranslateY", 0.6, 7)),
    (("ShearX", 0.1, 0), ("Sharpness", 0.5, 1)),
    (("Equalize", 0.8, 6), ("Invert", 0.3, 6)),
    # exp2_5
    (("AutoContrast", 0.3, 9), ("Cutout", 0.5, 3)),
    (("ShearX", 0.4, 4), ("AutoContrast", 0.9, 2)),
    (("ShearX", 0.0, 3), ("Posterize", 0.0, 3)),
    (("Solarize", 0.4, 3), ("Color", 0.2, 4)),
    (("Equalize", 0.1, 4), ("Equalize", 0.7, 6)),
    # exp2_6
    (("Equalize", 0.3, 8), ("AutoContrast", 0.4, 3)),
    (("Solarize", 0.6, 4), ("AutoContrast", 0.7, 6)),
    (("AutoContrast", 0.2, 9), ("Brightness", 0.4, 8)),
    (("Equalize", 0.1, 0), ("Equalize", 0.0, 6)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 4)),
    # exp2_7
    (("Equalize", 0.5, 5), ("AutoContrast", 0.1, 2)),
    (("Solarize", 0.5, 5), ("AutoContrast", 0.9, 5)),
    (("AutoContrast", 0.6, 1), ("AutoContrast", 0.7, 8)),
    (("Equalize", 0.2, 0), ("AutoContrast", 0.1, 2)),
    (("Equalize", 0.6, 9), ("Equalize", 0.4, 4)),
]

# policies.py policy_svhn()
POLICY_SVHN = [
    (("ShearX", 0.9, 4), ("Invert", 0.2, 3)),
    (("ShearY", 0.9, 8), ("Invert", 0.7, 5)),
    (("Equalize", 0.6, 5), ("Solarize", 0.6, 6)),
    (("Invert", 0.9, 3), ("Equalize", 0.6, 3)),
    (("Equalize", 0.6, 1), ("Rotate", 0.9, 3)),
    (("ShearX", 0.9, 4), ("AutoContrast", 0.8, 3)),
    (("ShearY", 0.9, 8), ("Invert", 0.4, 5)),
    (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
    (("Invert", 0.9, 6), ("AutoContrast", 0.8, 1)),
    (("Equalize", 0.6, 3), ("Rotate", 0.9, 3)),
    (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
    (("ShearY", 0.8, 8), ("Invert", 0.7, 4)),
    (("Equalize", 0.9, 5), ("TranslateY", 0.6, 6)),
    (("Invert", 0.9, 4), ("Equalize", 0.6, 7)),
    (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
    (("Invert", 0.8, 5), ("TranslateY", 0.0, 2)),
    (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
    (("Invert", 0.6, 4), ("Rotate", 0.8, 4)),
    (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
    (("ShearX", 0.1, 6), ("Invert", 0.6, 5)),
    (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
    (("ShearY", 0.8, 4), ("Invert", 0.8, 8)),
    (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
    (("ShearY", 0.8, 5), ("AutoContrast", 0.7, 3)),
    (("ShearX", 0.7, 2), ("Invert", 0.1, 5)),
]

# policies.py policy_imagenet()
POLICY_IMAGENET = [
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
]

# dataset.autoaugment value -> official policy (augmentation.auto_augmentation maps cifar10/cifar100 to 'cifar')
POLICIES = {"cifar10": POLICY_CIFAR, "svhn": POLICY_SVHN, "imagenet": POLICY_IMAGENET}

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout")  # autoaugment.py NAME_TO_FUNC
SIGNED = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})  # level_to_arg: _randomly_negate_tensor


def level_to_arg(name: str, level: float) -> float | int | None:
    """The op's argument for ``level`` before the random sign (autoaugment.py ``level_to_arg`` with
    HParams(cutout_const=100, translate_const=250)); None for ops without one. Python floats, as the
    official code computes them (TF then casts them to float32)."""
    frac = level / MAX_LEVEL
    if name == "Rotate":  # _rotate_level_to_arg: degrees
        return frac * 30.0
    if name in ("ShearX", "ShearY"):  # _shear_level_to_arg
        return frac * 0.3
    if name in ("TranslateX", "TranslateY"):  # _translate_level_to_arg: pixels
        return frac * float(TRANSLATE_CONST)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):  # _enhance_level_to_arg
        return frac * 1.8 + 0.1
    if name == "Posterize":  # bits kept
        return int(frac * 4)
    if name == "Solarize":  # threshold
        return int(frac * 256)
    if name == "SolarizeAdd":  # addition (threshold 128)
        return int(frac * 110)
    if name == "Cutout":  # pad_size: the patch is 2 * pad_size square
        return int(frac * CUTOUT_CONST)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    raise KeyError(name)


# ---------------------------------------------------------------- ops on uint8 (n, C, H, W) with per-image args


def _col(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def _blend(image1: torch.Tensor, image2: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """autoaugment.py ``blend``: image1 + factor * (image2 - image1) in float32, clipped to [0, 255]
    and truncated to uint8; factor 0 gives image1, 1 gives image2 exactly. ``factor`` (n,) float64
    (the Python value); TF casts it to float32 for the product."""
    a, b = image1.float(), image2.float()
    f = _col(factor.to(torch.float32))
    out = (a + f * (b - a)).clamp_(0.0, 255.0).to(torch.uint8)
    out = torch.where(_col(factor == 0.0), image1, out)
    return torch.where(_col(factor == 1.0), image2, out)


def tf_grayscale(x: torch.Tensor) -> torch.Tensor:
    """tf.image.rgb_to_grayscale on uint8 (n, 3, H, W) -> (n, 1, H, W): convert_image_dtype to float
    (x * float32(1/255)), weights (0.2989, 0.5870, 0.1140) in float32, then convert_image_dtype back
    (* 255.5, truncating cast)."""
    f = x.float() * torch.tensor(1.0 / 255.0, dtype=torch.float32)
    w = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float32)
    g = f[:, 0:1] * w[0] + f[:, 1:2] * w[1] + f[:, 2:3] * w[2]
    return (g * torch.tensor(255.5, dtype=torch.float32)).to(torch.uint8)


def _autocontrast(x, arg, cy, cx):
    """autoaugment.py ``autocontrast``: per channel, lo..hi -> 0..255 in float32 (scale = 255/(hi-lo),
    offset = -lo*scale, x*scale + offset, clip, truncate); a constant channel is left as it is."""
    lo = x.amin(dim=(2, 3), keepdim=True).float()
    hi = x.amax(dim=(2, 3), keepdim=True).float()
    scale = torch.div(torch.full_like(lo, 255.0), hi - lo)  # true float32 division (not reciprocal * 255)
    offset = -lo * scale
    out = (x.float() * scale + offset).clamp_(0.0, 255.0).to(torch.uint8)
    return torch.where(hi > lo, out, x)


def _equalize(x, arg, cy, cx):
    """autoaugment.py ``equalize`` (PIL ImageOps.equalize): per channel, step = (pixels - count of the
    largest present value) // 255; if step is 0 the channel is unchanged, else
    lut[v] = (sum_{u<v} hist[u] + step // 2) // step clipped to 255."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    last = hist.gather(1, flat.amax(1, keepdim=True))
    step = (h * w - last) // 255
    lut = (hist.cumsum(1) + step // 2) // step.clamp(min=1)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp_(0, 255)
    out = torch.where(step == 0, flat, lut.gather(1, flat))
    return out.to(torch.uint8).view(n, c, h, w)


def _invert(x, arg, cy, cx):
    """autoaugment.py ``invert``: 255 - x."""
    return 255 - x


def _posterize(x, arg, cy, cx):
    """autoaugment.py ``posterize``: (x >> (8 - bits)) << (8 - bits). TF's bitwise shifts clamp the
    shift to 7 for uint8, so 0 bits keeps the top bit (as 1 bit)."""
    shift = _col((8 - arg.long()).clamp(0, 7).to(torch.uint8))
    return torch.bitwise_left_shift(torch.bitwise_right_shift(x, shift), shift)


def _solarize(x, arg, cy, cx):
    """autoaugment.py ``solarize``: x if x < threshold else 255 - x."""
    return torch.where(x.to(torch.int16) < _col(arg.to(torch.int16)), x, 255 - x)


def _solarize_add(x, arg, cy, cx):
    """autoaugment.py ``solarize_add``: pixels below 128 get ``addition`` added (clipped to 0..255)."""
    added = (x.to(torch.int16) + _col(arg.to(torch.int16))).clamp_(0, 255).to(torch.uint8)
    return torch.where(x < 128, added, x)


def _color(x, arg, cy, cx):
    """autoaugment.py ``color``: blend(grayscale as RGB, image, factor)."""
    return _blend(tf_grayscale(x).expand_as(x), x, arg)


def _contrast(x, arg, cy, cx):
    """autoaugment.py ``contrast``: blend(degenerate, image, factor), where the official degenerate is
    the histogram's SUM / 256 = H*W/256 (not the mean grey level), clipped and cast to uint8."""
    n, c, h, w = x.shape
    mean = min(max(float(torch.tensor(h * w, dtype=torch.float32) / 256.0), 0.0), 255.0)
    return _blend(torch.full_like(x, int(mean)), x, arg)


def _brightness(x, arg, cy, cx):
    """autoaugment.py ``brightness``: blend(zeros, image, factor)."""
    return _blend(torch.zeros_like(x), x, arg)


def _sharpness(x, arg, cy, cx):
    """autoaugment.py ``sharpness``: the interior is smoothed with [[1,1,1],[1,5,1],[1,1,1]]/13 (VALID
    convolution, truncated to uint8), the 1-pixel border keeps the original; then
    blend(smoothed, image, factor). The quotient is taken exactly (integer sum // 13)."""
    _, _, h, w = x.shape
    degenerate = x.clone()
    if h >= 3 and w >= 3:
        xi = x.to(torch.int32)
        s = 4 * xi[:, :, 1:-1, 1:-1]
        for dy in range(3):
            for dx in range(3):
                s = s + xi[:, :, dy : h - 2 + dy, dx : w - 2 + dx]
        degenerate[:, :, 1:-1, 1:-1] = torch.div(s, 13, rounding_mode="floor").to(torch.uint8)
    return _blend(degenerate, x, arg)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """std::round: nearest integer, halves away from zero (exact for float32)."""
    t = torch.trunc(v)
    frac = v - t
    return t + torch.where(frac >= 0.5, 1.0, 0.0) - torch.where(frac <= -0.5, 1.0, 0.0)


def project(x: torch.Tensor, t: torch.Tensor, fill: int = REPLACE) -> torch.Tensor:
    """TF ImageProjectiveTransform with NEAREST interpolation as used through wrap/unwrap: output pixel
    (x, y) reads input (round(a0*x + a1*y + a2), round(b0*x + b1*y + b2)) (float32, std::round), and
    positions outside the input get ``fill`` (unwrap's replace value). ``t`` (n, 6) float32
    [a0, a1, a2, b0, b1, b2]."""
    n, c, h, w = x.shape
    t = t.to(device=x.device, dtype=torch.float32).view(n, 6, 1, 1)
    ox = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, w)
    oy = torch.arange(h, device=x.device, dtype=torch.float32).view(1, h, 1)
    ix = _round_half_away((t[:, 0] * ox + t[:, 1] * oy) + t[:, 2])
    iy = _round_half_away((t[:, 3] * ox + t[:, 4] * oy) + t[:, 5])
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    idx = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).long().view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, idx).view(n, c, h, w)
    return torch.where(inside.unsqueeze(1), out, torch.full_like(out, fill))


def _affine_rows(*cols: torch.Tensor) -> torch.Tensor:
    return torch.stack(cols, 1)


def _rotate(x, arg, cy, cx):
    """autoaugment.py ``rotate`` -> tfa.image.rotate (angles_to_projective_transforms): rotation about
    ((W-1)/2, (H-1)/2), all in float32 (radians = degrees * float32(pi/180))."""
    _, _, h, w = x.shape
    rad = arg.to(torch.float32) * torch.tensor(torch.pi / 180.0, dtype=torch.float32, device=arg.device)
    cos, sin = torch.cos(rad), torch.sin(rad)
    w1 = torch.tensor(w - 1, dtype=torch.float32, device=arg.device)
    h1 = torch.tensor(h - 1, dtype=torch.float32, device=arg.device)
    x_off = (w1 - (cos * w1 - sin * h1)) / 2.0
    y_off = (h1 - (sin * w1 + cos * h1)) / 2.0
    return project(x, _affine_rows(cos, -sin, x_off, sin, cos, y_off))


def _shear_x(x, arg, cy, cx):
    """autoaugment.py ``shear_x``: transform [1, level, 0, 0, 1, 0]."""
    s, one, zero = arg.to(torch.float32), torch.ones_like(arg, dtype=torch.float32), torch.zeros_like(arg, dtype=torch.float32)
    return project(x, _affine_rows(one, s, zero, zero, one, zero))


def _shear_y(x, arg, cy, cx):
    """autoaugment.py ``shear_y``: transform [1, 0, 0, level, 1, 0]."""
    s, one, zero = arg.to(torch.float32), torch.ones_like(arg, dtype=torch.float32), torch.zeros_like(arg, dtype=torch.float32)
    return project(x, _affine_rows(one, zero, zero, s, one, zero))


def _translate_x(x, arg, cy, cx):
    """autoaugment.py ``translate_x``: tfa translate by [-pixels, 0], i.e. input x = output x + pixels."""
    p, one, zero = arg.to(torch.float32), torch.ones_like(arg, dtype=torch.float32), torch.zeros_like(arg, dtype=torch.float32)
    return project(x, _affine_rows(one, zero, p, zero, one, zero))


def _translate_y(x, arg, cy, cx):
    """autoaugment.py ``translate_y``: tfa translate by [0, -pixels], i.e. input y = output y + pixels."""
    p, one, zero = arg.to(torch.float32), torch.ones_like(arg, dtype=torch.float32), torch.zeros_like(arg, dtype=torch.float32)
    return project(x, _affine_rows(one, zero, zero, zero, one, p))


def _cutout(x, arg, cy, cx):
    """autoaugment.py ``cutout``: rows [max(0, cy - pad), min(H, cy + pad)) x the same for columns set to
    the replace value 128; the centre (cy, cx) is uniform over the image."""
    _, _, h, w = x.shape
    pad = arg.long().view(-1, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    cy, cx = cy.long().view(-1, 1, 1), cx.long().view(-1, 1, 1)
    mask = (rows >= cy - pad) & (rows < cy + pad) & (cols >= cx - pad) & (cols < cx + pad)
    return torch.where(mask.unsqueeze(1), torch.full_like(x, REPLACE), x)


_FUNCS = {
    "AutoContrast": _autocontrast, "Equalize": _equalize, "Invert": _invert, "Rotate": _rotate, "Posterize": _posterize,
    "Solarize": _solarize, "SolarizeAdd": _solarize_add, "Color": _color, "Contrast": _contrast, "Brightness": _brightness,
    "Sharpness": _sharpness, "ShearX": _shear_x, "ShearY": _shear_y, "TranslateX": _translate_x, "TranslateY": _translate_y,
    "Cutout": _cutout,
}


def apply_op(name: str, images: torch.Tensor, arg=None, cy=None, cx=None) -> torch.Tensor:
    """Apply op ``name`` to a uint8 (n, 3, H, W) batch. ``arg``: the signed argument per image (a
    number or an (n,) tensor; as :func:`level_to_arg` gives, negated for a negative sign); ``cy``,
    ``cx``: Cutout centres per image."""
    n = images.shape[0]
    dev = images.device
    a = torch.as_tensor(0.0 if arg is None else arg, dtype=torch.float64).to(dev).expand(n)
    if name == "Cutout":
        cy = torch.as_tensor(cy).to(dev).expand(n)
        cx = torch.as_tensor(cx).to(dev).expand(n)
    return _FUNCS[name](images, a, cy, cx)


# ---------------------------------------------------------------- the policy, batched


@dataclass
class Draws:
    """Per-image random draws (CPU tensors): sub-policy index, per-slot coin (op applied when
    coin < probability), per-slot negative sign, per-slot Cutout centre."""

    which: torch.Tensor  # (n,) int64
    coin: torch.Tensor  # (n, 2) float
    negative: torch.Tensor  # (n, 2) bool
    cy: torch.Tensor  # (n, 2) int64
    cx: torch.Tensor  # (n, 2) int64


class BatchAutoAugment:
    """Per-image official AutoAugment for uint8 (N, 3, H, W) batches on any device."""

    def __init__(self, policy: str = "cifar10"):
        policy = str(getattr(policy, "value", policy))
        if policy not in POLICIES:
            raise ConfigError(f"dataset.autoaugment={policy!r}: expected one of {', '.join(POLICIES)}")
        self.name = policy
        self.policies = POLICIES[policy]
        self.slots = []
        for j in range(2):
            names = sorted({sub[j][0] for sub in self.policies})
            op_id = {nm: k for k, nm in enumerate(names)}
            args = [level_to_arg(sub[j][0], sub[j][2]) for sub in self.policies]
            self.slots.append({
                "names": names,
                "op": torch.tensor([op_id[sub[j][0]] for sub in self.policies]),
                "p": torch.tensor([sub[j][1] for sub in self.policies], dtype=torch.float64),
                "arg": torch.tensor([0.0 if a is None else float(a) for a in args], dtype=torch.float64),
            })

    def draw(self, n: int, h: int, w: int, generator: torch.Generator) -> Draws:
        """The per-image draws, from the CPU ``generator`` (in this order)."""
        return Draws(
            which=torch.randint(len(self.policies), (n,), generator=generator),
            coin=torch.rand((n, 2), generator=generator, dtype=torch.float64),
            negative=torch.rand((n, 2), generator=generator) < 0.5,
            cy=torch.randint(h, (n, 2), generator=generator),
            cx=torch.randint(w, (n, 2), generator=generator),
        )

    def image_ops(self, d: Draws, i: int) -> list[tuple[str, float | None, int, int]]:
        """The ops image ``i`` gets under draws ``d``, in order: (name, signed argument, cy, cx)."""
        ops = []
        for j, (name, prob, level) in enumerate(self.policies[int(d.which[i])]):
            if float(d.coin[i, j]) < prob:
                arg = level_to_arg(name, level)
                if name in SIGNED and bool(d.negative[i, j]):
                    arg = -arg
                ops.append((name, arg, int(d.cy[i, j]), int(d.cx[i, j])))
        return ops

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a uint8 batch; ``generator`` is a CPU generator (same seed, same batch)."""
        n, c, h, w = images.shape
        if c != 3:
            raise ConfigError(f"dataset.autoaugment: the official AutoAugment ops assume RGB images, these have {c} channel(s)")
        d = self.draw(n, h, w, generator)
        out = images.clone()
        for j, t in enumerate(self.slots):
            op = t["op"][d.which]
            applied = d.coin[:, j] < t["p"][d.which]
            arg = t["arg"][d.which]
            for k, name in enumerate(t["names"]):
                idx = ((op == k) & applied).nonzero().flatten()
                if idx.numel() == 0:
                    continue
                a = arg[idx]
                if name in SIGNED:
                    a = torch.where(d.negative[idx, j], -a, a)
                dev_idx = idx.to(images.device, non_blocking=True)
                sub = _FUNCS[name](out.index_select(0, dev_idx), a.to(images.device, non_blocking=True),
                                   d.cy[idx, j].to(images.device), d.cx[idx, j].to(images.device))
                out.index_copy_(0, dev_idx, sub)
        return out
