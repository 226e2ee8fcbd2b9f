"""ImageNet models from timm, with the official code's choices and clear pretrained-loading errors.

ResNet-50/101/152: timm's ``resnet50/101/152`` are the official code's ResNet V1 (stride in the
3x3 convolution, 1x1-conv + BN projection shortcuts, 7x7 stem + max-pool); ``zero_init_last=True``
(timm's default) zero-initialises the last BN γ of each block, as the official code does. Two
differences from the official ``sam_jax/imagenet_models/resnet.py`` remain, kept as timm (and every
other ResNet) has them: its stem has no ReLU between the BN and the max-pool, and its convolutions
start from flax's default LeCun-normal initialisation (timm: Kaiming-normal, fan-out).

EfficientNet-B7/L2 for finetuning (Table 3): timm's TF-ported ``tf_efficientnet_b7.ra_in1k``
(RandAugment, the paper's b7 checkpoint) and ``tf_efficientnet_l2.ns_jft_in1k_475`` (NoisyStudent
at 475 px, the paper's L2). With ``pretrained=True`` timm loads every weight but the classifier
when ``num_classes`` differs from 1000 (the official code re-initialises only the last dense layer
and keeps it for ImageNet). Freeze BN statistics with ``optimizer.bn=frozen`` (BN in eval mode).
"""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

from sam_bench.errors import ConfigError

__all__ = ["create_timm_model", "pretrained_source", "PAPER_CHECKPOINTS"]

PAPER_CHECKPOINTS = {
    "efficientnet_b7": "tf_efficientnet_b7.ra_in1k",  # EfficientNet-b7 + RandAugment, 84.7% (paper)
    "efficientnet_l2": "tf_efficientnet_l2.ns_jft_in1k_475",  # NoisyStudent L2 at 475 px, 88.2% (paper)
}


def pretrained_source(arch: str) -> str:
    """Where timm fetches the weights of ``arch`` from (Hugging Face Hub id or URL)."""
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001  (unknown tag: name the arch only)
        cfg = None
    if cfg is None:
        return "no pretrained weights are registered in timm"
    return f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else (cfg.url or cfg.file or "unknown source")


def create_timm_model(arch: str, num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that turns a failed weight download into a one-line ConfigError."""
    if not kwargs.get("pretrained", False):
        return timm.create_model(arch, num_classes=num_classes, in_chans=in_chans, **kwargs)
    try:
        return timm.create_model(arch, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (OSError, RuntimeError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        detail = " ".join(lines[:2]).rstrip(".")  # load_state_dict puts its key lists on the second line
        detail = detail if len(detail) <= 400 else detail[:400] + " ..."
        local = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
        if local:
            raise ConfigError(
                f"pretrained weights for model.arch={arch!r} from the local file {local} could not be loaded: "
                f"{type(e).__name__}: {detail}. Give the path of a {arch} checkpoint (.pth or .safetensors) that exists, "
                "or train from scratch with model.kwargs.pretrained=false"
            ) from e
        raise ConfigError(
            f"pretrained weights for model.arch={arch!r} ({pretrained_source(arch)}) could not be loaded: "
            f"{type(e).__name__}: {detail}. Downloading them needs network access to Hugging Face once; they are then "
            "cached under $HF_HOME/hub (default ~/.cache/huggingface/hub; copy that folder to an offline machine and set "
            "HF_HUB_OFFLINE=1). Offline, pass a local file with +model.kwargs.pretrained_cfg_overlay.file=<weights.pth|"
            ".safetensors> (the + adds the key), or train from scratch with model.kwargs.pretrained=false"
        ) from e
