"""WideResNet as the official code: parameter counts, timm registry, a training step."""

import pytest
import timm
import torch

import sam_bench.models  # noqa: F401  (registers the models)
from sam_bench.errors import ConfigError
from sam_bench.models import build_model


def wrn_param_count(depth: int, width: int, num_classes: int, in_chans: int = 3) -> int:
    """Parameters of the official WRN (no 1x1 shortcuts), counted from the architecture.

    init conv 3x3 in->16; per block: BN(cin) + conv3x3 cin->cout + BN(cout) + conv3x3 cout->cout;
    final BN; dense (64k -> classes) with bias. A BN layer has 2 parameters per channel.
    """
    n = (depth - 4) // 6
    widths = [16 * width, 32 * width, 64 * width]
    total, cin = 9 * in_chans * 16, 16
    for cout in widths:
        for _ in range(n):
            total += 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout
            cin = cout
    return total + 2 * cin + cin * num_classes + num_classes


def count_on_meta(name: str, **kwargs) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def test_wrn28_10_parameter_count():
    c10 = count_on_meta("wrn28_10", num_classes=10)
    c100 = count_on_meta("wrn28_10", num_classes=100)
    print(f"WRN-28-10 parameters: CIFAR-10 {c10:,}  CIFAR-100 {c100:,}")
    assert c10 == wrn_param_count(28, 10, 10) == 36_220_634
    assert c100 == wrn_param_count(28, 10, 100) == 36_278_324
    # the 1x1-shortcut variant (WRN paper: 36.5 M) adds 16*160 + 160*320 + 320*640 conv weights
    assert c10 + 16 * 160 + 160 * 320 + 320 * 640 == 36_479_194


@pytest.mark.parametrize("depth,width", [(16, 4), (10, 1), (16, 2), (40, 2)])
def test_generic_wrn_matches_formula(depth, width):
    assert count_on_meta("wide_resnet_cifar", depth=depth, width=width, num_classes=10) == wrn_param_count(depth, width, 10)


def test_registered_with_timm():
    names = timm.list_models("wrn*") + timm.list_models("wide_resnet_cifar")
    assert {"wrn28_10", "wrn16_4", "wrn_mini", "wide_resnet_cifar"} <= set(names)


def test_shortcut_is_identity_pool_and_zero_padding():
    model = timm.create_model("wrn_mini", num_classes=10)
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    block = model.blocks[1]  # 16 -> 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    sc = block.shortcut(x)
    assert sc.shape == (2, 32, 4, 4)
    torch.testing.assert_close(sc[:, :16], torch.nn.functional.avg_pool2d(x, 2))
    assert torch.count_nonzero(sc[:, 16:]) == 0


def test_mini_trains_one_step_and_evaluates():
    model = build_model("wrn_mini", num_classes=10, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    assert model(x).shape == (8, 10)


def test_bad_model_names_and_kwargs_are_clear():
    with pytest.raises(ConfigError, match="not a registered model"):
        build_model("wrn_nope", 10, 3)
    with pytest.raises(ConfigError, match="do not fit"):
        build_model("wide_resnet_cifar", 10, 3, depthh=3)
    with pytest.raises(ConfigError, match="6n\\+4"):
        build_model("wide_resnet_cifar", 10, 3, depth=27)
    for width in (0, -1, 2.5):  # 0 built, and failed at the first forward pass with a traceback (QA)
        with pytest.raises(ConfigError, match=f"width must be a positive integer .*got {width}"), torch.device("meta"):
            build_model("wide_resnet_cifar", 10, 3, depth=10, width=width)


def _tf_same(x: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    """Reference of TF/Flax ``padding='SAME'`` (the official models): out = ceil(n/stride); the total
    padding max((out-1)·stride + k - n, 0) is split with the odd pixel after (bottom/right)."""
    import math

    import torch.nn.functional as F

    pads = []
    for n in (x.shape[3], x.shape[2]):  # F.pad order: width first
        total = max((math.ceil(n / stride) - 1) * stride + w.shape[-1] - n, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), w, stride=stride)


@pytest.mark.parametrize("arch,kwargs", [
    ("wide_resnet_cifar", {"depth": 10, "width": 1}),
    ("shake_shake_cifar", {"blocks_per_group": 1, "width": 1}),
    ("pyramidnet_cifar", {"depth": 11, "alpha": 12, "shakedrop": False}),
])
@pytest.mark.parametrize("size", [8, 7])  # even: one pixel at the bottom/right only; odd: one on each side
def test_every_3x3_convolution_pads_as_the_official_flax_code(arch, kwargs, size):
    """PyTorch's padding=1 put the strided convolutions' sampling grid one pixel off the official one."""
    model = build_model(arch, 10, 3, **kwargs).double()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert any(c.stride == (2, 2) for c in convs)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    for conv in convs:
        xc = torch.randn(2, conv.in_channels, size, size, dtype=torch.float64)
        torch.testing.assert_close(conv(xc), _tf_same(xc, conv.weight, conv.stride[0]), rtol=0, atol=1e-12)
    if size % 2 == 0:  # (the official models, too, need even sizes at their strided stages: 32 -> 16 -> 8, 28 -> 14 -> 7)
        assert model(x).shape == (2, 10)
