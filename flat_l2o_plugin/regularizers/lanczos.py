"""Symmetric Lanczos with full reorthogonalization, on flat vectors.

Shared by the top-eigenvalue regularizer (Ritz values converge much faster than power
iteration: the error after m steps decays like exp(−2m√gap) rather than (λ₂/λ₁)^{2m}),
by :func:`top_eigenpairs` (the diagnostics' top-k eigenvalues) and by stochastic
Lanczos quadrature in :mod:`flat_l2o_plugin.diagnostics`.

Every new vector is reorthogonalized against all previous ones. Without it, rounding
makes converged Ritz values reappear as spurious copies, which puts false mass at the
extreme eigenvalues, exactly where flatness is read off. The cost is the m×d basis in
memory and O(m²d) flops, negligible next to m HVPs at the sizes we work with.

Error bounds come from residuals, never from how much an estimate moved. After m steps
H Q = Q T + β q eₘᵀ (Q the basis, T the tridiagonal, q the next unit vector), so the Ritz
pair (θᵢ, Q sᵢ) of an eigenpair (θᵢ, sᵢ) of T has the residual ‖H Q sᵢ − θᵢ Q sᵢ‖ =
β·|sᵢ[m]|: known without a matvec. For symmetric H and any unit u, some eigenvalue of H
lies within ‖Hu − θu‖ of θ = uᵀHu; if the other eigenvalues are at least ``gap`` away,
the error is at most ‖Hu − θu‖²/gap (Parlett, "The Symmetric Eigenvalue Problem",
chapters 4 and 11). A small residual says θ is near *an* eigenvalue; it cannot say which.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Eigenpairs",
    "LanczosResult",
    "Matvec",
    "lanczos",
    "ritz_pairs",
    "ritz_residuals",
    "top_eigenpairs",
    "wanted_index",
]

Matvec = Callable[[Tensor], Tensor]
"""``matvec(v)`` returns H v for a flat vector ``v`` of length d."""


class LanczosResult(NamedTuple):
    """The output of :func:`lanczos`.

    Attributes:
        alphas: The diagonal of the tridiagonal T, (m,).
        betas: Its off-diagonal, (m−1,).
        basis: The orthonormal Lanczos vectors, (m, d).
        beta: β, the norm of the part of H qₘ outside the basis: the Ritz residuals are
            β·|sᵢ[m]| (see :func:`ritz_residuals`). Rounding-sized when the run stopped
            at an invariant subspace.
    """

    alphas: Tensor
    betas: Tensor
    basis: Tensor
    beta: Tensor


def ritz_pairs(alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and unit eigenvectors of the Lanczos tridiagonal T."""
    tridiagonal = torch.diag(alphas)
    if alphas.numel() > 1:
        tridiagonal = tridiagonal + torch.diag(betas, 1) + torch.diag(betas, -1)
    return torch.linalg.eigh(tridiagonal)


def ritz_residuals(vectors: Tensor, beta: Tensor | float) -> Tensor:
    """‖H uᵢ − θᵢ uᵢ‖ for every Ritz pair, from T's eigenvectors and β (no matvec).

    Args:
        vectors: The unit eigenvectors of T, one per column (from :func:`ritz_pairs`).
        beta: :attr:`LanczosResult.beta`.
    """
    return abs(float(beta)) * vectors[-1].abs()


def wanted_index(values: Tensor, which: Literal["largest", "magnitude"]) -> int:
    """The position in ascending ``values`` of the largest (algebraic or in magnitude)."""
    return -1 if which == "largest" else int(values.abs().argmax())


def lanczos(
    matvec: Matvec,
    start: Tensor,
    steps: int,
    *,
    tol: float = 0.0,
    which: Literal["largest", "magnitude"] = "largest",
) -> LanczosResult:
    """Run symmetric Lanczos from ``start``.

    Args:
        matvec: The symmetric operator, on flat vectors.
        start: The starting vector (any nonzero norm; it is normalized).
        steps: The most Lanczos steps (matvecs) to take; capped at the dimension.
        tol: If > 0, stop once the Ritz pair of the ``which`` Ritz value θ has the residual
            β·|s[m]| ≤ ``tol``·|θ|. Then some eigenvalue of H lies within ``tol``·|θ| of
            θ (within (``tol``·θ)²/gap with a gap to the rest of the spectrum), up to
            rounding of order ε‖H‖. It need not be the eigenvalue wanted: a start vector
            (nearly) orthogonal to its eigenvector leaves it out of the Krylov space.
            Checking costs no matvec: an eigendecomposition of the m×m T per step.
        which: The Ritz value the stopping rule watches: ``"largest"`` algebraic or the
            largest in ``"magnitude"``.

    Returns:
        The :class:`LanczosResult`, with m ≤ ``steps``. The run also stops early when
        the Krylov space becomes invariant; the quadrature it defines is then exact.

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
    scale = 0.0
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
            values, vectors = ritz_pairs(torch.stack(alphas), torch.stack(betas) if betas else alpha.new_zeros(0))
            i = wanted_index(values, which)
            if float(ritz_residuals(vectors, beta)[i]) <= tol * abs(float(values[i])):
                break
        betas.append(beta)
        basis[j + 1] = w / beta
    m = len(alphas)
    return LanczosResult(torch.stack(alphas), torch.stack(betas) if betas else start.new_zeros(0), basis[:m], beta)


class Eigenpairs(NamedTuple):
    """The output of :func:`top_eigenpairs`.

    Attributes:
        values: The Rayleigh quotients θᵢ = uᵢᵀHuᵢ, (k,), in decreasing magnitude.
        vectors: The orthonormal uᵢ, one per row, (k, d).
        residuals: ‖Huᵢ − θᵢuᵢ‖, (k,), measured on the returned vectors: H has an
            eigenvalue within residualsᵢ of θᵢ.
        matvecs: The products with H spent.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    matvecs: int


def top_eigenpairs(
    matvec: Matvec,
    dim: int,
    k: int,
    *,
    steps: int = 100,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Eigenpairs:
    """The ``k`` eigenpairs of largest magnitude, by Lanczos with locking.

    One Lanczos run per eigenpair, each from a random start and on H restricted to the
    complement of the pairs already found (every product is projected off them). A run
    stops when its Ritz pair of largest magnitude has a residual ≤ ``tol``·|θ| (see
    :func:`lanczos`), and the pair is locked. A single run would see only one copy of a
    repeated eigenvalue; the restricted runs find every copy, and Lanczos resolves a
    cluster of close eigenvalues that power iteration would blur. A final Rayleigh–Ritz
    step over the k locked vectors (from the k products with H kept, so at no extra
    cost) removes the coupling between close eigenvalues that separate runs leave.

    What ``tol`` guarantees: each run's Ritz value lies within ``tol``·|θ| of an
    eigenvalue of H. The returned ``residuals`` are measured on the final vectors (one
    product with H per pair, counted in ``matvecs``), and each value lies within its
    residual of an eigenvalue of H (within residual²/gap given a gap). The Rayleigh–Ritz
    step can mix the pairs of close eigenvalues, so each residual is bounded by
    ``tol``·‖θ‖₂ over all k values, not by ``tol``·|θᵢ|; for well-separated eigenvalues
    the mixing is negligible. A run that exhausts ``steps`` returns its best pair with a
    larger residual. Nothing says the values are the *top* k: an eigenvector (nearly)
    orthogonal to every start vector is missed, which random starts make improbable.

    Args:
        matvec: The symmetric operator on flat vectors of length ``dim``.
        dim: The dimension d; ``k`` ≤ d.
        k: How many eigenpairs.
        steps: The most Lanczos steps per eigenpair (capped at the dimension left).
        tol: The relative residual at which a run stops; 0 runs every step.
        generator: For the start vectors.
        dtype: The dtype of the vectors (that of the operator).
        device: The device of the vectors.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"k must be between 1 and the dimension {dim}, got {k!r}")
    locked = torch.empty(0, dim, dtype=dtype, device=device)
    products = torch.empty(0, dim, dtype=dtype, device=device)
    used = 0

    def restricted(v: Tensor) -> Tensor:
        w = matvec(v)
        return w - locked.T @ (locked @ w)

    for i in range(k):
        start = torch.randn(dim, generator=generator, dtype=dtype).to(device)
        for _ in range(2):
            start = start - locked.T @ (locked @ start)
        run = lanczos(restricted, start, min(steps, dim - i), tol=tol, which="magnitude")
        used += run.alphas.numel()
        values, vectors = ritz_pairs(run.alphas, run.betas)
        u = run.basis.T @ vectors[:, wanted_index(values, "magnitude")]
        for _ in range(2):
            u = u - locked.T @ (locked @ u)
        u = u / torch.linalg.vector_norm(u)
        locked = torch.cat([locked, u[None]])
        products = torch.cat([products, matvec(u).reshape(1, -1)])
        used += 1
    # Rayleigh–Ritz on span(locked): H U ≈ U T with T = Uᵀ H U; its eigenvectors rotate
    # the locked vectors, and the rotated products follow by linearity.
    projected = locked @ products.T
    values, rotation = torch.linalg.eigh(0.5 * (projected + projected.T))
    order = values.abs().argsort(descending=True)
    values, rotation = values[order], rotation[:, order]
    vectors, products = rotation.T @ locked, rotation.T @ products
    residuals = torch.linalg.vector_norm(products - values[:, None] * vectors, dim=1)
    return Eigenpairs(values, vectors, residuals, used)
