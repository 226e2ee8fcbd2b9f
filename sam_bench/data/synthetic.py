"""A learnable, seeded, CIFAR-shaped dataset for offline smoke runs and throughput benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_synthetic(
    train_size: int, test_size: int, num_classes: int, in_chans: int, image_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each class is a smooth random colour pattern; images are that pattern plus pixel noise.

    Returns uint8 (N, C, H, W) images and int64 labels for train and test. Same seed, same data.
    """
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(num_classes, in_chans, 4, 4, generator=g), size=image_size, mode="bilinear", align_corners=False)
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)

    def draw(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        noise = torch.randn(n, in_chans, image_size, image_size, generator=gen)
        x = 128 + 40 * templates[labels] + 50 * noise
        return x.round().clamp(0, 255).to(torch.uint8), labels

    train_x, train_y = draw(train_size, g)
    # the test set from its own stream: runs with another train_size are scored on the same test images
    test_x, test_y = draw(test_size, torch.Generator().manual_seed(seed + 0x7E57_0000))
    return train_x, train_y, test_x, test_y
