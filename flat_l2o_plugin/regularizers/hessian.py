"""The Hessian's top eigenvalue by power iteration, as a differentiable regularizer.

R(θ) = λ_max(∇²f_B(θ)), the flatness measure of Yang et al., "Learning to Generalize
Provably in Learning to Optimize" (AISTATS 2023), estimated as in the original release
by power iteration on Hessian-vector products (Pearlmutter 1994), but with two changes:

* The probe is detached during the iteration and only the final Rayleigh quotient
  vᵀH(θ)v is built with ``create_graph=True``. Its derivative is vᵀ(∂H/∂θ)v, which
  (v being a unit eigenvector) is exactly dλ/dθ for a simple eigenvalue. The meta-graph
  therefore holds one HVP per call, not ``iters`` of them.
* With ``warm_start`` the probe is carried across calls. Consecutive iterates of an
  unroll are close, so one or two HVPs per call track the top eigenvector that a cold
  start needs ~10-20 HVPs to find. The final (differentiable) HVP also advances the
  stored probe by one power step at no extra cost.

* ``products="finite_difference"`` forms the final quotient as a forward difference of
  two gradients (:mod:`.finite_difference`): its derivative needs second derivatives
  only, where vᵀH(θ)v built as an HVP needs a third-order backward, which torch computes
  wrongly for LayerNorm and refuses for BatchNorm. It is not the default: no one step
  length keeps its meta-gradient within cosine 0.99 of the exact one on both a ReLU conv
  net (which needs a short step, for the kinks it crosses) and a ViT (which needs a long
  one, for rounding); ``benchmarks/regularizer_cost.py`` part 4 prints the sweep. On
  BatchNorm models it is the only form that meta-trains, and on LayerNorm models it is
  right where the HVP form is not (with ``fd_step`` ≈ 1e-5 in float32 on a ViT).

``method="lanczos"`` replaces power iteration by Lanczos (the top Ritz pair of the
Krylov space). The top of a network Hessian's spectrum is often clustered (relative
gaps of a few percent), where power iteration converges slowly and Lanczos does not:
on the digits MLP, 10 Lanczos steps reach ~1e-4 relative error where 10 power steps
reach ~4e-2 (``benchmarks/regularizer_cost.py``). The value uᵀH(θ)u at the Ritz vector
u equals the Ritz value, so the same single differentiable HVP serves both methods.

Both stop on a residual, never on how much the estimate moved between steps: in a
clustered spectrum the estimate creeps by less than any tolerance long before it has
converged. For symmetric H and a unit v, some eigenvalue lies within ‖Hv − λv‖ of
λ = vᵀHv, so ``tol`` bounds the error it stops at (see :class:`HessianTopEigenvalue`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import LossFn, Params
from ._hvp import as_graph_params, dot, flat_hessian, gradient, hvp, norm, normalized, random_like, seeded_generator
from .finite_difference import check_products, gradient_difference, step_length
from .lanczos import lanczos, ritz_pairs, top_eigenpairs, wanted_index

__all__ = ["HessianEigenpairs", "HessianTopEigenvalue", "PowerIteration", "hessian_eigenpairs", "power_iteration"]


class PowerIteration(NamedTuple):
    """The output of :func:`power_iteration`.

    Attributes:
        value: The Rayleigh quotient λ = vᵀHv of the last vector v multiplied by H.
        vector: That unit vector v.
        residual: ‖Hv − λv‖: H has an eigenvalue within it of ``value``.
        ahead: Hv normalized: one power step past ``vector``, at no extra HVP.
        hvps: The HVPs spent.
        converged: Whether the residual reached ``tol``·|λ| within the budget.
    """

    value: float
    vector: list[Tensor]
    residual: float
    ahead: list[Tensor]
    hvps: int
    converged: bool


def power_iteration(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    probe: Sequence[Tensor],
    iters: int,
    tol: float = 0.0,
    shift: float = 0.0,
) -> PowerIteration:
    """Power iteration on H − shift·I, without a graph, stopped by the residual.

    Each HVP gives both the Rayleigh quotient λ = vᵀHv of the current unit v and its
    residual ‖Hv − λv‖ (the same for H and H − shift·I), before v moves on to Hv/‖Hv‖.
    The iteration stops at the first v with ‖Hv − λv‖ ≤ ``tol``·|λ|: for symmetric H some
    eigenvalue then lies within ``tol``·|λ| of λ, and within (``tol``·λ)²/gap if the rest
    of the spectrum is at least gap away. Which eigenvalue is not guaranteed: the
    dominant one of H − shift·I unless the probe is (nearly) orthogonal to its
    eigenvector. A change of λ between steps bounds nothing: in a clustered spectrum λ
    creeps while far from converged.

    Args:
        grads: The gradient, in the graph (see ``_hvp.gradient``).
        params: What ``grads`` was taken with respect to.
        probe: The starting vector (any nonzero norm).
        iters: The most HVPs; at least 1.
        tol: The relative residual at which to stop; 0 spends every HVP.
        shift: Iterate on H − shift·I; the value returned is of H.
    """
    if iters < 1:
        raise ValueError(f"power_iteration needs iters >= 1, got {iters!r}")
    v = normalized([p.detach() for p in probe])
    for used in range(1, iters + 1):
        hv = [h.detach() for h in hvp(grads, params, v, create_graph=False)]
        if shift:
            hv = [h - shift * x for h, x in zip(hv, v)]
        rayleigh = dot(v, hv)
        # One host sync for both numbers.
        value, residual = torch.stack([rayleigh, norm([h - rayleigh * x for h, x in zip(hv, v)])]).tolist()
        value += shift
        ahead = normalized(hv)
        converged = residual <= tol * abs(value)
        if converged or used == iters:
            break
        v = ahead
    return PowerIteration(value, v, residual, ahead, used, converged)


class HessianTopEigenvalue:
    """R(θ) = λ_max(∇²f(θ)): the top eigenvalue of the mini-batch Hessian.

    Args:
        iters: The most HVPs (power iterations or Lanczos steps) on a cold start (the
            first call, or every call when ``warm_start`` is off), before the final,
            differentiable one. The original release used 10 power iterations at
            every step; how many ``tol`` needs depends on the spectrum's gaps.
        warm_start: Carry the probe across calls (see the module docstring).
        warm_iters: Extra (non-differentiable) power iterations per warm call, before
            the final differentiable product, which also advances the probe by one power
            step. 0 (the default) means one product per call: with the host's gradient
            graph a call then costs one HVP (or, with ``products="finite_difference"``,
            one forward and one backward pass at θ + s·v); what that is per
            meta-iteration: ``benchmarks/regularizer_cost.py``. Each extra iteration adds
            an HVP and a power step: along an Adam trajectory on MLP-digits the median
            relative error is 7% with 0 and 3% with 1 (part 2 of the benchmark).
        tol: The error bound to iterate down to: stop once the residual ‖Hv − λv‖ of
            the unit vector v and its Rayleigh quotient λ = vᵀHv is at most
            ``tol``·|λ|. H then has an eigenvalue within ``tol``·|λ| of the returned
            value, and within (``tol``·λ)²/gap if its other eigenvalues are at least gap
            away. The value returned is then the Rayleigh quotient of that very v. What
            ``tol`` does not guarantee: that this eigenvalue is the top one (from a probe
            nearly orthogonal to the top eigenvector, power iteration converges to
            another), nor any accuracy when the budget (``iters``, or ``warm_iters`` on
            a warm call) runs out first; ``last_residual`` says what was reached. The
            check reuses each HVP, so it costs none. 0 spends the whole budget.
        which: ``"largest"``: the largest algebraic eigenvalue (if the dominant one is
            negative, a shifted iteration finds the largest). ``"magnitude"``: the
            spectral norm max|λ_i| (the returned value is |vᵀHv|).
        method: ``"power"`` (cheapest per call; the default for warm-started use in
            meta-training) or ``"lanczos"`` (far fewer HVPs for a given accuracy from a
            cold start; on warm calls it runs ``max(warm_iters, 2)`` Lanczos steps from
            the carried Ritz vector). Lanczos stops on its Ritz residual, the same bound
            as above, read off the tridiagonal without an HVP.
        products: How the final, differentiable quotient vᵀH(θ)v is formed. ``"hvp"``
            (the default): an HVP with ``create_graph=True``, exact to rounding, whose
            derivative is third-order (wrong in torch for LayerNorm, refused for
            BatchNorm). ``"finite_difference"``: vᵀ(∇f(θ + s·v) − ∇f(θ))/s, whose
            derivative needs second derivatives only (see the module docstring and
            :mod:`.finite_difference`); about the same cost with the host's gradient.
        fd_step: The relative step h of the finite difference, s = h·(1 + ‖θ‖) (default:
            :func:`~.finite_difference.default_relative_step` of the params' dtype,
            1.0e-6 in float32).
        seed: Seed of the probe generator (default: drawn from torch's global RNG).

    The call returns a 0-dim tensor differentiable in ``params`` (when none of them
    requires grad, a plain measurement without a graph). It takes the host's ``grads``
    (∇f at ``params`` with its graph) when there is one, instead of computing them.
    ``last_value`` holds the estimate, ``last_residual`` the residual ‖Hv − λv‖ of the
    vector it is the Rayleigh quotient of, from the final product (free; with ``"hvp"``
    exact, so |``last_value`` − λᵢ| ≤ ``last_residual`` for some eigenvalue λᵢ of H;
    with ``"finite_difference"`` both carry the difference's error), and ``last_hvps``
    the products spent by the latest call (the final one included).
    """

    def __init__(
        self,
        iters: int = 20,
        warm_start: bool = True,
        warm_iters: int = 0,
        tol: float = 1e-3,
        which: Literal["largest", "magnitude"] = "largest",
        method: Literal["power", "lanczos"] = "power",
        products: Literal["hvp", "finite_difference"] = "hvp",
        fd_step: float | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(iters, int) or iters < 1:
            raise ConfigError(f"hessian_top_eigenvalue: iters must be an integer >= 1, got {iters!r}")
        if not isinstance(warm_iters, int) or warm_iters < 0:
            raise ConfigError(f"hessian_top_eigenvalue: warm_iters must be an integer >= 0, got {warm_iters!r}")
        if not tol >= 0:
            raise ConfigError(f"hessian_top_eigenvalue: tol must be >= 0, got {tol!r}")
        if which not in ("largest", "magnitude"):
            raise ConfigError(f"hessian_top_eigenvalue: which must be 'largest' or 'magnitude', got {which!r}")
        if method not in ("power", "lanczos"):
            raise ConfigError(f"hessian_top_eigenvalue: method must be 'power' or 'lanczos', got {method!r}")
        check_products("hessian_top_eigenvalue", products, fd_step)
        self.iters, self.warm_start, self.warm_iters = iters, bool(warm_start), warm_iters
        self.tol, self.which, self.method = float(tol), which, method
        self.products, self.fd_step = products, None if fd_step is None else float(fd_step)
        self._generator = seeded_generator(seed)
        self._probe: list[Tensor] | None = None
        self.last_value: float | None = None
        self.last_residual: float | None = None
        self.last_hvps = 0

    def reset(self) -> None:
        """Forget the warm-start probe (the next call is a cold start)."""
        self._probe = None

    def __call__(self, params: Params, loss_fn: LossFn, *, grads: Sequence[Tensor] | None = None) -> Tensor:
        # Params that require no grad make this a measurement: the final product then needs
        # no graph, which halves its cost.
        differentiable = any(p.requires_grad for p in params)
        params = as_graph_params(params)
        grads = gradient(loss_fn, params)[1] if grads is None else list(grads)
        probe = self._probe if self.warm_start else None
        if probe is not None and [p.shape for p in probe] != [p.shape for p in params]:
            probe = None
        warm = probe is not None
        if probe is None:
            probe = random_like(params, self._generator)
        probe = [p.to(device=q.device, dtype=q.dtype) for p, q in zip(probe, params)]
        n = self.warm_iters if warm else self.iters
        if self.method == "lanczos":
            v, used = self._lanczos(grads, params, probe, max(n, 2) if warm else n)
        elif n == 0:
            v, used = normalized([p.detach() for p in probe]), 0
        else:
            v, used, estimate = self._power(grads, params, probe, n)
            if self.which == "largest" and estimate < 0:
                # The dominant eigenvalue is negative: on H - estimate·I every eigenvalue is
                # >= 0 and the dominant one is λ_max - estimate.
                v, more, _ = self._power(grads, params, random_like(params, self._generator), self.iters,
                                         shift=estimate)
                used += more
        if self.products == "hvp":
            hv = hvp(grads, params, v, create_graph=differentiable)
            value = dot(v, hv)
        else:
            difference = gradient_difference(params, loss_fn, grads, v, step_length(params, self.fd_step),
                                             create_graph=differentiable)
            value, hv, v = difference.value, difference.product, difference.direction
        detached = value.detach()
        residual = norm([h.detach() - detached * x for h, x in zip(hv, v)])
        if self.which == "magnitude":
            value = value.abs()
        if self.warm_start:
            # Power iteration advances the probe by the free HVP; a Ritz vector is kept as is.
            self._probe = v if self.method == "lanczos" else normalized([h.detach() for h in hv])
        self.last_value, self.last_residual = torch.stack([value.detach(), residual]).tolist()
        self.last_hvps = used + 1
        return value

    def _power(self, grads: list[Tensor], params: list[Tensor], probe: Sequence[Tensor], iters: int,
               shift: float = 0.0) -> tuple[list[Tensor], int, float]:
        """The vector for the final HVP, the HVPs spent, and the estimate on the way."""
        run = power_iteration(grads, params, probe, iters, self.tol, shift=shift)
        # Converged: the final HVP is at the vector that met the bound, so the value keeps
        # it. Out of budget: one power step further is the better vector, for free.
        return (run.vector if run.converged else run.ahead), run.hvps, run.value

    def _lanczos(self, grads: list[Tensor], params: list[Tensor], probe: Sequence[Tensor],
                 steps: int) -> tuple[list[Tensor], int]:
        """The Ritz vector of the wanted eigenvalue, and the HVPs spent."""
        matvec, split = flat_hessian(grads, params)
        start = torch.cat([p.detach().reshape(-1) for p in probe])
        run = lanczos(matvec, start, steps, tol=self.tol, which=self.which)
        values, vectors = ritz_pairs(run.alphas, run.betas)
        return split(run.basis.T @ vectors[:, wanted_index(values, self.which)]), run.alphas.numel()


class HessianEigenpairs(NamedTuple):
    """The output of :func:`hessian_eigenpairs`.

    Attributes:
        values: The eigenvalue estimates, in decreasing magnitude.
        vectors: The unit eigenvectors, each a list of tensors shaped like the params.
        residuals: ‖Hu − λu‖ for each, measured: H has an eigenvalue within it of the value.
    """

    values: list[float]
    vectors: list[list[Tensor]]
    residuals: list[float]


def hessian_eigenpairs(
    params: Params,
    loss_fn: LossFn,
    k: int = 1,
    iters: int = 100,
    tol: float = 1e-6,
    seed: int | None = 0,
) -> HessianEigenpairs:
    """The ``k`` eigenpairs of largest magnitude, by Lanczos with locking.

    A diagnostic, not a regularizer: nothing is differentiable. See
    :func:`~flat_l2o_plugin.regularizers.lanczos.top_eigenpairs` for the method.

    Args:
        params: The point θ.
        loss_fn: The loss whose Hessian at θ is wanted.
        k: How many eigenpairs.
        iters: The most Lanczos steps (HVPs) per eigenpair.
        tol: Each eigenpair's run stops once its residual ‖Hu − λu‖ ≤ ``tol``·|λ|, which
            puts an eigenvalue of H within ``tol``·|λ| of λ. ``residuals`` holds the
            bound reached, measured on the returned vectors. It says λ is near *an*
            eigenvalue, not that the k values are the top k (see ``top_eigenpairs``).
        seed: Seed of the start vectors (``None``: drawn from torch's global RNG).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
    params = [p.detach().requires_grad_(True) for p in params]
    dim = sum(p.numel() for p in params)
    if k > dim:
        raise ConfigError(f"k={k} exceeds the {dim} parameters")
    _, grads = gradient(loss_fn, params)
    matvec, split = flat_hessian(grads, params)
    pairs = top_eigenpairs(matvec, dim, k, steps=iters, tol=tol, generator=seeded_generator(seed),
                           dtype=params[0].dtype, device=params[0].device)
    return HessianEigenpairs(pairs.values.tolist(), [[x.detach() for x in split(u)] for u in pairs.vectors],
                             pairs.residuals.tolist())
