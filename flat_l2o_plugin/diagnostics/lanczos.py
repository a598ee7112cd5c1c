"""Stochastic Lanczos quadrature: the Hessian's eigenvalue density from HVPs alone.

The spectral density of a symmetric d×d matrix H is ρ(t) = (1/d) Σᵢ δ(t − λᵢ). For a
unit probe v, the measure μ_v = Σᵢ (uᵢᵀv)² δ(t − λᵢ) has mean ρ over random probes with
E[v vᵀ] = I/d. Lanczos started at v builds a tridiagonal T whose eigenvalues θₖ (the
nodes) and squared first eigenvector components wₖ (the weights) are the m-point Gauss
quadrature of μ_v: Σₖ wₖ θₖʲ = vᵀHʲv exactly for j ≤ 2m − 1 (Golub and Meurant,
"Matrices, Moments and Quadrature", 1994). Averaging the quadratures of several probes
and replacing each node by a narrow Gaussian gives a smooth estimate of ρ (Lin, Saad
and Yang, "Approximating spectral densities of large matrices", SIAM Review 2016;
Ghorbani, Krishnan and Xiao, ICML 2019, for neural-network Hessians).

Lanczos (:mod:`flat_l2o_plugin.regularizers.lanczos`) reorthogonalizes fully, so that
converged Ritz values do not reappear as spurious copies at the extreme eigenvalues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..protocols import LossFn, Params
from ..regularizers._hvp import flat_hessian, gradient, random_like
from ..regularizers.lanczos import Matvec, lanczos, ritz_pairs, ritz_residuals

__all__ = [
    "Matvec",
    "SpectralDensity",
    "SpectralQuadrature",
    "gauss_quadrature",
    "gaussian_density",
    "hessian_matvec",
    "hessian_slq",
    "lanczos_tridiagonal",
    "stochastic_lanczos_quadrature",
]


def lanczos_tridiagonal(matvec: Matvec, start: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """The tridiagonal of :func:`flat_l2o_plugin.regularizers.lanczos.lanczos` (no basis).

    Returns:
        ``(alphas, betas)``: the diagonal (m,) and off-diagonal (m−1,), m ≤ ``steps``.
    """
    run = lanczos(matvec, start, steps)
    return run.alphas, run.betas


def gauss_quadrature(alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the Gauss quadrature defined by a Lanczos tridiagonal.

    Returns:
        ``(nodes, weights)``, both (m,): the eigenvalues of T in ascending order and the
        squared first components of its unit eigenvectors, which sum to 1.
    """
    nodes, vectors = ritz_pairs(alphas, betas)
    return nodes, vectors[0] ** 2


@dataclass(frozen=True)
class SpectralDensity:
    """A spectral density sampled on a regular grid.

    Attributes:
        grid: The abscissae (G,), ascending.
        density: ρ(t) at each grid point (G,); it integrates to about 1.
        sigma: The standard deviation of the Gaussian that broadens each node.
    """

    grid: Tensor
    density: Tensor
    sigma: float

    def integral(self) -> float:
        """∫ρ(t) dt by the trapezoidal rule (about 1 when the grid covers the tails)."""
        return float(torch.trapezoid(self.density, self.grid))

    def moment(self, order: int) -> float:
        """∫tʲρ(t) dt by the trapezoidal rule; broadening adds σ² to the second moment."""
        return float(torch.trapezoid(self.grid**order * self.density, self.grid))


@dataclass(frozen=True)
class SpectralQuadrature:
    """The Gauss quadratures of several random probes: an estimate of ρ.

    Attributes:
        nodes: One (mₚ,) tensor of nodes per probe, ascending.
        weights: The matching weights; each probe's weights sum to 1.
        dim: The dimension d of the operator.
        steps: The Lanczos steps requested per probe (a probe may stop earlier).
        residuals: Per probe, the Ritz residual of each node (see
            :func:`~flat_l2o_plugin.regularizers.lanczos.ritz_residuals`): H has an
            eigenvalue within it of the node. Small only for converged nodes, which are
            the extreme ones first.
    """

    nodes: tuple[Tensor, ...]
    weights: tuple[Tensor, ...]
    dim: int
    steps: int
    residuals: tuple[Tensor, ...] = ()

    def moment(self, order: int) -> float:
        """The estimate of (1/d) tr Hʲ, exact per probe for ``order`` ≤ 2m − 1.

        With Rademacher probes and a diagonal H, every probe gives tr Hʲ/d exactly.
        """
        per_probe = [float((w * x.to(w.dtype) ** order).sum()) for x, w in zip(self.nodes, self.weights)]
        return sum(per_probe) / len(per_probe)

    def trace(self) -> float:
        """d times the first moment: a Hutchinson estimate of tr H from the same probes."""
        return self.dim * self.moment(1)

    def extremes(self) -> tuple[float, float]:
        """The smallest and largest node over all probes (Ritz values of λ_min, λ_max)."""
        every = torch.cat(self.nodes)
        return float(every.min()), float(every.max())

    def density(self, sigma: float | None = None, points: int = 1024, tails: float = 6.0) -> SpectralDensity:
        """See :func:`gaussian_density`."""
        return gaussian_density(self, sigma=sigma, points=points, tails=tails)


def gaussian_density(
    quadrature: SpectralQuadrature, *, sigma: float | None = None, points: int = 1024, tails: float = 6.0
) -> SpectralDensity:
    """The quadratures' node masses, each broadened into a Gaussian, on a regular grid.

    Args:
        quadrature: The output of :func:`stochastic_lanczos_quadrature`.
        sigma: The broadening. ``None`` means (spread of the nodes) / steps: m Gauss nodes
            resolve the spectrum to about that, so a narrower kernel shows the individual
            nodes as spikes and a wider one blurs the outliers into the bulk.
        points: Grid points; the grid should put several points within each σ.
        tails: The grid extends this many σ beyond the extreme nodes, so that the
            density integrates to 1 (the mass left outside 6σ is ~2e-9).

    Returns:
        The density, in float64 on the CPU.
    """
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points!r}")
    nodes = torch.cat([x.detach().to("cpu", torch.float64) for x in quadrature.nodes])
    mass = torch.cat([w.detach().to("cpu", torch.float64) for w in quadrature.weights]) / len(quadrature.nodes)
    low, high = float(nodes.min()), float(nodes.max())
    if sigma is None:
        spread = high - low
        # A single node (e.g. H = cI) has no spread; fall back on the node's magnitude.
        reference = spread if spread > 0 else max(abs(low), abs(high), 1.0)
        sigma = reference / max(quadrature.steps, 1)
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite positive number, got {sigma!r}")
    grid = torch.linspace(low - tails * sigma, high + tails * sigma, points, dtype=torch.float64)
    offsets = (grid[:, None] - nodes[None, :]) / sigma
    kernel = torch.exp(-0.5 * offsets**2) / (sigma * math.sqrt(2.0 * math.pi))
    return SpectralDensity(grid=grid, density=kernel @ mass, sigma=float(sigma))


def stochastic_lanczos_quadrature(
    matvec: Matvec,
    dim: int,
    *,
    probes: int = 8,
    steps: int = 80,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> SpectralQuadrature:
    """Gauss quadratures of the operator's spectral measure for Rademacher probes.

    Args:
        matvec: The symmetric operator on flat vectors of length ``dim``.
        dim: The dimension d.
        probes: Independent probes; the density's Monte-Carlo error shrinks as
            1/√(probes · d) for a spectrum without outliers.
        steps: Lanczos steps per probe (capped at d). The extreme eigenvalues converge
            first; with ``steps`` ≥ d every node is an eigenvalue to working precision.
        seed: Seed of the probes' own generator; the global RNG is not touched.
        dtype: The dtype of the probes (that of the operator).
        device: The device of the probes.

    Returns:
        The per-probe nodes and weights.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    generator = torch.Generator().manual_seed(int(seed))
    template = [torch.empty(dim, dtype=dtype, device=device)]
    nodes, weights, residuals = [], [], []
    for _ in range(probes):
        # Rademacher probes have norm √d exactly, so the first moment of every probe is
        # a Hutchinson sample of tr H / d, the lowest-variance one.
        start = random_like(template, generator, "rademacher")[0]
        run = lanczos(matvec, start, steps)
        x, vectors = ritz_pairs(run.alphas, run.betas)
        nodes.append(x)
        weights.append(vectors[0] ** 2)
        residuals.append(ritz_residuals(vectors, run.beta))
    return SpectralQuadrature(nodes=tuple(nodes), weights=tuple(weights), dim=dim, steps=min(steps, dim),
                              residuals=tuple(residuals))


def hessian_matvec(loss_fn: LossFn, params: Params) -> tuple[Matvec, int]:
    """The loss Hessian at ``params`` as an operator on flat vectors.

    The gradient graph is built once and every product reuses it (Pearlmutter's trick),
    so one product costs one backward pass through it.

    Returns:
        ``(matvec, d)``, with d the total number of parameters.
    """
    leaves = [p.detach().requires_grad_(True) for p in params]
    _, grads = gradient(loss_fn, leaves)
    matvec, _ = flat_hessian(grads, leaves)
    return matvec, sum(p.numel() for p in leaves)


def hessian_slq(
    loss_fn: LossFn, params: Sequence[Tensor], *, probes: int = 8, steps: int = 80, seed: int = 0
) -> SpectralQuadrature:
    """:func:`stochastic_lanczos_quadrature` on the Hessian of ``loss_fn`` at ``params``."""
    matvec, dim = hessian_matvec(loss_fn, params)
    return stochastic_lanczos_quadrature(
        matvec, dim, probes=probes, steps=steps, seed=seed, dtype=params[0].dtype, device=params[0].device)

