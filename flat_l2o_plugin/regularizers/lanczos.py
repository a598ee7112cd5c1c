"""Symmetric Lanczos with full reorthogonalization, on flat vectors.

Shared by the top-eigenvalue regularizer (Ritz values converge much faster than power
iteration: the error after m steps decays like exp(−2m√gap) rather than (λ₂/λ₁)^{2m})
and by stochastic Lanczos quadrature in :mod:`flat_l2o_plugin.diagnostics`.

Every new vector is reorthogonalized against all previous ones. Without it, rounding
makes converged Ritz values reappear as spurious copies, which puts false mass at the
extreme eigenvalues, exactly where flatness is read off. The cost is the m×d basis in
memory and O(m²d) flops, negligible next to m HVPs at the sizes we work with.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["Matvec", "lanczos", "ritz_pairs"]

Matvec = Callable[[Tensor], Tensor]
"""``matvec(v)`` returns H v for a flat vector ``v`` of length d."""


def ritz_pairs(alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and unit eigenvectors of the Lanczos tridiagonal T."""
    tridiagonal = torch.diag(alphas)
    if alphas.numel() > 1:
        tridiagonal = tridiagonal + torch.diag(betas, 1) + torch.diag(betas, -1)
    return torch.linalg.eigh(tridiagonal)


def lanczos(matvec: Matvec, start: Tensor, steps: int, *, tol: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Run symmetric Lanczos from ``start``.

    Args:
        matvec: The symmetric operator, on flat vectors.
        start: The starting vector (any nonzero norm; it is normalized).
        steps: The most Lanczos steps (matvecs) to take; capped at the dimension.
        tol: If > 0, stop once the largest Ritz value changes by at most ``tol``
            relative between two steps.

    Returns:
        ``(alphas, betas, basis)``: the diagonal (m,) and off-diagonal (m−1,) of the
        tridiagonal matrix and the (m, d) orthonormal basis, m ≤ ``steps``. The run also
        stops early when the Krylov space becomes invariant; the quadrature it defines
        is then exact.

    Raises:
        ValueError: ``start`` is zero or not finite, or ``matvec`` returned a non-finite
            vector.
    """
    dim = start.numel()
    steps = min(int(steps), dim)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    start = start.reshape(-1)
    start_norm = torch.linalg.vector_norm(start)
    if not bool(torch.isfinite(start_norm)) or float(start_norm) == 0.0:
        raise ValueError("the Lanczos start vector must be finite and nonzero")
    basis = torch.empty(steps, dim, dtype=start.dtype, device=start.device)
    basis[0] = start / start_norm
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    # A relative breakdown test: with full reorthogonalization, once the Krylov space is
    # invariant the residual is rounding noise of size ~eps·‖H‖, never exactly zero.
    breakdown = math.sqrt(torch.finfo(start.dtype).eps)
    scale, top = 0.0, math.nan
    for j in range(steps):
        w = matvec(basis[j]).reshape(-1)
        alpha = torch.dot(basis[j], w)
        if not bool(torch.isfinite(alpha)):
            raise ValueError(f"the operator returned a non-finite vector at Lanczos step {j}")
        w = w - alpha * basis[j]
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        # Classical Gram-Schmidt applied twice keeps the basis orthogonal to working
        # precision ("twice is enough", Giraud et al. 2005), with two matrix products.
        done = basis[: j + 1]
        for _ in range(2):
            w = w - done.T @ (done @ w)
        alphas.append(alpha)
        beta = torch.linalg.vector_norm(w)
        scale = max(scale, abs(float(alpha)), float(beta))
        if j == steps - 1 or float(beta) <= breakdown * scale:
            break
        if tol > 0:
            new_top = float(ritz_pairs(torch.stack(alphas), torch.stack(betas) if betas else alpha.new_zeros(0))[0][-1])
            if abs(new_top - top) <= tol * max(abs(new_top), 1e-12):
                break
            top = new_top
        betas.append(beta)
        basis[j + 1] = w / beta
    m = len(alphas)
    return torch.stack(alphas), (torch.stack(betas) if betas else start.new_zeros(0)), basis[:m]
