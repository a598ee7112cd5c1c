"""Flatness diagnostics for a trained optimizee: top-k eigenvalues, trace, spectral density
and local entropy, from a loss and params, a task, or a saved checkpoint.

Example:
    >>> from flat_l2o_plugin.tasks.checkpoint import load_optimizee
    >>> task, params = load_optimizee("runs/mlp.safetensors")
    >>> report = task_flatness(task, params, top_k=5)
    >>> print(report.summary())
    >>> plot_density(report, "runs/spectral_density.png")

The same is available as ``flat-l2o flatness CHECKPOINT``.
"""

from __future__ import annotations

from .lanczos import (
    SpectralDensity,
    SpectralQuadrature,
    gauss_quadrature,
    gaussian_density,
    hessian_matvec,
    hessian_slq,
    lanczos_tridiagonal,
    stochastic_lanczos_quadrature,
)
from .report import FlatnessReport, flatness_report, plot_density, task_flatness

__all__ = [
    "FlatnessReport",
    "SpectralDensity",
    "SpectralQuadrature",
    "flatness_report",
    "gauss_quadrature",
    "gaussian_density",
    "hessian_matvec",
    "hessian_slq",
    "lanczos_tridiagonal",
    "plot_density",
    "stochastic_lanczos_quadrature",
    "task_flatness",
]
