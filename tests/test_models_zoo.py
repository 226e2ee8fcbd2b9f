"""The paper's architectures: parameter counts derived from the architectures, shake layers against a
float64 reference, every mini model trains a step, ImageNet/EfficientNet glue, the `models` command."""

from __future__ import annotations

import math
import subprocess
from contextlib import nullcontext
from fractions import Fraction
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import sam_bench.models  # noqa: F401  (registers the models)
from conftest import sam_bench_cmd
from sam_bench.errors import ConfigError
from sam_bench.models import build_model, sam_bench_models
from sam_bench.models.shakedrop import ShakeDrop, ShakeShake
from sam_bench.optim.bn import batchnorm_modules, set_bn_eval
from sam_bench.paths import config_dir

MINIS = ["wrn_mini", "wrn_nobn_mini", "shake_shake_mini", "pyramidnet_mini", "pyramidnet_shakedrop_mini", "resnet_cifar_mini", "resnet_noskip_mini"]


def count_on_meta(name: str, **kwargs) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def bn(c: int) -> int:
    return 2 * c  # γ and β


def conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout  # bias-free


def dense(cin: int, k: int) -> int:
    return cin * k + k


# ---------------------------------------------------------------------------------------------
# parameter counts, derived here from the architectures


def wrn_params(depth: int, width: int, k: int, conv1x1: bool = False, with_bn: bool = True) -> int:
    """Stem conv; per block BN, conv3x3, BN, conv3x3 (+ a 1x1 projection where the shape changes
    in the Zagoruyko-Komodakis variant); final BN; dense."""
    n, total, cin = (depth - 4) // 6, conv(3, 3, 16), 16
    b = bn if with_bn else (lambda c: 0)
    for cout in (16 * width, 32 * width, 64 * width):
        for i in range(n):
            total += b(cin) + conv(3, cin, cout) + b(cout) + conv(3, cout, cout)
            if conv1x1 and i == 0:
                total += conv(1, cin, cout)
            cin = cout
    return total + b(cin) + dense(cin, k)


def test_wrn28_10_both_shortcuts_and_no_bn():
    official = count_on_meta("wrn28_10", num_classes=10)
    zk = count_on_meta("wrn28_10", num_classes=10, shortcut="conv1x1")
    assert official == wrn_params(28, 10, 10) == 36_220_634
    assert zk == wrn_params(28, 10, 10, conv1x1=True) == 36_479_194
    assert round(zk / 1e6, 1) == 36.5  # WRN paper, Table / Fig.: WRN-28-10 36.5 M
    assert count_on_meta("wrn40_10_nobn", num_classes=10) == wrn_params(40, 10, 10, with_bn=False)
    assert count_on_meta("wrn40_2", num_classes=10) == wrn_params(40, 2, 10)  # 2.2 M in the WRN paper
    assert round(count_on_meta("wrn40_2", num_classes=10) / 1e6, 1) == 2.2
    with torch.device("meta"):
        m = timm.create_model("wrn40_10_nobn")
    assert not batchnorm_modules(m)


def shake_shake_params(blocks: int, width: int, k: int) -> int:
    """Stem conv+BN; per block two branches (conv3x3, BN, conv3x3, BN), and where the width
    changes Gastaldi's shortcut (two 1x1 convs to cout/2, one BN over cout); dense."""
    total, cin = conv(3, 3, 16) + bn(16), 16
    for cout in (16 * width, 32 * width, 64 * width):
        for _ in range(blocks):
            total += 2 * (conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout))
            if cin != cout:
                total += 2 * conv(1, cin, cout // 2) + bn(cout)
            cin = cout
    return total + dense(cin, k)



@pytest.mark.parametrize("bn", [True, False])
def test_wide_resnet_block_adds_its_input_unchanged(bn):
    """Pre-activation block (not the first of a group): branch(relu(bn(x))) + x, with x itself, not
    relu(x), on the shortcut, and x left as it was (an in-place ReLU right after a removed BN would
    overwrite it: Fig. 3's WRN without BN)."""
    from sam_bench.models.wide_resnet import WideResNetBlock

    torch.manual_seed(0)
    block = WideResNetBlock(8, 8, 1, activate_before_residual=False, dropout=0.0, bn=bn).double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    x0 = x.clone()
    out = block(x)
    assert torch.equal(x, x0)
    pre = torch.relu(block.init_bn[0](x0))
    branch = block.conv2(torch.relu(block.bn2[0](block.conv1(pre))))
    assert torch.allclose(out, branch + x0, rtol=0, atol=1e-12)
    assert (x0 < 0).any()  # relu(x) != x here: the check can tell them apart

def test_shake_shake_26_2x96d_parameter_count():
    n = count_on_meta("shake_shake_26_2x96d", num_classes=10)
    assert n == shake_shake_params(4, 6, 10) == 26_192_922
    assert round(n / 1e6, 1) == 26.2  # Gastaldi 2017: 26.2 M
    with torch.device("meta"):
        m = timm.create_model("shake_shake_26_2x96d")
    widths = [blk.branch_a[1].out_channels for blk in m.blocks]
    assert widths == [96] * 4 + [192] * 4 + [384] * 4  # 4 blocks per group, 96/192/384


def pyramid_params(widths: list[int], k: int) -> int:
    """Stem conv+BN; per bottleneck BN(cin), 1x1 cin→w, BN, 3x3 w→w, BN, 1x1 w→4w, BN(4w); final
    BN; dense. The shortcut (pool + zero channels) has no parameters."""
    total, cin = conv(3, 3, 16) + bn(16), 16
    for w in widths:
        total += bn(cin) + conv(1, cin, w) + bn(w) + conv(3, w, w) + bn(w) + conv(1, w, 4 * w) + bn(4 * w)
        cin = 4 * w
    return total + bn(cin) + dense(cin, k)


def test_pyramidnet272_alpha200_parameter_count():
    blocks = 3 * (272 - 2) // 9  # 90 bottleneck blocks
    exact = [Fraction(16) + Fraction(200 * i, blocks) for i in range(1, blocks + 1)]
    rounded = [round(c) for c in exact]  # the official code rounds (half to even)
    truncated = [math.floor(c) for c in exact]  # the PyramidNet paper truncates
    n = count_on_meta("pyramidnet272_shakedrop", num_classes=10)
    assert n == pyramid_params(rounded, 10) == 26_210_842
    assert round(pyramid_params(truncated, 10) / 1e6, 1) == 26.0  # PyramidNet paper: 26.0 M
    assert 0.15e6 < n - pyramid_params(truncated, 10) < 0.25e6  # "roughly 0.2M additional"
    assert count_on_meta("pyramidnet272", num_classes=10) == n  # plain = same net, no ShakeDrop
    with torch.device("meta"):
        m = timm.create_model("pyramidnet272_shakedrop")
    assert [blk.branch[1].out_channels for blk in m.blocks] == rounded and rounded[-1] == 216


def test_pyramidnet_shakedrop_schedule():
    with torch.device("meta"):
        m = timm.create_model("pyramidnet272_shakedrop")
    sds = [blk.shakedrop for blk in m.blocks]
    assert len(sds) == 90
    for l, sd in enumerate(sds, start=1):
        assert sd.keep_prob == pytest.approx(1 - l / 90 * 0.5)
        assert sd.alpha_range == (-1.0, 1.0) and sd.beta_range == (0.0, 1.0)
    assert sds[-1].keep_prob == pytest.approx(0.5)  # p_L = 0.5
    with torch.device("meta"):
        plain = timm.create_model("pyramidnet272")
    assert not any(isinstance(x, ShakeDrop) for x in plain.modules())


def cifar_resnet_params(depth: int, k: int, option: str = "A") -> int:
    """Stem conv+BN; per basic block conv3x3, BN, conv3x3, BN (option B adds 1x1 conv + BN where
    the shape changes); dense."""
    n, total, cin = (depth - 2) // 6, conv(3, 3, 16) + bn(16), 16
    for cout in (16, 32, 64):
        for _ in range(n):
            total += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
            if option == "B" and cin != cout:
                total += conv(1, cin, cout) + bn(cout)
            cin = cout
    return total + dense(cin, k)


def test_cifar_resnets_parameter_count():
    n = count_on_meta("resnet32", num_classes=10)
    assert n == cifar_resnet_params(32, 10) == 464_154
    assert round(n / 1e6, 2) == 0.46  # He et al. 2016, Table 6
    assert count_on_meta("resnet_cifar", depth=32, shortcut="B", num_classes=10) == cifar_resnet_params(32, 10, "B")
    assert count_on_meta("resnet56_noskip", num_classes=10) == cifar_resnet_params(56, 10)


def imagenet_resnet_params(layers: list[int], k: int = 1000) -> int:
    """7x7 stem + BN; bottleneck stages of widths 64..512 (1x1, 3x3, 1x1 x4, three BNs), a 1x1
    conv + BN projection in each stage's first block; dense 2048 → k."""
    total, cin = conv(7, 3, 64) + bn(64), 64
    for width, n in zip((64, 128, 256, 512), layers):
        for i in range(n):
            total += conv(1, cin, width) + bn(width) + conv(3, width, width) + bn(width) + conv(1, width, 4 * width) + bn(4 * width)
            if i == 0:
                total += conv(1, cin, 4 * width) + bn(4 * width)
            cin = 4 * width
    return total + dense(cin, k)


@pytest.mark.parametrize("name,layers,paper_m", [("resnet50", [3, 4, 6, 3], 25.6), ("resnet101", [3, 4, 23, 3], 44.5), ("resnet152", [3, 8, 36, 3], 60.2)])
def test_imagenet_resnets_parameter_count(name, layers, paper_m):
    n = count_on_meta(name)
    assert n == imagenet_resnet_params(layers)
    assert round(n / 1e6, 1) == paper_m


def test_efficientnets_parameter_count():
    # EfficientNet paper: B7 66 M; Noisy Student paper: L2 480 M (timm's TF ports)
    assert round(count_on_meta("tf_efficientnet_b7") / 1e6) == 66
    assert round(count_on_meta("tf_efficientnet_l2") / 1e6) == 480


# ---------------------------------------------------------------------------------------------
# shake layers against a float64 reference built from the same (rewound) random numbers


def _rewound_uniform(state: torch.Tensor, n: int, batch: int) -> torch.Tensor:
    torch.set_rng_state(state)
    return torch.rand((n, batch, 1, 1, 1), dtype=torch.float32).double()


def test_shakedrop_forward_backward_and_true_gradient():
    torch.manual_seed(3)
    keep = 0.6
    sd = ShakeDrop(keep).train()
    x = torch.randn(64, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    sd(x).backward(torch.ones_like(x))
    u = _rewound_uniform(state, 3, 64)
    gate = (u[0] < keep).double()
    alpha, beta = -1 + 2 * u[1], u[2]
    fwd, bwd = gate + alpha - gate * alpha, gate + beta - gate * beta
    torch.set_rng_state(state)
    torch.testing.assert_close(sd(x.detach()), x.detach() * fwd)
    torch.testing.assert_close(x.grad, bwd.expand_as(x))  # backward uses β ...
    dropped = gate.flatten() == 0
    assert dropped.any() and not torch.allclose(x.grad[dropped], fwd.expand_as(x)[dropped])  # ... not α
    assert (gate.flatten() == 1).any()

    sd.true_gradient = True
    x.grad = None
    torch.set_rng_state(state)
    out = sd(x)
    out.backward(torch.ones_like(x))
    torch.testing.assert_close(out, x.detach() * fwd)  # same draws with the flag flipped
    torch.testing.assert_close(x.grad, fwd.expand_as(x))


def test_shakedrop_eval_is_the_training_expectation():
    torch.manual_seed(0)
    keep = 0.7
    sd = ShakeDrop(keep)
    x = torch.ones(200_000, 1, 1, 1)
    mc = sd.train()(x).mean().item()  # E[b + α - bα] = p + E[α](1 - p) = p for α ~ U(-1, 1)
    sd.eval()
    torch.testing.assert_close(sd(x[:4]), torch.full((4, 1, 1, 1), keep))
    assert abs(mc - keep) < 4 * math.sqrt((keep + (1 - keep) / 3 - keep**2) / x.shape[0])
    asym = ShakeDrop(0.5, alpha_range=(0.0, 1.0)).eval()  # E[α] = 0.5: 0.5 + 0.5·0.5
    torch.testing.assert_close(asym(torch.ones(1)), torch.tensor([0.75]))


def test_shake_shake_forward_backward_true_gradient_and_eval():
    torch.manual_seed(5)
    ss = ShakeShake().train()
    a = torch.randn(32, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(32, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    out = ss(a, b)
    out.backward(torch.ones_like(out))
    u = _rewound_uniform(state, 2, 32)
    alpha, beta = u[0], u[1]
    torch.testing.assert_close(out, alpha * a.detach() + (1 - alpha) * b.detach())
    torch.testing.assert_close(a.grad, beta.expand_as(a))
    torch.testing.assert_close(b.grad, (1 - beta).expand_as(b))
    assert not torch.allclose(a.grad, alpha.expand_as(a))  # the backward coefficient is independent

    ss.true_gradient = True
    a.grad = b.grad = None
    torch.set_rng_state(state)
    out2 = ss(a, b)
    out2.backward(torch.ones_like(out2))
    torch.testing.assert_close(out2, out)  # identical forward draws after the rewind
    torch.testing.assert_close(a.grad, alpha.expand_as(a))
    torch.testing.assert_close(b.grad, (1 - alpha).expand_as(b))

    ss.eval()
    torch.testing.assert_close(ss(a, b), 0.5 * (a + b))


@pytest.mark.parametrize("name, kwargs, draws", [
    ("resnet18", {"drop_rate": 0.5}, True), ("tf_efficientnet_b0", {"drop_rate": 0.5, "drop_path_rate": 0.0}, True),
    ("resnet18", {}, False), ("tf_efficientnet_b0", {"drop_rate": 0.0, "drop_path_rate": 0.0}, False)])
def test_timm_functional_dropout_counts_as_randomness(name, kwargs, draws):
    """timm models apply their head dropout with F.dropout (drop_rate), which no module shows: RNG
    replay must still see it, or the two SAM passes draw different masks (QA: it was silently off)."""
    import timm

    from sam_bench.engine.step import uses_randomness

    model = timm.create_model(name, num_classes=3, **kwargs).train()
    assert uses_randomness(model) is draws
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    assert torch.equal(first, model(x)) is not draws  # the output depends on the RNG exactly when it draws


@pytest.mark.parametrize("name", ["shake_shake_mini", "pyramidnet_shakedrop_mini"])
def test_whole_model_replays_draws_and_is_marked_stochastic(name):
    from sam_bench.engine.step import uses_randomness

    model = build_model(name, num_classes=10, in_chans=3).train()
    assert uses_randomness(model)
    shake = [m for m in model.modules() if hasattr(m, "true_gradient")]
    assert shake and all(m.stochastic and m.true_gradient is False for m in shake)
    x = torch.randn(6, 3, 32, 32)
    state = torch.get_rng_state()
    set_bn_eval(batchnorm_modules(model))  # compare the shake draws, not BN running updates
    for m in shake:
        m.true_gradient = True
    first = model(x)
    torch.set_rng_state(state)
    for m in shake:
        m.true_gradient = False
    torch.testing.assert_close(model(x), first, rtol=0, atol=0)
    assert not torch.equal(model(x), first)  # without the rewind the draws differ


# ---------------------------------------------------------------------------------------------
# structure


def test_gastaldi_shortcut_matches_reference():
    model = build_model("shake_shake_cifar", num_classes=10, in_chans=3, blocks_per_group=1, width=2)
    sc = model.blocks[1].shortcut  # 32 -> 64 channels, stride 2
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    sc = sc.double().eval()
    w1, w2 = sc.conv_h1.weight[:, :, 0, 0], sc.conv_h2.weight[:, :, 0, 0]
    shifted = torch.zeros_like(x)
    shifted[:, :, :-1, :-1] = x[:, :, 1:, 1:]  # one pixel right/down, zero-filled
    h1 = torch.einsum("oc,nchw->nohw", w1, x[:, :, 0::2, 0::2])
    h2 = torch.einsum("oc,nchw->nohw", w2, shifted[:, :, 0::2, 0::2])
    ref = sc.bn(torch.cat([h1, h2], 1))
    torch.testing.assert_close(sc(x), ref)


def test_wrn_conv1x1_shortcut_takes_the_activated_input():
    model = build_model("wide_resnet_cifar", 10, 3, depth=10, width=2, shortcut="conv1x1").eval()
    projections = [b.proj for b in model.blocks if b.proj is not None]
    assert len(projections) == 3 and all(p.kernel_size == (1, 1) for p in projections)
    block = model.blocks[1]  # 32 -> 64, stride 2
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        act = block.init_bn(x)
        ref = block.conv2(block.bn2(block.conv1(act))) + block.proj(act)
        torch.testing.assert_close(block(x), ref)


def test_resnet56_noskip_has_no_skip():
    torch.manual_seed(0)
    for name, expect_skip in (("resnet56_noskip", False), ("resnet32", True)):
        model = build_model(name, 10, 3).eval()
        block = model.blocks[1]  # 16 -> 16, stride 1
        torch.nn.init.zeros_(block.bn2.weight)
        torch.nn.init.zeros_(block.bn2.bias)  # residual branch outputs 0
        x = torch.randn(2, 16, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(block(x), F.relu(x) if expect_skip else torch.zeros_like(x))
    assert len(build_model("resnet56_noskip", 10, 3).blocks) == 27


def test_cifar_models_use_official_init():
    torch.manual_seed(0)
    model = build_model("wrn28_10", 100, 3)
    bound = 1 / math.sqrt(100)  # U[-1/√K, 1/√K], K = classes (flax kernel shape[1])
    assert model.fc.weight.abs().max() <= bound and model.fc.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.fc.bias) == 0
    w = model.blocks[5].conv1.weight  # Kaiming normal, fan-out: std √(2 / (9·cout))
    assert w.std().item() == pytest.approx(math.sqrt(2 / (9 * w.shape[0])), rel=0.02)


# ---------------------------------------------------------------------------------------------
# every mini model trains a step (with the SAM step) and evaluates, also channels_last


@pytest.mark.parametrize("name", MINIS)
def test_mini_models_train_one_step_and_evaluate(name):
    from sam_bench.engine.step import RngReplay, train_step
    from sam_bench.optim.sam import SAM

    assert name in sam_bench_models()
    model = build_model(name, num_classes=10, in_chans=3)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    loss, logits = train_step(model, opt, x, y, F.cross_entropy, nullcontext, batchnorm_modules(model), RngReplay(torch.device("cpu")))
    assert torch.isfinite(loss) and logits.shape == (8, 10)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    x_cl = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x)
        out_cl = model.to(memory_format=torch.channels_last)(x_cl)
        again = model(x_cl)
    assert out.shape == (8, 10)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, out_cl)  # eval is deterministic (expectations, running stats)


def test_resnet50_zero_init_last_and_one_step():
    torch.manual_seed(0)
    on = build_model("resnet50", num_classes=10, in_chans=3, zero_init_last=True)
    off = build_model("resnet50", num_classes=10, in_chans=3, zero_init_last=False)
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for stage in (on.layer1, on.layer4) for b in stage)
    assert all(torch.equal(b.bn3.weight, torch.ones_like(b.bn3.weight)) for b in off.layer2)
    assert all(torch.count_nonzero(b.bn2.weight) > 0 for b in on.layer1)  # only the last BN
    opt = torch.optim.SGD(on.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    F.cross_entropy(on(x), y).backward()
    opt.step()
    assert torch.count_nonzero(on.layer1[0].bn3.weight) > 0  # γ=0 still receives a gradient
    assert on.eval()(x).shape == (2, 10)


# ---------------------------------------------------------------------------------------------
# EfficientNet finetuning glue: pretrained loading, head replacement, frozen BN, offline error


def test_pretrained_offline_error_names_weights_and_network(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as err, torch.device("meta"):
        build_model("tf_efficientnet_b7.ra_in1k", num_classes=10, in_chans=3, pretrained=True)
    msg = str(err.value)
    assert "tf_efficientnet_b7.ra_in1k" in msg and "network" in msg and "pretrained=false" in msg
    assert "\n" not in msg
    # the offline form that Hydra accepts (a key the config lacks needs +; QA: the form without + was refused)
    assert "+model.kwargs.pretrained_cfg_overlay.file=" in msg and "HF_HUB_OFFLINE=1" in msg


def test_a_local_pretrained_file_that_does_not_load_is_named_with_the_reason(tmp_path):
    """A missing file, or one of another architecture (the key lists of load_state_dict kept), is said
    as such instead of advice to pass the option just passed."""
    with pytest.raises(ConfigError, match=r"from the local file .*nowhere.pth could not be loaded: FileNotFoundError"):
        build_model("tf_efficientnet_b0", num_classes=5, in_chans=3, pretrained=True,
                    pretrained_cfg_overlay={"file": str(tmp_path / "nowhere.pth")})
    other = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", num_classes=1000).state_dict(), other)
    with pytest.raises(ConfigError, match=r"Error\(s\) in loading state_dict for EfficientNet: (Missing key|Unexpected key|size mismatch)"):
        build_model("tf_efficientnet_b0", num_classes=5, in_chans=3, pretrained=True, pretrained_cfg_overlay={"file": str(other)})


def test_pretrained_from_local_file_replaces_head_and_trains_with_frozen_bn(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("tf_efficientnet_b0", num_classes=1000)
    path = tmp_path / "b0.pth"
    torch.save(source.state_dict(), path)
    kwargs = OmegaConf.create({"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}, "drop_rate": 0.5})
    model = build_model("tf_efficientnet_b0", num_classes=5, in_chans=3, **kwargs)
    torch.testing.assert_close(model.conv_stem.weight, source.conv_stem.weight)
    torch.testing.assert_close(model.blocks[3][0].conv_pw.weight, source.blocks[3][0].conv_pw.weight)
    assert model.classifier.weight.shape == (5, 1280)  # new head for the new classes

    model.train()
    bns = batchnorm_modules(model)
    set_bn_eval(bns)  # optimizer.bn=frozen: BN as at test time
    stats = [b.running_mean.clone() for b in bns]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 4])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.equal(s, b.running_mean) for s, b in zip(stats, bns))  # statistics frozen
    assert not torch.equal(model.conv_stem.weight, source.conv_stem.weight)  # weights finetune


# ---------------------------------------------------------------------------------------------
# configs


def model_configs() -> list[Path]:
    return sorted(Path(config_dir(), "model").glob("*.yaml"))


def test_every_model_choice_exists_and_builds_on_meta():
    from sam_bench.models.summary import count, default_input

    expected = {"wrn", "wrn28_10", "wrn40_2", "wrn40_10", "wrn40_10_nobn", "shake_shake_26_2x96d", "pyramidnet272_shakedrop",
                "pyramidnet", "resnet32", "resnet56_noskip", "resnet50", "resnet101", "resnet152", "efficientnet_b7", "efficientnet_l2"}  # fmt: skip
    assert expected <= {p.stem for p in model_configs()}
    params = {}
    for path in model_configs():
        cfg = OmegaConf.load(path)
        size, classes = default_input(cfg.arch)
        params[path.stem] = count(cfg.arch, size, classes, flops=False, **OmegaConf.to_container(cfg.kwargs))[0]
    assert params["wrn28_10"] == params["wrn"] == wrn_params(28, 10, 10)
    assert params["pyramidnet"] == params["pyramidnet272_shakedrop"] == 26_210_842
    assert params["resnet50"] == imagenet_resnet_params([3, 4, 6, 3])
    assert params["shake_shake_26_2x96d"] == shake_shake_params(4, 6, 10)
    assert params["resnet32"] == 464_154
    assert OmegaConf.load(Path(config_dir(), "model", "pyramidnet.yaml")).kwargs.shakedrop is False
    assert default_input("tf_efficientnet_l2.ns_jft_in1k_475")[0] == 475
    assert default_input("tf_efficientnet_b7.ra_in1k")[0] == 600


def test_flop_count_of_wrn28_10_matches_hand_count():
    from sam_bench.models.summary import count

    # 2 FLOPs per multiply-add of every conv (out positions × k² × cin × cout) and the dense layer
    flops, cin, res = 2 * 32 * 32 * conv(3, 3, 16), 16, 32
    for g, cout in enumerate((160, 320, 640)):
        for i in range(4):
            res = res // 2 if (g > 0 and i == 0) else res
            flops += 2 * res * res * (conv(3, cin, cout) + conv(3, cout, cout))
            cin = cout
    flops += 2 * 640 * 10
    assert count("wrn28_10", 32, 10)[1] == flops


@pytest.mark.slow
def test_models_command_lists_every_model_and_config():
    proc = subprocess.run(sam_bench_cmd() + ["models"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    for name in sam_bench_models():
        assert name in rows, name
    for path in model_configs():
        assert path.stem in rows, path.stem
    assert rows["wrn28_10"][-2] == "36.221" and rows["resnet50"][-2] == "25.557"
    assert rows["efficientnet_l2"][1] == "tf_efficientnet_l2.ns_jft_in1k_475" and rows["efficientnet_l2"][2] == "475"
    bad = subprocess.run(sam_bench_cmd() + ["models", "extra"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no arguments" in bad.stderr


def test_shake_functions_under_vmap_keep_their_backward_coefficients():
    """Under torch.func.vmap (m-sharpness's vmap engine) the custom backward still applies the
    backward coefficient: d/dx sum(x*fwd) = bwd and d/da, d/db of the mix = β, 1-β, per chunk."""
    from torch.func import grad, vmap

    from sam_bench.models.shakedrop import shake_mix, shake_scale

    g = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(3, 4, 2, 5, 5, generator=g) for _ in range(3))
    fwd, bwd = (torch.rand(3, 4, 1, 1, 1, generator=g) for _ in range(2))
    gx = vmap(grad(lambda x, f, w: shake_scale(x, f, w).sum()))(x, fwd, bwd)
    torch.testing.assert_close(gx, bwd.expand_as(x))
    ga, gb = vmap(grad(lambda a, b, f, w: shake_mix(a, b, f, w).sum(), argnums=(0, 1)))(a, b, fwd, bwd)
    torch.testing.assert_close(ga, bwd.expand_as(a))
    torch.testing.assert_close(gb, (1 - bwd).expand_as(b))
    torch.testing.assert_close(vmap(shake_mix)(a, b, fwd, bwd), torch.lerp(b, a, fwd))


def test_shake_layers_compile_fullgraph_and_keep_their_draws():
    """torch.compile traces the custom autograd functions and the in-forward torch.rand without
    graph breaks (``fullgraph=True``); aot_eager keeps eager's RNG stream, so the values match."""
    torch._dynamo.reset()
    sd, ss = ShakeDrop(0.7).train(), ShakeShake().train()
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    y = torch.randn(4, 3, 2, 2, requires_grad=True)

    def f(a, b):
        return sd(ss(a, b))

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    state = torch.get_rng_state()
    compiled(x, y).sum().backward()
    grads = (x.grad.clone(), y.grad.clone())
    x.grad = y.grad = None
    torch.set_rng_state(state)
    f(x, y).sum().backward()
    torch.testing.assert_close((x.grad, y.grad), grads)


def test_bad_architecture_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="9n\\+2"):
        build_model("pyramidnet_cifar", 10, 3, depth=100)
    with pytest.raises(ConfigError, match="keep_prob"):
        build_model("pyramidnet_shakedrop_mini", 10, 3, shakedrop_p_last=1.5)
    with pytest.raises(ConfigError, match="shortcut"):
        build_model("wrn_mini", 10, 3, shortcut="1x1")
    with pytest.raises(ConfigError, match="6n\\+2"):
        build_model("resnet_cifar", 10, 3, depth=33)
    with pytest.raises(ConfigError, match="no pretrained weights exist"):
        build_model("shake_shake_mini", 10, 3, pretrained=True)


@pytest.mark.parametrize("name", ["shake_shake_mini", "pyramidnet_shakedrop_mini"])
@pytest.mark.parametrize("true_gradient", [True, False])
def test_shake_models_trace_whole_under_torch_compile(name, true_gradient):
    """fullgraph tracing (dynamo, eager backend: no code generation) of forward and backward with
    the true-gradient switch either way; torch 2.14 rejected an autograd.Function given the same
    tensor twice, which the true gradient used to do."""
    torch._dynamo.reset()
    model = build_model(name, 10, 3).train()
    for m in model.modules():
        if hasattr(m, "true_gradient"):
            m.true_gradient = true_gradient
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    out = torch.compile(model, fullgraph=True, backend="eager")(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's CUDA RNG under SAM's rewind needs a GPU")
@pytest.mark.parametrize("name", ["shake_shake_mini", "pyramidnet_shakedrop_mini"])
def test_inductor_compiled_shake_models_replay_on_cuda(name):
    """Inductor draws its own random numbers, seeded from the CUDA generator: rewinding that
    generator must still replay the same shake coefficients (bf16, channels_last, fullgraph)."""
    torch._dynamo.reset()
    dev = torch.device("cuda")
    model = build_model(name, 10, 3).to(dev).to(memory_format=torch.channels_last).train()
    set_bn_eval(batchnorm_modules(model))  # compare shake draws, not BN running updates
    compiled = torch.compile(model, fullgraph=True)
    shake = [m for m in model.modules() if hasattr(m, "true_gradient")]
    x = torch.randn(16, 3, 32, 32, device=dev).to(memory_format=torch.channels_last)

    def run(true_gradient: bool) -> torch.Tensor:
        for m in shake:
            m.true_gradient = true_gradient
        with torch.autocast("cuda", torch.bfloat16):
            return compiled(x).float()

    state = torch.cuda.get_rng_state(dev)
    first = run(True)
    first.sum().backward()
    torch.cuda.set_rng_state(state, dev)
    second = run(False)
    second.sum().backward()
    assert torch.equal(first, second)
    assert not torch.equal(run(False), second)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        torch.testing.assert_close(compiled(x).float(), model(x).float(), rtol=0.05, atol=0.05)
