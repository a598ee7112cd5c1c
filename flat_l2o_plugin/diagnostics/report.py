"""The flatness of a trained optimizee, measured four ways, in one report.

* the top-k Hessian eigenvalues (Lanczos with locking), each with its residual, a
  bound on its error,
* the Hessian trace (Hutchinson, with a standard error),
* the spectral density (stochastic Lanczos quadrature), which shows whether a large
  trace comes from a few outliers or from a broad bulk,
* the local entropy F(θ; γ) at a few scopes γ (Chaudhari et al., ICLR 2017), which
  measures the volume of low loss around θ at the length scale 1/√γ.

Each estimator is the one the corresponding regularizer uses during meta-training, so a
report reads on the same scale as the training logs. Nothing here is differentiable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from .._extras import import_extra
from ..errors import ConfigError
from ..protocols import LossFn, Params, Task
from ..regularizers import HessianTrace, LocalEntropy, hessian_eigenpairs
from ..regularizers._hvp import gradient
from .lanczos import hessian_slq

__all__ = ["FlatnessReport", "flatness_report", "task_flatness", "plot_density"]

# Hutchinson probes are drawn in up to this many independent batches: their spread gives
# the trace's standard error at the cost of one extra gradient per batch.
_TRACE_BATCHES = 8


@dataclass(frozen=True)
class FlatnessReport:
    """Flatness measurements at one point θ of one loss.

    Attributes:
        num_params: d, the number of scalar parameters.
        loss: f(θ) on the batch measured.
        top_eigenvalues: The ``top_k`` Hessian eigenvalues of largest magnitude, in
            decreasing magnitude (a negative one means θ is not a minimum).
        top_residuals: For each, the residual ‖Hu − λu‖ of its unit vector u: the Hessian
            has an eigenvalue within it of the value (within residual²/gap when the
            other eigenvalues are at least gap away). ``eigen_tol`` makes each at most
            ``eigen_tol``·|λ| unless ``eigen_steps`` ran out.
        trace: Hutchinson's estimate of tr ∇²f(θ).
        trace_stderr: Its standard error (``None`` with a single probe).
        local_entropy: γ -> F(θ; γ) at temperature 1, all constants included: the
            negative of what the ``local_entropy`` regularizer returns. Higher is flatter
            at the scale 1/√γ; compare values at the same γ and d only.
        density_grid: Abscissae of the spectral density.
        density: The spectral density ρ(t) on ``density_grid``; it integrates to 1.
        density_sigma: The Gaussian broadening of the density.
        quadrature_nodes: Per SLQ probe, the Gauss nodes (Ritz values), ascending.
        quadrature_weights: Per SLQ probe, the matching weights (each row sums to 1).
        quadrature_residuals: Per SLQ probe, each node's Ritz residual: the Hessian has
            an eigenvalue within it of the node (small for converged nodes, which are
            the extreme ones first).
        settings: The estimator settings used (probes, steps, seed, ...).
        task: The task's name, when measured through :func:`task_flatness`.
        split: The data split measured, idem.
    """

    num_params: int
    loss: float
    top_eigenvalues: tuple[float, ...]
    top_residuals: tuple[float, ...]
    trace: float
    trace_stderr: float | None
    local_entropy: dict[float, float]
    density_grid: tuple[float, ...]
    density: tuple[float, ...]
    density_sigma: float
    quadrature_nodes: tuple[tuple[float, ...], ...]
    quadrature_weights: tuple[tuple[float, ...], ...]
    quadrature_residuals: tuple[tuple[float, ...], ...]
    settings: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    split: str | None = None

    @property
    def slq_trace(self) -> float:
        """d times the density's first moment: a second, independent estimate of the trace."""
        pairs = zip(self.quadrature_weights, self.quadrature_nodes)
        means = [sum(w * x for w, x in zip(ws, xs)) for ws, xs in pairs]
        return self.num_params * sum(means) / len(means)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready builtins; ``local_entropy`` becomes a list of records."""
        out = dataclasses.asdict(self)
        out["local_entropy"] = [{"gamma": g, "local_entropy": v} for g, v in self.local_entropy.items()]
        out["slq_trace"] = self.slq_trace
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """The report as a JSON document (see :meth:`as_dict`)."""
        return json.dumps(self.as_dict(), indent=indent, allow_nan=True)

    def summary(self) -> str:
        """A few human-readable lines."""
        where = f"{self.task} ({self.split} split), " if self.task else ""
        stderr = f" ± {self.trace_stderr:.4g}" if self.trace_stderr is not None else ""
        lines = [
            f"{where}{self.num_params} parameters, loss {self.loss:.6g}",
            "top eigenvalues: " + ", ".join(
                f"{v:.6g} (± {r:.1g})" for v, r in zip(self.top_eigenvalues, self.top_residuals)),
            f"trace: {self.trace:.6g}{stderr} (Hutchinson); {self.slq_trace:.6g} (Lanczos probes)",
            "local entropy F(θ;γ): " + ", ".join(f"γ={g:g}: {v:.6g}" for g, v in self.local_entropy.items()),
        ]
        return "\n".join(lines)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"flatness_report: {name} must be a positive integer, got {value!r}")
    return value


def _check_gammas(gammas: Iterable[float]) -> tuple[float, ...]:
    out = []
    for g in gammas:
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0:
            raise ConfigError(f"flatness_report: every gamma must be a finite positive number, got {g!r}")
        out.append(float(g))
    return tuple(out)


def flatness_report(
    loss_fn: LossFn,
    params: Params,
    *,
    top_k: int = 3,
    trace_probes: int = 64,
    slq_probes: int = 8,
    lanczos_steps: int = 80,
    gammas: Sequence[float] = (10.0, 100.0, 1000.0),
    entropy_samples: int = 64,
    eigen_steps: int = 100,
    eigen_tol: float = 1e-6,
    density_points: int = 1024,
    sigma: float | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> FlatnessReport:
    """Measure the flatness of ``loss_fn`` at ``params``.

    Args:
        loss_fn: ``loss_fn(params)`` returns the scalar loss; use a fixed batch (a whole
            split), since a different batch per call would measure a different function.
        params: The point θ, one tensor per weight.
        top_k: Eigenvalues of largest magnitude to report.
        trace_probes: Hutchinson probes (Rademacher), rounded up to a multiple of the
            number of batches they are drawn in (up to 8).
        slq_probes: Lanczos probes for the spectral density.
        lanczos_steps: Lanczos steps per probe (capped at d).
        gammas: Scopes at which to estimate the local entropy.
        entropy_samples: Monte-Carlo draws per local-entropy estimate.
        eigen_steps: The most Lanczos steps (HVPs) per top eigenvalue.
        eigen_tol: Each top eigenvalue's Lanczos run stops once its residual is at most
            ``eigen_tol``·|λ|, which bounds its error by that much (see
            ``top_residuals``).
        density_points: Grid points of the spectral density.
        sigma: Broadening of the density (default: spread of the nodes / steps).
        dtype: Measure in this dtype (e.g. ``torch.float64`` for a float32 optimizee);
            ``loss_fn`` must accept it. Default: the params' own dtype.
        seed: Base seed; each estimator draws from its own generator seeded from it.

    Returns:
        The :class:`FlatnessReport`.

    Raises:
        ConfigError: A bad setting (named), or a non-finite loss or gradient at ``params``
            (a diverged optimizee has no meaningful curvature).

    Example:
        >>> batch = task.full_batch("train")
        >>> report = flatness_report(lambda p: task.loss(p, batch), params, top_k=5)
        >>> report.top_eigenvalues[0], report.trace
    """
    params = [p.detach() if dtype is None else p.detach().to(dtype) for p in params]
    if not params:
        raise ConfigError("flatness_report: params is empty")
    num_params = sum(p.numel() for p in params)
    top_k = _check_count("top_k", top_k)
    if top_k > num_params:
        raise ConfigError(f"flatness_report: top_k={top_k} exceeds the {num_params} parameters")
    trace_probes = _check_count("trace_probes", trace_probes)
    slq_probes = _check_count("slq_probes", slq_probes)
    lanczos_steps = _check_count("lanczos_steps", lanczos_steps)
    entropy_samples = _check_count("entropy_samples", entropy_samples)
    eigen_steps = _check_count("eigen_steps", eigen_steps)
    if isinstance(eigen_tol, bool) or not isinstance(eigen_tol, (int, float)) or not 0 <= eigen_tol < math.inf:
        raise ConfigError(f"flatness_report: eigen_tol must be a finite number >= 0, got {eigen_tol!r}")
    density_points = _check_count("density_points", density_points)
    gammas = _check_gammas(gammas)
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float))
                              or not math.isfinite(sigma) or sigma <= 0):
        raise ConfigError(f"flatness_report: sigma must be a finite positive number or None, got {sigma!r}")

    loss = _finite_loss(loss_fn, params)
    eigenpairs = hessian_eigenpairs(params, loss_fn, k=top_k, iters=eigen_steps, tol=eigen_tol, seed=seed)
    trace, trace_stderr, trace_probes = _trace(loss_fn, params, trace_probes, seed + 1)

    quadrature = hessian_slq(loss_fn, params, probes=slq_probes, steps=lanczos_steps, seed=seed + 2)
    try:
        density = quadrature.density(sigma=sigma, points=density_points)
    except ValueError as exc:
        raise ConfigError(f"flatness_report: {exc}") from exc

    entropy = {}
    for i, gamma in enumerate(gammas):
        estimator = LocalEntropy(gamma=gamma, samples=entropy_samples, estimator="smoothing", seed=seed + 3 + i)
        with torch.no_grad():
            entropy[gamma] = -float(estimator(params, loss_fn))

    settings = {
        "top_k": top_k, "trace_probes": trace_probes, "slq_probes": slq_probes,
        "lanczos_steps": lanczos_steps, "gammas": list(gammas), "entropy_samples": entropy_samples,
        "eigen_steps": eigen_steps, "eigen_tol": eigen_tol, "density_points": density_points, "seed": seed,
        "dtype": str(params[0].dtype).removeprefix("torch."),
    }
    return FlatnessReport(
        num_params=num_params,
        loss=loss,
        top_eigenvalues=tuple(eigenpairs.values),
        top_residuals=tuple(eigenpairs.residuals),
        trace=trace,
        trace_stderr=trace_stderr,
        local_entropy=entropy,
        density_grid=tuple(density.grid.tolist()),
        density=tuple(density.density.tolist()),
        density_sigma=density.sigma,
        quadrature_nodes=tuple(tuple(x.tolist()) for x in quadrature.nodes),
        quadrature_weights=tuple(tuple(w.tolist()) for w in quadrature.weights),
        quadrature_residuals=tuple(tuple(r.tolist()) for r in quadrature.residuals),
        settings=settings,
    )


def _finite_loss(loss_fn: LossFn, params: list[Tensor]) -> float:
    leaves = [p.detach().requires_grad_(True) for p in params]
    loss, grads = gradient(loss_fn, leaves)
    value = float(loss.detach())
    if not math.isfinite(value) or not all(bool(torch.isfinite(g).all()) for g in grads):
        raise ConfigError(
            f"flatness_report: the loss ({value}) or its gradient is not finite at these params; "
            f"the optimizee diverged, so measure an earlier checkpoint"
        )
    return value


def _trace(loss_fn: LossFn, params: list[Tensor], probes: int, seed: int) -> tuple[float, float | None, int]:
    batches = min(probes, _TRACE_BATCHES)
    per_batch = -(-probes // batches)
    estimator = HessianTrace(probes=per_batch, distribution="rademacher", seed=seed)
    means = torch.tensor(
        [float(estimator(params, loss_fn).detach()) for _ in range(batches)], dtype=torch.float64)
    stderr = float(means.std(unbiased=True)) / math.sqrt(batches) if batches > 1 else None
    return float(means.mean()), stderr, batches * per_batch


def task_flatness(task: Task, params: Params, split: str = "train", **options: Any) -> FlatnessReport:
    """:func:`flatness_report` of a task's loss on a whole split.

    Args:
        task: A task with ``full_batch(split) -> batch`` and ``loss(params, batch)``
            (e.g. :class:`~flat_l2o_plugin.tasks.MLPTask`).
        params: The optimizee's parameters.
        split: ``"train"`` (the loss that was minimized), ``"val"`` or ``"test"``.
        **options: Passed to :func:`flatness_report`.

    Raises:
        ConfigError: The task has no ``full_batch``, or a bad option.
    """
    full_batch = getattr(task, "full_batch", None)
    if not callable(full_batch):
        raise ConfigError(
            f"task {getattr(task, 'name', task)!r} has no full_batch(split) method; add one, or call "
            f"flatness_report() with your own loss_fn over a fixed batch"
        )
    try:
        batch = full_batch(split)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"task {getattr(task, 'name', task)!r}: split {split!r}: {exc}") from exc
    report = flatness_report(lambda p: task.loss(p, batch), params, **options)
    return dataclasses.replace(report, task=getattr(task, "name", None), split=split)


def plot_density(report: FlatnessReport, path: str | os.PathLike[str]) -> Path:
    """Draw the spectral density (log scale) with the top eigenvalues marked, as a PNG.

    A Hessian's density is a tall bulk near zero and a few small outliers, so the density
    axis is logarithmic; values below 1e-10 of the peak are clipped to keep it readable.

    Returns:
        The path written.
    """
    # The Agg canvas directly, not pyplot: no global backend switch in the caller's process.
    import_extra("matplotlib", "plot", "plot_density")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(6.4, 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    peak = max(report.density) if report.density else 1.0
    floor = peak * 1e-10 if peak > 0 else 1e-300
    axes.semilogy(report.density_grid, [max(v, floor) for v in report.density], color="tab:blue", lw=1.2,
                  label="spectral density (SLQ)")
    for i, value in enumerate(report.top_eigenvalues):
        axes.axvline(value, color="tab:red", ls="--", lw=0.8, label="top eigenvalues" if i == 0 else None)
    axes.set_xlabel("Hessian eigenvalue")
    axes.set_ylabel("density")
    title = report.task or "optimizee"
    stderr = f" ± {report.trace_stderr:.3g}" if report.trace_stderr is not None else ""
    axes.set_title(f"{title}: trace {report.trace:.4g}{stderr}, σ = {report.density_sigma:.2g}", fontsize=9)
    axes.legend(fontsize=8)
    figure.savefig(path, format="png")
    return path
