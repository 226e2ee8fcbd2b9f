"""Noisy training labels for Table 4 (CIFAR-10 with 20-80 % label noise; CIFAR-100 offered too).

Modes:
- ``uniform`` (the paper's reference setting, Jiang et al. 2018 "MentorNet"): each label is, with
  probability ``rate``, replaced by a class drawn uniformly from ALL classes, so it may keep its
  true class; the realised rate is about rate*(K-1)/K.
- ``exclusive``: exactly round(rate*N) labels, chosen at random, move to a different class.
- ``asymmetric`` (CIFAR-10 only, Patrini et al. 2017): with probability ``rate`` a label flips
  truck->automobile, bird->airplane, deer->horse, cat<->dog; other classes stay.

The noise comes from its own seed (``label_noise.seed``), not the run seed, so SGD and SAM runs and
every ρ of a sweep see the same labels. It is drawn over the full training set, so holding out a
validation split (``dataset.val_size``) leaves the training images' labels as they were; the held-out
images keep their CLEAN labels, as the paper's "clean random 10% validation split" on which ρ was
chosen (Table 8, App. C.1). The realised rate and ``noisy_labels.pt`` cover the images trained on.

``noisy_labels.pt`` is a record (for inspection and the result's sha256): every run draws the labels
again from the config, so editing or deleting the file changes nothing; a resume whose training labels
differ from the checkpoint's (other dataset files or noise settings) is refused.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from sam_bench.errors import ConfigError, DataError
from sam_bench.tracking.results import atomic_write_bytes

MODES = ("uniform", "exclusive", "asymmetric")
NOISE_FILE = "noisy_labels.pt"
# CIFAR-10 classes: 0 airplane 1 automobile 2 bird 3 cat 4 deer 5 dog 6 frog 7 horse 8 ship 9 truck
CIFAR10_PAIRS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


@dataclass
class NoisyLabels:
    clean: torch.Tensor  # int64 (N,), the original labels
    noisy: torch.Tensor  # int64 (N,), what the model is trained on
    rate: float
    mode: str
    seed: int

    @property
    def corrupted(self) -> torch.Tensor:
        """Bool mask of labels that differ from the clean ones."""
        return self.noisy != self.clean

    @property
    def realised_rate(self) -> float:
        return self.corrupted.float().mean().item()

    def first(self, n: int) -> "NoisyLabels":
        """The noise of the first ``n`` images (the training part, when a validation split is held out)."""
        return NoisyLabels(self.clean[:n], self.noisy[:n], self.rate, self.mode, self.seed)

    def save(self, run_dir: Path) -> tuple[Path, str]:
        """Write ``noisy_labels.pt`` beside the run (atomically: every rank of a torchrun job writes
        the same bytes); returns (path, sha256 of the file)."""
        path = Path(run_dir) / NOISE_FILE
        buf = io.BytesIO()
        torch.save({"clean": self.clean, "noisy": self.noisy, "rate": self.rate, "mode": self.mode, "seed": self.seed}, buf)
        atomic_write_bytes(path, buf.getvalue())
        return path, hashlib.sha256(buf.getvalue()).hexdigest()

    @classmethod
    def load(cls, path: Path) -> "NoisyLabels":
        try:
            d = torch.load(path, weights_only=True)
            return cls(d["clean"], d["noisy"], float(d["rate"]), str(d["mode"]), int(d["seed"]))
        except Exception as e:
            raise DataError(f"{path}: unreadable noisy-label file ({type(e).__name__}: {e}); it is only a record: the next run "
                            "of this config writes it again") from e


def make_noisy_labels(labels: torch.Tensor, num_classes: int, rate: float, mode: str, seed: int) -> NoisyLabels:
    """Corrupt ``labels`` (int64, CPU) deterministically from ``seed``."""
    mode = str(getattr(mode, "value", mode))
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"dataset.label_noise.rate={rate} must be in [0, 1]")
    if mode not in MODES:
        raise ConfigError(f"dataset.label_noise.mode={mode!r} is unknown; use one of {', '.join(MODES)}")
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    clean = labels.clone().to(torch.int64)
    noisy = clean.clone()
    if mode == "uniform":
        flip = torch.rand(n, generator=g) < rate
        noisy[flip] = torch.randint(0, num_classes, (int(flip.sum()),), generator=g)
    elif mode == "exclusive":
        chosen = torch.randperm(n, generator=g)[: round(rate * n)]
        shift = torch.randint(1, num_classes, (len(chosen),), generator=g)  # never 0: a different class
        noisy[chosen] = (clean[chosen] + shift) % num_classes
    else:
        if num_classes != 10:
            raise ConfigError("dataset.label_noise.mode=asymmetric is defined for CIFAR-10 (pair flips); use uniform or exclusive")
        flip = torch.rand(n, generator=g) < rate
        target = clean.clone()
        for src, dst in CIFAR10_PAIRS.items():
            target[clean == src] = dst
        noisy = torch.where(flip, target, clean)
    return NoisyLabels(clean, noisy, rate, mode, seed)


def noise_summary(history: list[dict], fitted_noisy_pct: float, noise: NoisyLabels, sha256: str) -> dict:
    """result.json fields for a noisy-label run.

    Clean test error at the end and at the epoch with the best (lowest) error on the clean validation
    split (SAM's advantage can fade late under heavy noise, so the paper-style early-stopped figure
    needs a held-out split, never the test set), the realised noise rate, and the fraction (%) of
    corrupted training labels the final model predicts (memorisation). The best epoch is chosen over
    every epoch with a validation error; when the test set was not evaluated at it
    (``trainer.eval_every`` > 1), ``clean_test_error_at_best_val`` is null rather than another epoch's.
    """
    out = {
        "label_noise_rate": noise.rate,
        "label_noise_mode": noise.mode,
        "label_noise_seed": noise.seed,
        "realised_noise_rate": noise.realised_rate,
        "noisy_labels_sha256": sha256,
        "clean_test_error_final": history[-1]["test_error"],
        "fitted_noisy_labels_pct": fitted_noisy_pct,
    }
    scored = [r for r in history if r.get("val_error") is not None]
    if scored:
        best = min(scored, key=lambda r: (r["val_error"], r["epoch"]))
        out.update(best_val_epoch=best["epoch"], best_val_error=best["val_error"],
                   clean_test_error_at_best_val=best.get("test_error"))
    return out
