"""The official SAM AutoAugment (google-research/sam autoaugment/{policies,autoaugment}.py), op by op.

The expected policy lists below were transcribed from policies.py separately from the module's
table (different layout: one string per exp group). Op references are written here from the TF
semantics, with numpy loops or PIL.ImageOps (which the TF ops mimic) where they agree.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from sam_bench.data import autoaugment as aa_mod
from sam_bench.data.autoaugment import BatchAutoAugment, apply_op, level_to_arg

# ---------------------------------------------------------------- the policy table

# policies.py policy_cifar(): "op,prob,level op,prob,level" per sub-policy, groups in return order
CIFAR_GROUPS = {
    "exp0_0": """Invert,0.1,7 Contrast,0.2,6 | Rotate,0.7,2 TranslateX,0.3,9 | Sharpness,0.8,1 Sharpness,0.9,3 |
                 ShearY,0.5,8 TranslateY,0.7,9 | AutoContrast,0.5,8 Equalize,0.9,2""",
    "exp0_1": """Solarize,0.4,5 AutoContrast,0.9,3 | TranslateY,0.9,9 TranslateY,0.7,9 | AutoContrast,0.9,2 Solarize,0.8,3 |
                 Equalize,0.8,8 Invert,0.1,3 | TranslateY,0.7,9 AutoContrast,0.9,1""",
    "exp0_2": """Solarize,0.4,5 AutoContrast,0.0,2 | TranslateY,0.7,9 TranslateY,0.7,9 | AutoContrast,0.9,0 Solarize,0.4,3 |
                 Equalize,0.7,5 Invert,0.1,3 | TranslateY,0.7,9 TranslateY,0.7,9""",
    "exp0_3": """Solarize,0.4,5 AutoContrast,0.9,1 | TranslateY,0.8,9 TranslateY,0.9,9 | AutoContrast,0.8,0 TranslateY,0.7,9 |
                 TranslateY,0.2,7 Color,0.9,6 | Equalize,0.7,6 Color,0.4,9""",
    "exp1_0": """ShearY,0.2,7 Posterize,0.3,7 | Color,0.4,3 Brightness,0.6,7 | Sharpness,0.3,9 Brightness,0.7,9 |
                 Equalize,0.6,5 Equalize,0.5,1 | Contrast,0.6,7 Sharpness,0.6,5""",
    "exp1_1": """Brightness,0.3,7 AutoContrast,0.5,8 | AutoContrast,0.9,4 AutoContrast,0.5,6 | Solarize,0.3,5 Equalize,0.6,5 |
                 TranslateY,0.2,4 Sharpness,0.3,3 | Brightness,0.0,8 Color,0.8,8""",
    "exp1_2": """Solarize,0.2,6 Color,0.8,6 | Solarize,0.2,6 AutoContrast,0.8,1 | Solarize,0.4,1 Equalize,0.6,5 |
                 Brightness,0.0,0 Solarize,0.5,2 | AutoContrast,0.9,5 Brightness,0.5,3""",
    "exp1_3": """Contrast,0.7,5 Brightness,0.0,2 | Solarize,0.2,8 Solarize,0.1,5 | Contrast,0.5,1 TranslateY,0.2,9 |
                 AutoContrast,0.6,5 TranslateY,0.0,9 | AutoContrast,0.9,4 Equalize,0.8,4""",
    "exp1_4": """Brightness,0.0,7 Equalize,0.4,7 | Solarize,0.2,5 Equalize,0.7,5 | Equalize,0.6,8 Color,0.6,2 |
                 Color,0.3,7 Color,0.2,4 | AutoContrast,0.5,2 Solarize,0.7,2""",
    "exp1_5": """AutoContrast,0.2,0 Equalize,0.1,0 | ShearY,0.6,5 Equalize,0.6,5 | Brightness,0.9,3 AutoContrast,0.4,1 |
                 Equalize,0.8,8 Equalize,0.7,7 | Equalize,0.7,7 Solarize,0.5,0""",
    "exp1_6": """Equalize,0.8,4 TranslateY,0.8,9 | TranslateY,0.8,9 TranslateY,0.6,9 | TranslateY,0.9,0 TranslateY,0.5,9 |
                 AutoContrast,0.5,3 Solarize,0.3,4 | Solarize,0.5,3 Equalize,0.4,4""",
    "exp2_0": """Color,0.7,7 TranslateX,0.5,8 | Equalize,0.3,7 AutoContrast,0.4,8 | TranslateY,0.4,3 Sharpness,0.2,6 |
                 Brightness,0.9,6 Color,0.2,8 | Solarize,0.5,2 Invert,0.0,3""",
    "exp2_1": """AutoContrast,0.1,5 Brightness,0.0,0 | Cutout,0.2,4 Equalize,0.1,1 | Equalize,0.7,7 AutoContrast,0.6,4 |
                 Color,0.1,8 ShearY,0.2,3 | ShearY,0.4,2 Rotate,0.7,0""",
    "exp2_2": """ShearY,0.1,3 AutoContrast,0.9,5 | TranslateY,0.3,6 Cutout,0.3,3 | Equalize,0.5,0 Solarize,0.6,6 |
                 AutoContrast,0.3,5 Rotate,0.2,7 | Equalize,0.8,2 Invert,0.4,0""",
    "exp2_3": """Equalize,0.9,5 Color,0.7,0 | Equalize,0.1,1 ShearY,0.1,3 | AutoContrast,0.7,3 Equalize,0.7,0 |
                 Brightness,0.5,1 Contrast,0.1,7 | Contrast,0.1,4 Solarize,0.6,5""",
    "exp2_4": """Solarize,0.2,3 ShearX,0.0,0 | TranslateX,0.3,0 TranslateX,0.6,0 | Equalize,0.5,9 TranslateY,0.6,7 |
                 ShearX,0.1,0 Sharpness,0.5,1 | Equalize,0.8,6 Invert,0.3,6""",
    "exp2_5": """AutoContrast,0.3,9 Cutout,0.5,3 | ShearX,0.4,4 AutoContrast,0.9,2 | ShearX,0.0,3 Posterize,0.0,3 |
                 Solarize,0.4,3 Color,0.2,4 | Equalize,0.1,4 Equalize,0.7,6""",
    "exp2_6": """Equalize,0.3,8 AutoContrast,0.4,3 | Solarize,0.6,4 AutoContrast,0.7,6 | AutoContrast,0.2,9 Brightness,0.4,8 |
                 Equalize,0.1,0 Equalize,0.0,6 | Equalize,0.8,4 Equalize,0.0,4""",
    "exp2_7": """Equalize,0.5,5 AutoContrast,0.1,2 | Solarize,0.5,5 AutoContrast,0.9,5 | AutoContrast,0.6,1 AutoContrast,0.7,8 |
                 Equalize,0.2,0 AutoContrast,0.1,2 | Equalize,0.6,9 Equalize,0.4,4""",
}
CIFAR_ORDER = [f"exp0_{i}" for i in range(4)] + [f"exp1_{i}" for i in range(7)] + [f"exp2_{i}" for i in range(8)]

SVHN = """ShearX,0.9,4 Invert,0.2,3 | ShearY,0.9,8 Invert,0.7,5 | Equalize,0.6,5 Solarize,0.6,6 | Invert,0.9,3 Equalize,0.6,3 |
Equalize,0.6,1 Rotate,0.9,3 | ShearX,0.9,4 AutoContrast,0.8,3 | ShearY,0.9,8 Invert,0.4,5 | ShearY,0.9,5 Solarize,0.2,6 |
Invert,0.9,6 AutoContrast,0.8,1 | Equalize,0.6,3 Rotate,0.9,3 | ShearX,0.9,4 Solarize,0.3,3 | ShearY,0.8,8 Invert,0.7,4 |
Equalize,0.9,5 TranslateY,0.6,6 | Invert,0.9,4 Equalize,0.6,7 | Contrast,0.3,3 Rotate,0.8,4 | Invert,0.8,5 TranslateY,0.0,2 |
ShearY,0.7,6 Solarize,0.4,8 | Invert,0.6,4 Rotate,0.8,4 | ShearY,0.3,7 TranslateX,0.9,3 | ShearX,0.1,6 Invert,0.6,5 |
Solarize,0.7,2 TranslateY,0.6,7 | ShearY,0.8,4 Invert,0.8,8 | ShearX,0.7,9 TranslateY,0.8,3 | ShearY,0.8,5 AutoContrast,0.7,3 |
ShearX,0.7,2 Invert,0.1,5"""


def parse(text):
    subs = []
    for sub in text.split("|"):
        ops = []
        for op in sub.split():
            name, p, level = op.split(",")
            ops.append((name, float(p), int(level)))
        assert len(ops) == 2
        subs.append(tuple(ops))
    return subs


EXPECTED_CIFAR = [sub for g in CIFAR_ORDER for sub in parse(CIFAR_GROUPS[g])]


def test_cifar_policy_is_the_official_95_sub_policies():
    assert all(len(parse(CIFAR_GROUPS[g])) == 5 for g in CIFAR_ORDER)
    assert len(EXPECTED_CIFAR) == 95
    got = [tuple(tuple(op) for op in sub) for sub in BatchAutoAugment("cifar10").policies]
    assert len(got) == 95
    for i, (g, e) in enumerate(zip(got, EXPECTED_CIFAR)):
        assert g == e, (i, g, e)


def test_svhn_policy_is_the_official_one():
    got = [tuple(tuple(op) for op in sub) for sub in BatchAutoAugment("svhn").policies]
    assert got == parse(SVHN)


def test_policy_names_and_ops():
    assert set(aa_mod.POLICIES) == {"cifar10", "svhn", "imagenet"}
    assert len(aa_mod.POLICY_IMAGENET) == 25
    ops = {op[0] for pol in aa_mod.POLICIES.values() for sub in pol for op in sub}
    assert ops <= set(aa_mod.OPS)
    assert {op[0] for sub in aa_mod.POLICY_CIFAR for op in sub} == set(aa_mod.OPS) - {"SolarizeAdd"}
    with pytest.raises(ValueError):
        BatchAutoAugment("cifar100")


# ---------------------------------------------------------------- level_to_arg (HParams(cutout_const=100, translate_const=250))


def test_level_to_arg_values():
    lv = range(11)
    assert [level_to_arg("Posterize", v) for v in lv] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4]
    assert [level_to_arg("Solarize", v) for v in lv] == [0, 25, 51, 76, 102, 128, 153, 179, 204, 230, 256]
    assert [level_to_arg("SolarizeAdd", v) for v in lv] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 110]
    assert [level_to_arg("Cutout", v) for v in lv] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert [level_to_arg("TranslateX", v) for v in lv] == [25.0 * v for v in lv]
    assert level_to_arg("TranslateY", 9) == 225.0
    for v in lv:
        assert level_to_arg("Rotate", v) == pytest.approx(3.0 * v, abs=1e-12)
        assert level_to_arg("ShearX", v) == pytest.approx(0.03 * v, abs=1e-12)
        assert level_to_arg("ShearY", v) == pytest.approx(0.03 * v, abs=1e-12)
        for name in ("Color", "Contrast", "Brightness", "Sharpness"):
            assert level_to_arg(name, v) == pytest.approx(0.18 * v + 0.1, abs=1e-12)
    assert level_to_arg("Sharpness", 5) == 1.0  # exactly: blend returns the image unchanged
    assert level_to_arg("AutoContrast", 3) is None and level_to_arg("Equalize", 3) is None and level_to_arg("Invert", 3) is None
    assert aa_mod.SIGNED == {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}


# ---------------------------------------------------------------- ops vs references


def images(n=3, h=9, w=11, seed=0, low=0, high=256):
    g = np.random.default_rng(seed)
    return g.integers(low, high, size=(n, 3, h, w), dtype=np.uint8)


def run(name, x, arg=None, cy=None, cx=None):
    return apply_op(name, torch.from_numpy(x.copy()), arg, cy, cx).numpy()


def pil_per_image(x, fn):
    out = []
    for im in x:
        out.append(np.asarray(fn(Image.fromarray(im.transpose(1, 2, 0)))).transpose(2, 0, 1))
    return np.stack(out)


def test_invert_posterize_solarize_equalize_match_pil():
    x = np.concatenate([images(), images(seed=1, low=40, high=90)])
    assert np.array_equal(run("Invert", x), pil_per_image(x, ImageOps.invert))
    for bits in (1, 2, 3, 4):
        assert np.array_equal(run("Posterize", x, bits), pil_per_image(x, lambda im: ImageOps.posterize(im, bits)))
    # TF clamps the uint8 shift of 8 to 7: 0 bits keeps the top bit
    assert np.array_equal(run("Posterize", x, 0), pil_per_image(x, lambda im: ImageOps.posterize(im, 1)))
    for thr in (0, 25, 128, 179, 255, 256):
        assert np.array_equal(run("Solarize", x, thr), pil_per_image(x, lambda im: ImageOps.solarize(im, thr))), thr
    assert np.array_equal(run("Solarize", x, 0), 255 - x)
    assert np.array_equal(run("Equalize", x), pil_per_image(x, ImageOps.equalize))
    flat = np.full((1, 3, 5, 5), 77, np.uint8)
    assert np.array_equal(run("Equalize", flat), flat)


def test_solarize_add():
    x = images()
    for add in (0, 33, 110):
        want = np.where(x < 128, np.clip(x.astype(int) + add, 0, 255), x).astype(np.uint8)
        assert np.array_equal(run("SolarizeAdd", x, add), want)


def tf_blend(a, b, factor):
    """autoaugment.py blend in float32 with truncation; 0 -> a, 1 -> b."""
    if factor == 0.0:
        return a.copy()
    if factor == 1.0:
        return b.copy()
    f = np.float32(factor)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    temp = (a32 + f * (b32 - a32)).astype(np.float32)
    return np.clip(temp, 0, 255).astype(np.uint8)


def test_autocontrast_matches_tf_recipe_and_pil_within_one():
    x = np.concatenate([images(), images(seed=2, low=30, high=200)])
    x[0, 1] = 9  # a constant channel is left alone
    want = np.empty_like(x)
    for i in range(len(x)):
        for c in range(3):
            ch = x[i, c]
            lo, hi = np.float32(ch.min()), np.float32(ch.max())
            if hi > lo:
                scale = np.float32(255.0) / (hi - lo)
                offset = -lo * scale
                want[i, c] = np.clip(ch.astype(np.float32) * scale + offset, 0, 255).astype(np.uint8)
            else:
                want[i, c] = ch
    got = run("AutoContrast", x)
    assert np.array_equal(got, want)
    assert np.abs(got.astype(int) - pil_per_image(x, ImageOps.autocontrast).astype(int)).max() <= 1


def tf_gray(x):
    """tf.image.rgb_to_grayscale: x*float32(1/255), dot (0.2989, 0.587, 0.114), *255.5, truncate."""
    f = x.astype(np.float32) * np.float32(1.0 / 255.0)
    w = np.array([0.2989, 0.5870, 0.1140], np.float32)
    g = (f[:, 0] * w[0] + f[:, 1] * w[1]).astype(np.float32) + f[:, 2] * w[2]
    return (g.astype(np.float32) * np.float32(255.5)).astype(np.uint8)[:, None]


@pytest.mark.parametrize("level", [0, 1, 3, 5, 6, 8, 9, 10])
def test_enhance_ops_match_tf_recipe(level):
    factor = level_to_arg("Color", level)
    x = images(h=12, w=10, seed=level)
    n, _, h, w = x.shape
    gray = np.repeat(tf_gray(x), 3, axis=1)
    assert np.array_equal(run("Color", x, factor), tf_blend(gray, x, factor))
    assert np.array_equal(run("Brightness", x, factor), tf_blend(np.zeros_like(x), x, factor))
    # official contrast: the "mean" is sum(histogram)/256 = H*W/256 (here 120/256 -> 0)
    assert np.array_equal(run("Contrast", x, factor), tf_blend(np.full_like(x, int(h * w / 256.0)), x, factor))
    smooth = x.copy()
    xi = x.astype(np.int64)
    for r in range(1, h - 1):
        for c in range(1, w - 1):
            s = xi[:, :, r - 1 : r + 2, c - 1 : c + 2].sum(axis=(2, 3)) + 4 * xi[:, :, r, c]
            smooth[:, :, r, c] = s // 13
    assert np.array_equal(run("Sharpness", x, factor), tf_blend(smooth, x, factor))


def test_contrast_degenerate_is_hw_over_256():
    x = images(n=2, h=32, w=32)
    f = level_to_arg("Contrast", 0)  # 0.1: mostly the degenerate image
    assert np.array_equal(run("Contrast", x, f), tf_blend(np.full_like(x, 4), x, f))


def tf_round(v):
    """std::round on a float32 value: halves away from zero."""
    v = float(v)
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def ref_project(x, t):
    """ImageProjectiveTransform, NEAREST, fill 128: out[y, x] = in[round(a0 x + a1 y + a2), round(b0 x + b1 y + b2)]."""
    t = np.asarray(t, np.float32)
    n, c, h, w = x.shape
    out = np.full_like(x, 128)
    for oy in range(h):
        for ox in range(w):
            fx, fy = np.float32(ox), np.float32(oy)
            ix = tf_round(np.float32(np.float32(t[0] * fx) + np.float32(t[1] * fy)) + t[2])
            iy = tf_round(np.float32(np.float32(t[3] * fx) + np.float32(t[4] * fy)) + t[5])
            if 0 <= ix < w and 0 <= iy < h:
                out[:, :, oy, ox] = x[:, :, iy, ix]
    return out


def test_translate_and_shear_match_reference_with_fill_128():
    x = images(n=2, h=32, w=32)
    for p in (0.0, 25.0, -25.0, 3.0, -7.0):
        assert np.array_equal(run("TranslateX", x, p), ref_project(x, [1, 0, p, 0, 1, 0])), p
        assert np.array_equal(run("TranslateY", x, p), ref_project(x, [1, 0, 0, 0, 1, p])), p
    shifted = run("TranslateX", x, 3.0)  # content moves left by 3 px; the right 3 columns are 128
    assert np.array_equal(shifted[..., :29], x[..., 3:]) and (shifted[..., 29:] == 128).all()
    for level in (50.0, 225.0, -250.0):  # level >= 2 moves a 32 px image fully out of frame
        assert (run("TranslateY", x, level) == 128).all()
    for s in (0.03, 0.09, 0.15, -0.15, 0.27, -0.3):
        assert np.array_equal(run("ShearX", x, s), ref_project(x, [1, s, 0, 0, 1, 0])), s
        assert np.array_equal(run("ShearY", x, s), ref_project(x, [1, 0, 0, s, 1, 0])), s
    # a rounding tie: float32(0.15) * 10 == 1.5 exactly; std::round sends x + 1.5 to x + 2 (not to even)
    sh = run("ShearX", x, 0.15)
    assert np.array_equal(sh[:, :, 10, :30], x[:, :, 10, 2:32])


def test_rotate_matches_reference_and_rot90():
    x = images(n=2, h=32, w=32, seed=5)
    for deg in (6.0, -21.0, 24.0, 0.0):
        rad = np.float32(deg) * np.float32(math.pi / 180.0)
        cos, sin = np.cos(rad, dtype=np.float32), np.sin(rad, dtype=np.float32)
        w1 = np.float32(31)
        xo = (w1 - (cos * w1 - sin * w1)) / np.float32(2)
        yo = (w1 - (sin * w1 + cos * w1)) / np.float32(2)
        assert np.array_equal(run("Rotate", x, deg), ref_project(x, [cos, -sin, xo, sin, cos, yo])), deg
    assert np.array_equal(run("Rotate", x, 0.0), x)
    # positive angles turn the content counter-clockwise (tfa.image.rotate), about the image centre
    assert np.array_equal(run("Rotate", x, 90.0), np.rot90(x, 1, axes=(2, 3)))
    r = run("Rotate", x, 45.0)
    assert (r[:, :, 0, 0] == 128).all() and (r[:, :, -1, -1] == 128).all()  # corners filled with 128


def test_cutout_patch_and_fill():
    x = images(n=1, h=32, w=32, high=128)  # no pixel is 128 before the cutout
    for pad, cy, cx in [(3, 10, 20), (3, 0, 31), (10, 5, 5), (0, 4, 4)]:
        want = x.copy()
        want[:, :, max(0, cy - pad) : min(32, cy + pad), max(0, cx - pad) : min(32, cx + pad)] = 128
        got = run("Cutout", x, pad, cy, cx)
        assert np.array_equal(got, want), (pad, cy, cx)
    assert ((run("Cutout", x, 3, 10, 20) == 128).sum(axis=(2, 3)) == 36).all()  # 2*pad square
    assert (run("Cutout", x, 40, 16, 16) == 128).all()  # level 4 (pad 40) on 32 px: the whole image


def test_batched_ops_take_per_image_arguments():
    x = images(n=4, h=16, w=16)
    args = [3.0, -21.0, 0.0, 30.0]
    got = apply_op("Rotate", torch.from_numpy(x), torch.tensor(args, dtype=torch.float64)).numpy()
    for i, a in enumerate(args):
        assert np.array_equal(got[i : i + 1], run("Rotate", x[i : i + 1], a))
    got = apply_op("Cutout", torch.from_numpy(x), torch.tensor([2, 3, 0, 5]), torch.tensor([0, 5, 9, 15]), torch.tensor([1, 2, 3, 4])).numpy()
    for i, (p, cy, cx) in enumerate(zip([2, 3, 0, 5], [0, 5, 9, 15], [1, 2, 3, 4])):
        assert np.array_equal(got[i : i + 1], run("Cutout", x[i : i + 1], p, cy, cx))


# ---------------------------------------------------------------- sampling and the batched policy


def test_sub_policy_frequencies_coins_signs_and_centres():
    aa = BatchAutoAugment("cifar10")
    n = 95 * 400
    d = aa.draw(n, 32, 32, torch.Generator().manual_seed(0))
    counts = torch.bincount(d.which, minlength=95).double()
    expected = n / 95
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 94 + 5 * math.sqrt(2 * 94)  # chi-square, 94 dof
    # each op applied with its own probability (aggregated over the sub-policies per slot)
    for j in range(2):
        p = torch.tensor([sub[j][1] for sub in EXPECTED_CIFAR], dtype=torch.float64)[d.which]
        applied = (d.coin[:, j] < p).double()
        assert abs(applied.mean().item() - p.mean().item()) < 4 * math.sqrt(0.25 / n)
        assert abs(d.negative[:, j].double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
        assert d.cy[:, j].min() == 0 and d.cy[:, j].max() == 31 and d.cx[:, j].min() == 0 and d.cx[:, j].max() == 31
    # probability 0.0 never applies: sub-policy 10 is (Solarize 0.4, AutoContrast 0.0)
    tenth = (d.which == 10).nonzero().flatten().tolist()
    assert tenth and all("AutoContrast" not in [op[0] for op in aa.image_ops(d, i)] for i in tenth)


def test_batch_equals_each_images_own_ops_and_is_per_image():
    one = torch.from_numpy(images(n=1, h=32, w=32, seed=7))
    x = one.expand(300, 3, 32, 32).contiguous()
    aa = BatchAutoAugment("cifar10")
    out = aa(x, torch.Generator().manual_seed(3))
    d = aa.draw(300, 32, 32, torch.Generator().manual_seed(3))
    assert len({o.numpy().tobytes() for o in out}) > 30
    seen = set()
    for i in range(300):
        want = one.clone()
        for name, arg, cy, cx in aa.image_ops(d, i):
            want = apply_op(name, want, arg, cy, cx)
            seen.add(name)
        assert torch.equal(out[i : i + 1], want), i
    assert {"TranslateY", "Equalize", "AutoContrast", "Solarize"} <= seen
    with pytest.raises(ValueError):
        aa(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.Generator())
