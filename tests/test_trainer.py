"""The trainer's evaluation figures against a reference written out in float64."""

import contextlib
import math

import numpy as np
import torch

from sam_bench.data import DeviceLoader
from sam_bench.engine.trainer import evaluate

NO_AMP = contextlib.nullcontext


class FixedLogits(torch.nn.Module):
    """Returns the logits of a table row chosen by the image: pixel (0, 0) holds the row number."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table[torch.round(x[:, 0, 0, 0]).long()]


def id_loader(labels, batch_size: int) -> DeviceLoader:
    """Image i has pixel value i; mean 0 and std 1/255 normalise it back to i."""
    images = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(len(labels), dtype=torch.uint8)
    return DeviceLoader(images, torch.as_tensor(labels), batch_size, [0.0], [1.0 / 255.0], train=False)


def test_evaluate_loss_error_and_top5_match_a_float64_reference():
    rng = np.random.default_rng(0)
    n, classes = 37, 12  # 37 = 4 batches of 8 and one of 5
    logits = rng.normal(size=(n, classes))
    labels = rng.integers(0, classes, size=n)
    got = evaluate(FixedLogits(torch.as_tensor(logits, dtype=torch.float32)), id_loader(labels, 8), NO_AMP)

    ce = [math.log(math.fsum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), labels.tolist())]
    wrong1 = sum(int(np.argmax(row) != y) for row, y in zip(logits, labels))
    wrong5 = sum(int(y not in np.argsort(-row)[:5]) for row, y in zip(logits, labels))
    assert math.isclose(got["test_loss"], math.fsum(ce) / n, rel_tol=1e-6)
    assert got["test_error"] == 100.0 * wrong1 / n
    assert got["test_top5_error"] == 100.0 * wrong5 / n
    assert 0 < wrong5 < wrong1  # neither figure is trivially 0 or equal to the other


def test_evaluate_has_no_top5_with_five_classes_or_fewer():
    got = evaluate(FixedLogits(torch.eye(5)[[0, 1, 2, 4]]), id_loader([0, 1, 2, 3], 4), NO_AMP)
    assert "test_top5_error" not in got and got["test_error"] == 25.0
