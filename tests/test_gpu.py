"""CUDA-only checks, run on a GPU machine by scripts/gpu_check.sh (`pytest -m gpu`).

The default test run deselects them (pyproject addopts); the CPU paths they mirror are tested
elsewhere in the suite.
"""

import json
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import sam_bench_cmd

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_sam_step_on_cuda_matches_float64_reference():
    import test_sam as ref

    torch.set_default_dtype(torch.float64)
    try:
        model = ref.tiny_model().cuda()
        expected = ref.ref_sam_steps([w.cpu() for w in ref.model_weights(model)], steps=3, rho=ref.RHO, mode="loss", clip=5.0)
        opt = ref.SAM(model.parameters(), torch.optim.SGD, rho=ref.RHO, weight_decay=ref.WD, grad_clip=5.0,
                      lr=ref.LR, momentum=ref.MOMENTUM, nesterov=True)
        for s in range(3):
            x, y = ref.batch(s)
            ref.train_step(model, opt, x.cuda(), y.cuda(), F.cross_entropy, lambda: torch.autocast("cuda", enabled=False),
                           ref.batchnorm_modules(model))
        for got, want in zip(ref.model_weights(model), expected):
            torch.testing.assert_close(got.detach().cpu(), want, rtol=0, atol=1e-10)
    finally:
        torch.set_default_dtype(torch.float32)


def test_sam_step_and_loader_make_no_host_sync():
    """The hot path (batch gather + augmentation + two-pass SAM step) never waits for the GPU."""
    import timm

    import sam_bench.models  # noqa: F401
    from sam_bench.data.loader import DeviceLoader
    from sam_bench.engine.precision import autocast
    from sam_bench.engine.step import train_step
    from sam_bench.optim import SAM, batchnorm_modules

    dev = torch.device("cuda")
    model = timm.create_model("wrn_mini", num_classes=10).to(dev).to(memory_format=torch.channels_last)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, weight_decay=5e-4, grad_clip=5.0, lr=0.1, momentum=0.9, nesterov=True)
    images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (512,), device=dev)
    loader = DeviceLoader(images, labels, 128, [0.5] * 3, [0.25] * 3, train=True, augment=True, channels_last=True)
    bn = batchnorm_modules(model)
    amp = lambda: autocast(dev, "bf16")  # noqa: E731
    batches = loader.epoch(0)
    x, y = next(batches)
    train_step(model, opt, x, y, F.cross_entropy, amp, bn)  # warm-up allocates
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches:
            train_step(model, opt, x, y, F.cross_entropy, amp, bn)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cli_trains_on_cuda_with_bf16_channels_last_and_compile(cli_env, tmp_path):
    run_dir = tmp_path / "gpu_run"
    cmd = sam_bench_cmd() + ["train", "dataset=synthetic", "dataset.train_size=2048", "dataset.test_size=512",
                             "model.kwargs.depth=16", "model.kwargs.width=2", "trainer.epochs=2", "trainer.batch_size=128",
                             "trainer.compile=true", "trainer.progress=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((run_dir / "result.json").read_text())
    assert result["precision"] == "bf16" and result["device"] != "cpu"
    assert result["final_test_error"] < 50.0  # the synthetic task is learnable: well under chance (90 %)
