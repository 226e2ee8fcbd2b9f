"""Parameter and FLOP counts of every model, built on the meta device (no memory, no download).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` for one image in eval mode:
convolutions and matrix products, 2 FLOPs per multiply-add (so ResNet-50 at 224 px is 8.2
GFLOPs = 4.1 GMACs); element-wise ops (BN, ReLU, pooling) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from sam_bench.models import sam_bench_models

CIFAR_INPUT = 32  # the hand-written models are CIFAR models
CIFAR_CLASSES = 10


@dataclass
class ModelStats:
    name: str
    arch: str
    input_size: int
    num_classes: int
    params: int
    flops: int


def default_input(arch: str) -> tuple[int, int]:
    """(input size, classes) a model is normally run at: 32 px / 10 classes for sam-bench's CIFAR
    models, timm's pretrained config (224 for ResNets, 600 for B7, 475 for L2-475) otherwise."""
    if arch.split(".")[0] in sam_bench_models():
        return CIFAR_INPUT, CIFAR_CLASSES
    cfg = timm.models.get_pretrained_cfg(arch)
    return (cfg.input_size[-1], cfg.num_classes) if cfg is not None else (224, 1000)


def count(arch: str, input_size: int, num_classes: int, in_chans: int = 3, flops: bool = True, **kwargs: Any) -> tuple[int, int]:
    """(parameters, forward FLOPs for one image; 0 unless ``flops``) of ``arch`` on the meta device."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained", "pretrained_cfg_overlay")}
    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans, **kwargs).eval()
        params = sum(p.numel() for p in model.parameters())
        if not flops:
            return params, 0
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.empty(1, in_chans, input_size, input_size))
    return params, counter.get_total_flops()


def registered_stats() -> list[ModelStats]:
    out = []
    for name in sam_bench_models():
        params, flops = count(name, CIFAR_INPUT, CIFAR_CLASSES)
        out.append(ModelStats(name, name, CIFAR_INPUT, CIFAR_CLASSES, params, flops))
    return out


def config_stats(conf_dir: str) -> list[ModelStats]:
    """One row per ``conf/model/*.yaml`` (its arch and kwargs, pretrained loading skipped)."""
    out = []
    for path in sorted(Path(conf_dir, "model").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        arch, kwargs = cfg["arch"], dict(cfg.get("kwargs") or {})
        size, classes = default_input(arch)
        params, flops = count(arch, size, classes, **kwargs)
        out.append(ModelStats(path.stem, arch, size, classes, params, flops))
    return out


def format_table(rows: list[ModelStats], title: str, with_arch: bool) -> str:
    head = f"{'name':<26}" + (f"{'arch':<36}" if with_arch else "") + f"{'input':>6}{'classes':>8}{'params(M)':>11}{'GFLOPs':>10}"
    lines = [title, head]
    for r in rows:
        arch = f"{r.arch:<36}" if with_arch else ""
        lines.append(f"{r.name:<26}{arch}{r.input_size:>6}{r.num_classes:>8}{r.params / 1e6:>11.3f}{r.flops / 1e9:>10.3f}")
    return "\n".join(lines)


def summary(conf_dir: str) -> str:
    """Both tables: every registered sam-bench model, then every model config."""
    return (
        format_table(registered_stats(), "sam-bench models registered with timm (CIFAR head, 32x32 input):", False)
        + "\n\n"
        + format_table(config_stats(conf_dir), "model configs (conf/model/*.yaml, model=<name>):", True)
        + "\n\nGFLOPs: one image, eval mode, 2 FLOPs per multiply-add (torch FlopCounterMode).\n"
    )
