"""Negative local entropy, the flatness measure behind Entropy-SGD.

The local entropy of the loss at ``theta`` is the log-mass of low loss in a Gaussian
neighbourhood of ``theta``. A minimum in a wide valley has more of it than a sharp one
of the same depth, so ``-F`` is a flatness regularizer that also keeps the loss term
(Chaudhari et al., ICLR 2017; Yang et al., AISTATS 2023, for learned optimizers).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import LossFn, Params
from ._batched import batched, batched_losses, scalar
from ._hvp import as_graph_params, random_like, seeded_generator

__all__ = ["LocalEntropy"]

_ESTIMATORS = ("smoothing", "langevin")


class LocalEntropy:
    r"""Monte-Carlo estimate of the negative local entropy :math:`-F(\theta; \gamma)`.

    With :math:`d` parameters, scope :math:`\gamma` and temperature :math:`T`,

    .. math::

        F(\theta; \gamma) = T \log \int_{\mathbb{R}^d}
            \exp\Big(-\frac{f(\theta') + \frac{\gamma}{2}\lVert \theta - \theta' \rVert^2}{T}\Big)
            \, d\theta',

    all constants included, so that at :math:`T = 1` the value compares directly to
    closed forms: for :math:`f(\theta') = \tfrac12 \theta'^\top A \theta'`,
    :math:`F = \tfrac d2 \log 2\pi - \tfrac12 \log\det(A + \gamma I)
    + \tfrac{\gamma^2}{2} \theta^\top (A + \gamma I)^{-1} \theta
    - \tfrac{\gamma}{2} \lVert\theta\rVert^2`. Its gradient is
    :math:`\nabla_\theta F = \gamma(\mu - \theta)`, where :math:`\mu` is the mean of the
    Gibbs measure :math:`\rho(\theta') \propto \exp(-(f(\theta') +
    \frac{\gamma}{2}\lVert\theta - \theta'\rVert^2)/T)`. Near a minimum with Hessian
    eigenvalues :math:`\lambda_i` (Laplace's approximation, exact for quadratics at
    :math:`T = 1`), :math:`-F \approx f(\theta) + \tfrac12 \sum_i \log(\lambda_i + \gamma)
    - \tfrac d2 \log 2\pi`: the regularizer penalizes curvature in every direction.

    Two estimators:

    ``"smoothing"``
        Substituting :math:`\theta' = \theta + \varepsilon`,

        .. math::

            F = \frac{dT}{2} \log\frac{2\pi T}{\gamma}
                + T \log \mathbb{E}_{\varepsilon \sim \mathcal N(0, (T/\gamma) I)}
                  e^{-f(\theta + \varepsilon)/T},

        estimated with ``samples`` reparameterized draws as
        :math:`T(\operatorname{logsumexp}_s(-f_s/T) - \log S)`. It is differentiable
        through :math:`\theta + \varepsilon` and its gradient is the self-normalized
        average of :math:`-\nabla f(\theta + \varepsilon_s)`. Jensen's inequality biases
        :math:`-F` upwards by about :math:`T \operatorname{Var}(w)/(2S)` for the weights
        :math:`w_s = e^{-f_s/T}` scaled to mean one; it is accurate when ``f`` varies by
        less than ``T`` over the draws (large ``gamma``) and degrades when it varies a lot
        (small ``gamma`` or small ``T``). Cost: ``samples`` forward passes and one
        backward pass through them.

        With ``antithetic`` (the default) the draws come in mirrored pairs ε, −ε. Each
        draw is still N(0, (T/γ)I), so every term keeps its expectation, but within a
        pair the first-order change of the loss, ∇f·ε, cancels: that term dominates the
        spread of the estimate and of its gradient wherever the gradient is not small.
        Eight antithetic draws then give the gradient about the spread of sixteen
        independent ones, at half the forward passes (``benchmarks/regularizer_cost.py``
        measures both on the MLP and the conv net). The host's own loss and gradient
        add nothing here: the first-order cancellation is what a control variate built
        from the gradient would give, without a gradient graph.

    ``"langevin"``
        As in Entropy-SGD: ``samples`` parallel chains of stochastic gradient Langevin
        dynamics

        .. math::

            \theta'_{k+1} = \theta'_k - \eta\big(\nabla f(\theta'_k)
                + \gamma(\theta'_k - \theta)\big) + \sqrt{2\eta T}\,\xi_k,
            \qquad \theta'_0 = \theta,

        run for ``steps`` steps of size :math:`\eta` = ``step_size`` with ``theta``
        detached. :math:`\mu` is the mean over chains and over the steps left after
        discarding the first ``burn_in`` fraction. The returned tensor's gradient is
        exactly :math:`\gamma(\theta - \mu)`, the gradient of the surrogate
        :math:`\frac{\gamma}{2}\lVert\theta - \operatorname{stopgrad}(\mu)\rVert^2`;
        its value is the detached smoothing estimate of :math:`-F` from ``samples``
        fresh draws, so logs from the two estimators agree. At ``temperature=1`` the
        chains sample the Gibbs measure that defines :math:`F`; Entropy-SGD's small
        thermal noise is a small ``temperature`` (then :math:`\mu` approaches the
        proximal point and the logged value degrades, see above; the gradient does
        not). On a quadratic, the chains' stationary mean is exact for any stable
        step size, so the only errors are the burn-in transient and Monte-Carlo
        noise, whose standard deviation per coordinate is about
        :math:`\sqrt{\gamma T / N_\text{eff}}`: at large ``gamma`` and ``T = 1`` this
        estimator needs many more chains than ``"smoothing"``. Elsewhere the
        unadjusted chains add a bias of order ``step_size`` to :math:`\mu` (a few
        percent of the gradient at the defaults on a smooth convex test problem).
        Cost: ``steps``
        batched forward and backward passes over the chains, plus ``samples`` forward
        passes without a graph for the value.

    Loss evaluations over samples or chains are batched with ``torch.func.vmap`` when
    ``loss_fn`` allows it (pure tensor code, without Python control flow on tensor values
    and without random ops); otherwise they fall back to a Python loop, and the instance
    sets ``vectorize`` to ``False`` so that it does not try again.

    References: Chaudhari et al., "Entropy-SGD: Biasing Gradient Descent Into Wide
    Valleys", ICLR 2017; Yang, Chen, Wang, Ye and Wang, "Learning to Generalize Provably
    in Learning to Optimize", AISTATS 2023.

    Args:
        gamma: scope :math:`\gamma > 0`. Draws lie about :math:`\sqrt{T/\gamma}` from
            ``theta`` per coordinate; the default 100 gives 0.1, the scale of the weights
            of the small networks trained as optimizees, where
            :math:`-F \approx f + \operatorname{tr} H / (2\gamma) + \text{const}`.
            ``gamma = 1`` would move every weight by about 1 and measure the loss of a
            different network.
        samples: Monte-Carlo draws (``"smoothing"``, and the value of ``"langevin"``),
            and number of parallel chains (``"langevin"``). Eight antithetic draws (or
            sixteen independent ones) suffice when ``f`` varies by much less than ``T``
            over the draws, the default-``gamma`` regime.
        antithetic: Draw the smoothing noise in mirrored pairs ε, −ε (an odd ``samples``
            leaves the last draw unpaired); the Langevin chains' noise is unaffected.
        estimator: ``"smoothing"`` or ``"langevin"``.
        steps: Langevin steps per call.
        step_size: Langevin step size :math:`\eta`; ``None`` means ``0.2 / gamma``. The
            chains relax towards :math:`\mu` by a factor :math:`1 - \eta(\gamma +
            \lambda)` per step along a direction of curvature :math:`\lambda`, so
            :math:`\eta\gamma = 0.2` is stable while :math:`\lambda < 9\gamma` and leaves a
            transient below :math:`0.8^{25} \approx 0.4\%` after the default burn-in of
            25 of the 100 default ``steps``.
        temperature: :math:`T > 0`; 1 estimates the local entropy itself.
        burn_in: fraction of the Langevin steps discarded before averaging, in [0, 1).
        vectorize: try ``torch.func.vmap`` over samples and chains before looping;
            cleared after the first call that cannot be vmapped.
        seed: seed of this instance's own ``torch.Generator``; ``None`` draws one from
            torch's global RNG at construction, so ``torch.manual_seed`` makes it
            reproducible. The estimator never draws from the global stream afterwards.

    Attributes:
        last_value: the latest estimate of :math:`-F`, as a float for logging (``None``
            before the first call).
    """

    def __init__(
        self,
        gamma: float = 100.0,
        samples: int = 8,
        estimator: str = "smoothing",
        steps: int = 100,
        step_size: float | None = None,
        temperature: float = 1.0,
        burn_in: float = 0.25,
        vectorize: bool = True,
        seed: int | None = None,
        antithetic: bool = True,
    ) -> None:
        _check_positive("gamma", gamma)
        _check_count("samples", samples)
        if estimator not in _ESTIMATORS:
            raise ConfigError(f"LocalEntropy: estimator must be one of {_ESTIMATORS}, got {estimator!r}")
        _check_count("steps", steps)
        if step_size is not None:
            _check_positive("step_size", step_size)
        _check_positive("temperature", temperature)
        if isinstance(burn_in, bool) or not isinstance(burn_in, (int, float)) or not 0.0 <= burn_in < 1.0:
            raise ConfigError(f"LocalEntropy: burn_in must be a fraction in [0, 1), got {burn_in!r}")
        self.gamma = float(gamma)
        self.samples = samples
        self.estimator = estimator
        self.steps = steps
        self.step_size = 0.2 / self.gamma if step_size is None else float(step_size)
        self.temperature = float(temperature)
        self.burn_in = float(burn_in)
        if not isinstance(antithetic, bool):
            raise ConfigError(f"LocalEntropy: antithetic must be true or false, got {antithetic!r}")
        self.vectorize = vectorize
        self.antithetic = antithetic
        self.generator = seeded_generator(seed)
        self.last_value: float | None = None

    def __repr__(self) -> str:
        return (
            f"LocalEntropy(gamma={self.gamma}, samples={self.samples}, antithetic={self.antithetic}, "
            f"estimator={self.estimator!r}, "
            f"steps={self.steps}, step_size={self.step_size}, temperature={self.temperature}, "
            f"burn_in={self.burn_in})"
        )

    def __call__(self, params: Params, loss_fn: LossFn) -> Tensor:
        """The estimate of ``-F`` at ``params``, a 0-dim tensor differentiable in ``params``."""
        params = as_graph_params(params)
        if self.estimator == "smoothing":
            value = self._smoothing(params, loss_fn)
        else:
            value = self._langevin(params, loss_fn)
        self.last_value = float(value.detach())
        return value

    def _smoothing(self, params: list[Tensor], loss_fn: LossFn) -> Tensor:
        t, gamma, s = self.temperature, self.gamma, self.samples
        std = math.sqrt(t / gamma)
        drawn = (s + 1) // 2 if self.antithetic else s
        noise = random_like([p.detach().expand(drawn, *p.shape) for p in params], self.generator, "gaussian")
        if self.antithetic:
            noise = [torch.cat([e, -e])[:s] for e in noise]
        points = [p.unsqueeze(0) + std * e for p, e in zip(params, noise)]
        losses = self._losses(loss_fn, points)
        log_mean = torch.logsumexp(-losses / t, dim=0) - math.log(s)
        d = sum(p.numel() for p in params)
        entropy = t * (0.5 * d * math.log(2.0 * math.pi * t / gamma) + log_mean)
        return -entropy

    def _langevin(self, params: list[Tensor], loss_fn: LossFn) -> Tensor:
        mean = self._gibbs_mean([p.detach() for p in params], loss_fn)
        surrogate = 0.5 * self.gamma * torch.stack([((p - m) ** 2).sum() for p, m in zip(params, mean)]).sum()
        with torch.no_grad():
            value = self._smoothing([p.detach() for p in params], loss_fn)
        # Shifting by a detached amount keeps the surrogate's gradient, gamma (theta - mu),
        # and makes the value the (finite-constant) estimate of -F.
        return surrogate - surrogate.detach() + value

    def _gibbs_mean(self, theta: list[Tensor], loss_fn: LossFn) -> list[Tensor]:
        c, eta, gamma = self.samples, self.step_size, self.gamma
        noise_scale = math.sqrt(2.0 * eta * self.temperature)
        burn = int(self.burn_in * self.steps)
        chains = [t.unsqueeze(0).repeat(c, *([1] * t.dim())) for t in theta]
        total = [torch.zeros_like(x) for x in chains]
        for k in range(self.steps):
            grads = self._gradients(loss_fn, chains)
            noise = random_like(chains, self.generator, "gaussian")
            with torch.no_grad():
                chains = [
                    x - eta * (g + gamma * (x - t)) + noise_scale * n
                    for x, g, t, n in zip(chains, grads, theta, noise)
                ]
                if k >= burn:
                    total = [a + x for a, x in zip(total, chains)]
        kept = c * (self.steps - burn)
        return [a.sum(dim=0) / kept for a in total]

    def _losses(self, loss_fn: LossFn, points: list[Tensor]) -> Tensor:
        """``loss_fn`` at each of the batched ``points``, as a 1-D tensor."""
        losses, self.vectorize = batched_losses(loss_fn, points, self.vectorize)
        return losses

    def _gradients(self, loss_fn: LossFn, points: list[Tensor]) -> list[Tensor]:
        """``grad loss_fn`` at each of the batched, detached ``points``."""
        n, count = points[0].shape[0], len(points)

        def vectorized() -> list[Tensor]:
            grad_fn = torch.func.grad(lambda *ps: loss_fn(list(ps)), argnums=tuple(range(count)))
            return list(torch.func.vmap(grad_fn)(*points))

        def looped() -> list[Tensor]:
            rows = []
            with torch.enable_grad():
                for i in range(n):
                    point = [x[i].detach().requires_grad_(True) for x in points]
                    grads = torch.autograd.grad(scalar(loss_fn(point)), point, allow_unused=True)
                    rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, point)])
            return [torch.stack(column) for column in zip(*rows)]

        gradients, self.vectorize = batched(vectorized, looped, self.vectorize)
        return gradients


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"LocalEntropy: {name} must be a finite positive number, got {value!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"LocalEntropy: {name} must be a positive integer, got {value!r}")
