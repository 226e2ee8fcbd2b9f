"""Top eigenvalues of the training-loss Hessian (the paper's Fig. 3 left: λ_max and λ_max/λ_5).

The paper (Sec. 4.2) measures the spectrum with Lanczos (Ghorbani et al. 2019) on WRN-40-10 without
BatchNorm and reports λ_max and λ_max/λ_5 for SGD and SAM. Here:

- H·v is exact: a double backward of the mean loss over a fixed set of training images, summed
  batch by batch (each batch weighted by its share of the images), in float32 with TF32 off;
- Lanczos with full reorthogonalisation (every new vector made orthogonal to all earlier ones,
  twice) gives the Ritz values; ``residuals[i]`` = β·|last component of the i-th eigenvector of T|
  bounds how far Ritz value i can be from an eigenvalue of H (it is one when it is small). The bound
  is that of the operator as applied: float32 products carry about 1e-6 relative error, so a bound
  below that says only that the value has settled;
- the model is in eval mode (BatchNorm with its running statistics, no dropout, shake layers at
  their expectation), so the loss is one fixed function of the weights;
- the loss is the training cross-entropy (with the run's label smoothing). The L2 term
  0.5·wd·‖w‖² adds exactly wd to every eigenvalue; it is not included.

Memory: the Lanczos basis holds ``iters`` float32 copies of the parameters (WRN-40-10, 30 steps:
6.7 GB on the device).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn


def _unflatten(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``params`` (the inverse of :func:`_flatten`, no copy)."""
    return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in params]), params)]


def _flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One flat vector (``reshape``: gradients may be non-contiguous views, where torch's
    ``parameters_to_vector`` fails)."""
    return torch.cat([t.reshape(-1) for t in tensors])


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions (its 10-bit mantissa would make H·v visibly
    asymmetric); restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


class LossHessian:
    """v ↦ H·v for L(w) = mean over ``batches`` of ``loss_fn(model(x), y)`` (images weighted equally).

    ``batches``: (images, labels) pairs already on the model's device; kept for every product.
    """

    def __init__(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        if not batches:
            raise ValueError("the Hessian needs at least one batch of images")
        self.model, self.batches, self.loss_fn = model, batches, loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.images = sum(len(y) for _, y in batches)
        self.dim = sum(p.numel() for p in self.params)

    def _weighted_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(x), y) * (len(y) / self.images)

    def loss_and_grad_norm(self) -> tuple[float, float]:
        """L(w) and ‖∇L(w)‖₂ over the same images (where the spectrum was taken)."""
        loss, grads = 0.0, [torch.zeros_like(p) for p in self.params]
        for x, y in self.batches:
            part = self._weighted_loss(x, y)
            torch._foreach_add_(grads, torch.autograd.grad(part, self.params, allow_unused=True, materialize_grads=True))
            loss += part.item()
        return loss, _flatten(grads).norm().item()

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """H·v for a flat vector ``v`` (length ``dim``, the parameters in ``model.parameters()`` order)."""
        vs = _unflatten(v, self.params)
        out = torch.zeros_like(v)
        for x, y in self.batches:
            grads = torch.autograd.grad(self._weighted_loss(x, y), self.params, create_graph=True, allow_unused=True)
            gv = sum((g * u).sum() for g, u in zip(grads, vs) if g is not None and g.requires_grad)
            if isinstance(gv, torch.Tensor):  # else the loss is linear in every parameter: H = 0
                hv = torch.autograd.grad(gv, self.params, allow_unused=True, materialize_grads=True)
                out += _flatten(hv)
        return out


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos with full reorthogonalisation from the start vector ``v0``.

    Returns (Ritz values in descending order, their residual bounds), both float64 on the CPU, one
    per step taken (one product each); stops early when the Krylov space is exhausted (β = 0: the
    Ritz values are then exact).
    """
    if iters < 1:
        raise ValueError(f"Lanczos needs at least one iteration, got {iters}")
    iters = min(iters, v0.numel())
    basis = torch.empty(iters, v0.numel(), dtype=v0.dtype, device=v0.device)
    q = v0 / v0.norm()
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    for j in range(iters):
        basis[j] = q
        w = matvec(q)
        alpha = torch.dot(w, q)
        for _ in range(2):  # classical Gram-Schmidt against the whole basis, twice
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(alpha.item())
        beta = w.norm().item()
        if j + 1 == iters or beta <= 1e-10 * max(abs(a) for a in alphas + [1e-30]):
            break
        betas.append(beta)
        q = w / beta
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(t)
    residuals = beta * vectors[-1].abs()
    order = torch.argsort(values, descending=True)
    return values[order], residuals[order]


#: A Ritz value counts as converged when its residual bound is at most this fraction of it.
CONVERGED = 1e-2


def top_eigenvalues(hessian: LossHessian, k: int = 5, iters: int = 30, seed: int = 0) -> dict:
    """The ``k`` largest Ritz values of ``hessian`` after ``iters`` Lanczos steps from a seeded
    Gaussian start, with their residual bounds, whether each has converged (bound at most 1 % of the
    value; raise ``iters`` when one has not) and λ_max/λ_k (None when λ_k <= 0)."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    p = hessian.params[0]
    gen = torch.Generator(device=p.device).manual_seed(seed)
    v0 = torch.randn(hessian.dim, generator=gen, device=p.device, dtype=p.dtype)
    values, residuals = lanczos(hessian, v0, max(iters, k))
    steps = len(values)
    values, residuals = values[:k].tolist(), residuals[:k].tolist()
    return {
        "eigenvalues": values,
        "residuals": residuals,
        "converged": [r <= CONVERGED * abs(v) for v, r in zip(values, residuals)],
        "lambda_max": values[0],
        # None when λ_k <= 0: a ratio with a zero or negative denominator says nothing about flatness
        f"lambda_max_over_lambda_{len(values)}": values[0] / values[-1] if values[-1] > 0 else None,
        "lanczos_iters": steps,
        "images": hessian.images,
        "num_params": hessian.dim,
    }
