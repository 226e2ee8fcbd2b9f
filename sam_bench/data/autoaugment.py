"""AutoAugment applied batched on the device, with per-image randomness.

Policy set: torchvision's ``AutoAugmentPolicy.CIFAR10`` (and SVHN / IMAGENET): the 25 sub-policies
printed in the AutoAugment paper (Cubuk et al. 2019, App. A), with torchvision's magnitude ranges
and fill 0. The official SAM code (google-research/sam ``autoaugment/autoaugment.py``, a fork of
the TPU EfficientNet one; read for this docstring) differs: ``distort_image_with_autoaugment``
picks one of ``policies.policy_cifar()`` (all 95 sub-policies of the AutoAugment authors' set,
as the issue notes; the list itself was not re-read here) with
``HParams(cutout_const=100, translate_const=250)``, fill 128 for geometric ops, and its own
level->argument maps (enhance factors 0.1-1.9, translation up to 250 px, which moves a 32-px
CIFAR image fully out of frame). We use torchvision's set because it is the policy the paper cites
and describes, its ops are maintained and tested upstream, and its magnitudes are scaled to the
image size; reproducing the official set would need hand-written ops with those TPU-specific
constants. Expect the AutoAugment rows of Table 1 to differ slightly for that reason.

torchvision's v2 ``AutoAugment`` applied to a batched tensor draws ONE sub-policy, coin and sign
for the whole batch. Here each image draws its own sub-policy index, two coins and two signs from
a CPU generator (a few numbers per image, so no device->host sync), images are grouped by the op
they get in each of the two slots (op name, magnitude bin, sign), and each group is transformed
with the torchvision op functions as one batch on the device. Per image this samples exactly what
``AutoAugment.forward`` samples for a single image. The cost is about 50 op calls per batch
whatever its size, so :class:`DeviceLoader` augments each epoch's whole training set in chunks of
``AUTOAUGMENT_CHUNK`` images at once (measured on an H200: 14k img/s at batch 256, launch bound;
see scripts/bench_data.py for the per-epoch figure).
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import AutoAugment, AutoAugmentPolicy, InterpolationMode

POLICIES = {"cifar10": AutoAugmentPolicy.CIFAR10, "svhn": AutoAugmentPolicy.SVHN, "imagenet": AutoAugmentPolicy.IMAGENET}


class BatchAutoAugment:
    """Per-image AutoAugment for uint8 (N, C, H, W) batches on any device."""

    def __init__(self, policy: str = "cifar10"):
        policy = str(getattr(policy, "value", policy))
        self.aa = AutoAugment(POLICIES[policy], interpolation=InterpolationMode.NEAREST, fill=None)
        self.policies = self.aa._get_policies(POLICIES[policy])

    def _magnitude(self, name: str, bin_: int | None, negative: bool, h: int, w: int) -> float:
        fn, signed = self.aa._AUGMENTATION_SPACE[name]
        mags = fn(10, h, w)
        if mags is None:
            return 0.0
        m = float(mags[bin_])
        return -m if signed and negative else m

    def _tables(self, h: int, w: int) -> list[dict]:
        """Per slot: each policy's op id, probability and signedness, and the op of each id."""
        slots = []
        for j in range(2):
            ops = sorted({(name, b) for pol in self.policies for name, _, b in [pol[j]]}, key=str)
            op_id = {op: k for k, op in enumerate(ops)}
            slots.append({
                "op": torch.tensor([op_id[(pol[j][0], pol[j][2])] for pol in self.policies]),
                "p": torch.tensor([pol[j][1] for pol in self.policies]),
                "signed": torch.tensor([self.aa._AUGMENTATION_SPACE[pol[j][0]][1] for pol in self.policies]),
                "ops": ops,
            })
        return slots

    def plan(self, n: int, h: int, w: int, generator: torch.Generator) -> list[list[tuple[str, float, torch.Tensor]]]:
        """Per slot, the groups ``(op, magnitude, image indices)``; drawn on the CPU (no sync).

        Vectorised: each image's group key is op id * 2 + negative sign, grouped with a sort.
        """
        which = torch.randint(len(self.policies), (n,), generator=generator)
        coins = torch.rand((n, 2), generator=generator)
        negative = torch.rand((n, 2), generator=generator) <= 0.5
        slots = []
        for j, t in enumerate(self._tables(h, w)):
            applied = coins[:, j] <= t["p"][which]
            key = t["op"][which] * 2 + (negative[:, j] & t["signed"][which]).long()
            idx = applied.nonzero().flatten()
            key = key[idx]
            order = torch.argsort(key, stable=True)
            idx, key = idx[order], key[order]
            uniq, counts = torch.unique_consecutive(key, return_counts=True)
            groups = []
            for k, chunk in zip(uniq.tolist(), torch.split(idx, counts.tolist())):
                name, bin_ = t["ops"][k // 2]
                groups.append((name, self._magnitude(name, bin_, bool(k % 2), h, w), chunk))
            slots.append(groups)
        return slots

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a uint8 batch; ``generator`` is a CPU generator (same seed, same batch)."""
        n, _, h, w = images.shape
        out = images.clone()
        for groups in self.plan(n, h, w, generator):
            for name, magnitude, idx in groups:
                idx = idx.to(images.device, non_blocking=True)
                sub = self.aa._apply_image_or_video_transform(out[idx], name, magnitude, interpolation=self.aa.interpolation, fill=self.aa._fill)
                out.index_copy_(0, idx, sub)
        return out
