"""What the flatness regularizers cost, how close the cheap estimators are, and how ours compare with other libraries.

Each measurement runs side by side in one process so that ratios survive a noisy,
shared machine (configurations are interleaved round-robin and medians reported):

1. Meta-iteration cost: one meta-step (an unroll of K=20 steps of RNNProp) with each
   regularizer applied at every step, divided by the unregularized meta-step, on the
   MLP-digits and conv-digits optimizees. The targets of the top-eigenvalue term
   (≤ 1.3× on MLP-digits, ≤ 2× on conv-digits) are then measured on their own, over
   adjacent pairs of plain and regularized meta-steps: met when a 95% interval of the
   median ratio lies within the bound, not met when it lies beyond, else undecided.
   "previous default" rows run the estimators as they were: the top eigenvalue with 2
   HVPs per call and computing its own gradient (a plugin-style ``reg(params, loss_fn)``
   adapter).
2. Warm-started power iteration against the original release's recipe (cold starts of
   10 iterations at every step) and against cold starts run to ``tol=1e-3`` along an
   Adam trajectory, against the exact top eigenvalue (``eigvalsh`` of the full
   Hessian). Each call's ``last_residual`` is checked to bound its distance to the
   nearest exact eigenvalue, and the calls run to ``tol`` to be within ``tol`` of the
   top one.
3. Our top eigenvalue and trace against PyHessian and hessian-eigenthings on the same
   model and batch: time and relative error against the exact values.
4. Finite-difference products against exact ones: along short RNNProp unrolls on
   MLP-digits, conv-digits and a tiny timm ViT, with the same probes, the relative error
   of the value and the cosine between the meta-gradients (w.r.t. the learned
   optimizer's weights) of the top-eigenvalue and trace terms, and a sweep of the
   relative step h. The exact reference of the ViT is computed with a LayerNorm
   written out in primitive ops, since torch's own layer_norm has a wrong third
   derivative (its cosine with the reference is printed too).
5. A BatchNorm model (timm ``test_resnet``): torch has no third derivative of batch_norm,
   so the HVP form of a curvature term fails there; the finite-difference form's cost,
   and its meta-gradient against a reference with BatchNorm written out in primitive ops.
6. Smoothing local entropy: the spread of its value and gradient with independent and
   with antithetic draws, for the sample counts in part 1.
7. Where the time goes: the pieces of one unrolled step (the host's forward and
   gradient, the learned optimizer's step, the term's product and its backward).
8. Routes around the third-order backward, per call against the HVP route: forward-
   over-forward mode and second differences of plain gradients (cost, and the cosine of
   their derivative with the exact one), and the input gradient torch's convolution
   double backward computes for data that needs none.

Run: ``python benchmarks/regularizer_cost.py [--quick] [--parts 1,4] [--out runs/bench/regularizer_cost.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from flat_l2o_plugin import FlatL2O, RegularizerInfo, create_optimizer, create_task, hookimpl
from flat_l2o_plugin.regularizers import HessianTopEigenvalue, HessianTrace, LocalEntropy
from flat_l2o_plugin.regularizers._hvp import dot, gradient, hvp, norm
from flat_l2o_plugin.regularizers.finite_difference import default_relative_step, gradient_difference, step_length
from flat_l2o_plugin.testing import isolated_plugin_manager
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer

TOP = "hessian_top_eigenvalue"
DEFAULT_TOP = f"{TOP} (default: HVP, 1 product)"
TARGETS = {"mlp_digits": 1.3, "conv_digits": 2.0}
"""The top-eigenvalue term's budget, as a multiple of a plain meta-iteration."""

CONFIGS: dict[str, dict[str, Any]] = {
    "none": {},
    DEFAULT_TOP: {TOP: {"weight": 0.01}},
    f"{TOP} (finite difference, 1 product)": {TOP: {"weight": 0.01, "products": "finite_difference"}},
    f"{TOP} (finite difference, warm_iters=1)": {TOP: {"weight": 0.01, "products": "finite_difference",
                                                       "warm_iters": 1}},
    f"{TOP} (HVP, 2 HVPs)": {TOP: {"weight": 0.01, "products": "hvp", "warm_iters": 1}},
    f"{TOP} (previous default: HVP, 2 HVPs, own gradient)": {
        "classic_top_eigenvalue": {"weight": 0.01, "products": "hvp", "warm_iters": 1}},
    f"{TOP} (cold, 10 iters, HVP: original release)": {
        TOP: {"weight": 0.01, "warm_start": False, "iters": 10, "tol": 0.0, "products": "hvp"}},
    "hessian_trace (8 probes, default: HVP)": {"hessian_trace": {"weight": 0.01}},
    "hessian_trace (8 probes, finite difference)": {"hessian_trace": {"weight": 0.01,
                                                                      "products": "finite_difference"}},
    "local_entropy (smoothing, default: 8 antithetic)": {"local_entropy": {"weight": 0.01}},
    "local_entropy (smoothing, 16 independent: previous default)": {
        "local_entropy": {"weight": 0.01, "samples": 16, "antithetic": False}},
    "local_entropy (smoothing, 4 antithetic)": {"local_entropy": {"weight": 0.01, "samples": 4}},
    "sharpness": {"sharpness": {"weight": 0.01}},
}
LANGEVIN = {"local_entropy (langevin, 20 steps)": {"local_entropy": {"weight": 0.01, "estimator": "langevin",
                                                                      "steps": 20}}}

SECOND_STEPS = (9e-3, 1e-3, 3e-4)
"""Relative steps h of the second differences tried along unrolls (0.5·ε^¼ is 9e-3 in float32)."""

VIT = {"model": "vit_tiny_patch16_224", "dataset": "digits", "batch_size": 64,
       "model_kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}}
"""A ViT small enough for the CPU (the size of the study's held-out ``vit_digits``)."""

RESNET = {"model": "test_resnet", "dataset": "synthetic_images", "batch_size": 16,
          "dataset_options": {"side": 16}}
"""timm's smallest ResNet (BatchNorm), on 16x16 generated images."""


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(dot(a, b) / (norm(a) * norm(b)))


# ------------------------------------------------------------------ 1. meta-iteration cost


class _OwnGradient:
    """The top-eigenvalue estimator behind a ``reg(params, loss_fn)`` signature.

    A plugin written before hosts handed over their gradient looks like this: it never
    receives the host's loss or gradient graph and computes its own, as every estimator
    did before.
    """

    def __init__(self, **options: Any) -> None:
        self.inner = HessianTopEigenvalue(**options)

    def __call__(self, params: list[torch.Tensor], loss_fn: Callable) -> torch.Tensor:
        value = self.inner(params, loss_fn)
        self.last_value = self.inner.last_value
        return value


class _ClassicPlugin:
    @hookimpl
    def register_regularizers(self, register: Callable[[RegularizerInfo], None]) -> None:
        register(RegularizerInfo(name="classic_top_eigenvalue", factory=_OwnGradient,
                                 description="hessian_top_eigenvalue computing its own gradient"))


def meta_iteration_cost(task_name: str, configs: dict[str, dict[str, Any]], rounds: int,
                        steps_per_round: int) -> dict[str, dict[str, float]]:
    task = create_task(task_name)
    trainers = {}
    for name, regs in configs.items():
        torch.manual_seed(0)
        flat = FlatL2O(regs, plugin_manager=isolated_plugin_manager(_ClassicPlugin()))
        trainers[name] = MetaTrainer(create_optimizer("rnnprop"), lambda g: (task, 1), flat=flat,
                                     config=MetaTrainConfig(meta_steps=1, unroll=20, horizon=100, val_every=0))
        trainers[name].step(0)  # warm-up: allocations, first cold start
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for k in range(steps_per_round):
                trainer.step(1 + r * steps_per_round + k)
            times[name].append((time.perf_counter() - start) / steps_per_round)
    base = statistics.median(times["none"])
    # Each round's ratio to the same round's plain meta-step, then their median, too:
    # a load spike that hits one round hits both of its numbers.
    return {name: {"ms": 1e3 * statistics.median(t), "ratio": statistics.median(t) / base,
                   "median_round_ratio": statistics.median(a / b for a, b in zip(t, times["none"]))}
            for name, t in times.items()}


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval for the median, and its exact coverage.

    The order statistics (x_(k), x_(n+1-k)) cover the median with probability
    1 − 2·P(B < k), B ~ Binomial(n, ½), whatever the distribution: k is the largest with
    P(B < k) ≤ (1 − ``confidence``)/2. Too few values for that give (min, max), whose
    coverage (below ``confidence``) is what is returned.
    """
    xs, n = sorted(values), len(values)
    if n == 0:
        raise ValueError("median_interval needs at least one value")

    def below(k: int) -> float:  # P(B < k)
        return sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and below(k + 1) <= (1 - confidence) / 2:
        k += 1
    return xs[k - 1], xs[n - k], 1 - 2 * below(k)


def target_verdict(low: float, high: float, bound: float) -> str:
    """``"met"`` when the whole interval is within the bound, ``"not met"`` when none of it is."""
    return "met" if high <= bound else "not met" if low > bound else "undecided"


def paired_ratio(task_name: str, regularizers: dict[str, Any], pairs: int) -> dict[str, float]:
    """The term's cost as the median over adjacent pairs of (regularized ÷ plain) meta-steps.

    On a shared machine the load drifts within the seconds a round of every configuration
    takes; two meta-steps run back to back see nearly the same load, and alternating
    their order (AB, BA, ...) cancels a steady drift. The quartiles show the spread, and
    a 95% interval for the median (:func:`median_interval`) decides a target: a median
    on the bound is neither met nor missed.
    """
    task = create_task(task_name)
    trainers = []
    for regs in ({}, regularizers):
        torch.manual_seed(0)
        trainer = MetaTrainer(create_optimizer("rnnprop"), lambda g: (task, 1), flat=FlatL2O(regs),
                              config=MetaTrainConfig(meta_steps=1, unroll=20, horizon=100, val_every=0))
        trainer.step(0)  # warm-up: allocations, first cold start
        trainers.append(trainer)
    ratios = []
    for k in range(pairs):
        seconds = [0.0, 0.0]
        for i in ((0, 1) if k % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            trainers[i].step(1 + k)
            seconds[i] = time.perf_counter() - start
        ratios.append(seconds[1] / seconds[0])
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    low, high, coverage = median_interval(ratios)
    return {"ratio": median, "q1": q1, "q3": q3, "ci_low": low, "ci_high": high, "ci_coverage": coverage,
            "pairs": pairs}


# ------------------------------------------------------------------ 2. warm vs cold


def _flat_hessian(loss_fn: Callable, params: list[torch.Tensor]) -> torch.Tensor:
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def flat_loss(v: torch.Tensor) -> torch.Tensor:
        return loss_fn([c.view(s) for c, s in zip(v.split(sizes), shapes)])

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.func.hessian(flat_loss)(flat)


def warm_vs_cold(steps: int, check_every: int) -> dict[str, Any]:
    torch.manual_seed(0)
    task = create_task("mlp_digits")
    params = [p.detach().requires_grad_(True) for p in task.init_params(0)]
    adam = torch.optim.Adam(params, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    exact = partial(HessianTopEigenvalue, products="hvp", seed=0)
    estimators = {
        "power, warm, 1 HVP (default)": HessianTopEigenvalue(seed=0),
        "power, warm, 1 FD product": HessianTopEigenvalue(products="finite_difference", seed=0),
        "power, warm, 2 HVPs (previous default)": exact(warm_iters=1),
        "power, warm, 1 HVP + 1 FD product": HessianTopEigenvalue(products="finite_difference", warm_iters=1,
                                                                  seed=0),
        "power, cold 10 (original recipe)": exact(warm_start=False, iters=10, tol=0),
        "power, cold 20": exact(warm_start=False, iters=20, tol=0),
        "lanczos, warm 3 steps": exact(method="lanczos", warm_iters=3),
        "lanczos, cold 10": exact(method="lanczos", warm_start=False, iters=10, tol=0),
        # Stopped by the residual rule alone: the budget is not what binds.
        "power, cold to tol 1e-3": exact(warm_start=False, iters=2000, tol=1e-3),
        "lanczos, cold to tol 1e-3": exact(method="lanczos", warm_start=False, iters=500, tol=1e-3),
    }
    errors: dict[str, list[float]] = {k: [] for k in estimators}
    residuals: dict[str, list[float]] = {k: [] for k in estimators}
    bound_held: dict[str, list[bool]] = {k: [] for k in estimators}
    seconds: dict[str, float] = {k: 0.0 for k in estimators}
    hvps: dict[str, int] = {k: 0 for k in estimators}
    for t in range(steps):
        batch = task.sample_batch(generator)
        loss_fn = lambda p, b=batch: task.loss(p, b)  # noqa: E731
        spectrum = None
        if t % check_every == check_every - 1:
            spectrum = torch.linalg.eigvalsh(_flat_hessian(loss_fn, params))
            exact = float(spectrum.max())
        for name, est in estimators.items():
            start = time.perf_counter()
            est(params, loss_fn)
            seconds[name] += time.perf_counter() - start
            hvps[name] += est.last_hvps
            if spectrum is not None:
                errors[name].append(abs(est.last_value - exact) / abs(exact))
                residuals[name].append(est.last_residual / abs(est.last_value))
                # Up to float32 rounding of the HVPs (d·ε·‖H‖ at most).
                slack = spectrum.numel() * torch.finfo(torch.float32).eps * float(spectrum.abs().max())
                nearest = float((spectrum - est.last_value).abs().min())
                bound_held[name].append(nearest <= est.last_residual + slack)
        adam.zero_grad()
        task.loss(params, batch).backward()
        adam.step()
    return {name: {"median_rel_error": statistics.median(errors[name]), "max_rel_error": max(errors[name]),
                   "median_rel_residual": statistics.median(residuals[name]),
                   "residual_bound_held": statistics.fmean(bound_held[name]),
                   "ms_per_call": 1e3 * seconds[name] / steps, "hvps_per_call": hvps[name] / steps}
            for name in estimators}


# ------------------------------------------------------------------ 3. other libraries


def against_libraries(repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    task = create_task("mlp_digits")
    params = [p.detach() for p in task.init_params(0)]
    adam_params = [p.clone().requires_grad_(True) for p in params]
    adam = torch.optim.Adam(adam_params, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):  # a trained point, where curvature is no longer the initial plateau's
        adam.zero_grad()
        task.loss(adam_params, task.sample_batch(generator)).backward()
        adam.step()
    params = [p.detach() for p in adam_params]
    x, y = task.sample_batch(generator)
    loss_fn = lambda p: task.loss(p, (x, y))  # noqa: E731
    eigenvalues = torch.linalg.eigvalsh(_flat_hessian(loss_fn, params))
    exact_top, exact_trace = float(eigenvalues.max()), float(eigenvalues.sum())

    model = torch.nn.Sequential(torch.nn.Linear(64, 20), torch.nn.Sigmoid(), torch.nn.Linear(20, 10))
    with torch.no_grad():
        for p, q in zip(model.parameters(), params):
            p.copy_(q)

    rows: dict[str, dict[str, float]] = {}

    def record(name: str, fn: Callable[[], float], exact: float) -> None:
        value = fn()
        rows[name] = {"ms": _median_ms(fn, repeats), "value": value, "exact": exact,
                      "rel_error": abs(value - exact) / abs(exact)}

    # Top eigenvalue at equal accuracy: each method's iteration budget is swept (no early
    # stop), and the cheapest budget reaching each target error is timed.
    methods: dict[str, Callable[[int], float]] = {
        "ours (lanczos)": lambda k: float(HessianTopEigenvalue(method="lanczos", iters=k, warm_start=False, tol=0,
                                                                products="hvp", seed=0)(params, loss_fn)),
        "ours (power)": lambda k: float(HessianTopEigenvalue(iters=k, warm_start=False, tol=0, products="hvp",
                                                              seed=0)(params, loss_fn)),
    }
    try:
        from pyhessian import hessian as PyHessian

        def pyhessian_top(k: int) -> float:
            torch.manual_seed(0)  # PyHessian draws its probe from the global RNG
            return float(PyHessian(model, F.cross_entropy, data=(x, y), cuda=False).eigenvalues(maxIter=k, tol=0.0)[0][0])

        methods["PyHessian"] = pyhessian_top
    except ImportError as exc:  # the dev extra is optional for a user running benchmarks
        warnings.warn(f"pyhessian not installed, skipped: {exc}")
    try:
        import hessian_eigenthings as he

        methods["hessian-eigenthings"] = lambda k: float(he.deflated_power_iteration(
            he.HessianOperator(model, [(x, y)], he.supervised_loss(F.cross_entropy)), k=1, max_iter=k, tol=0.0,
            seed=0).eigenvalues[0])
    except ImportError as exc:
        warnings.warn(f"hessian-eigenthings not installed, skipped: {exc}")
    budgets = (2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    for target in (1e-2, 1e-3):
        for name, run in methods.items():
            for k in budgets:
                if abs(run(k) - exact_top) / abs(exact_top) <= target:
                    record(f"top eigenvalue to {target:.0e}: {name}, {k} iters", lambda run=run, k=k: run(k), exact_top)
                    break
            else:
                rows[f"top eigenvalue to {target:.0e}: {name}"] = {"ms": float("nan"), "value": float("nan"),
                                                                   "exact": exact_top, "rel_error": float("nan")}

    record("trace: ours (100 probes, batched)",
           lambda: float(HessianTrace(probes=100, products="hvp", seed=0)(params, loss_fn).detach()), exact_trace)
    if "PyHessian" in methods:
        def pyhessian_trace() -> float:
            torch.manual_seed(0)
            return float(statistics.fmean(PyHessian(model, F.cross_entropy, data=(x, y), cuda=False).trace(
                maxIter=100, tol=1e-3)))

        record("trace: PyHessian (<= 100 probes, tol 1e-3)", pyhessian_trace, exact_trace)
    if "hessian-eigenthings" in methods:
        record("trace: hessian-eigenthings (hutchinson, 100)", lambda: float(he.hutchinson(
            he.HessianOperator(model, [(x, y)], he.supervised_loss(F.cross_entropy)), num_samples=100,
            seed=0).estimate), exact_trace)
    return rows


# ------------------------------------------------------------------ 4. finite differences vs exact


@contextmanager
def primitive_norms() -> Iterator[None]:
    """LayerNorm and training-mode BatchNorm written out in primitive ops.

    torch's fused kernels save their mean and inverse deviation without autograd history,
    so differentiating their double backward (a third derivative) treats those as
    constants: silently wrong for layer_norm, an error for batch_norm. Written out, every
    derivative is right, which makes these the exact references.
    """
    fused_layer_norm, fused_batch_norm = F.layer_norm, F.batch_norm

    def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):  # noqa: ANN001, ANN202
        dims = tuple(range(-len(normalized_shape), 0))
        centered = x - x.mean(dims, keepdim=True)
        y = centered * torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
        return y * (1 if weight is None else weight) + (0 if bias is None else bias)

    def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,  # noqa: ANN001, ANN202
                   momentum=0.1, eps=1e-5):
        if not training and running_mean is not None:
            return fused_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        dims = (0, *range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        centered = x - x.mean(dims, keepdim=True)
        y = centered * torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
        return y * (1 if weight is None else weight.view(shape)) + (0 if bias is None else bias.view(shape))

    F.layer_norm, F.batch_norm = layer_norm, batch_norm
    try:
        yield
    finally:
        F.layer_norm, F.batch_norm = fused_layer_norm, fused_batch_norm


def _top_hvp(params: list[torch.Tensor], loss_fn: Callable, probe: list[torch.Tensor], step: int) -> torch.Tensor:
    _, grads = gradient(loss_fn, params)
    return dot(probe, hvp(grads, params, probe, create_graph=True))


def _top_fd(h: float | None) -> Callable[..., torch.Tensor]:
    def quotient(params: list[torch.Tensor], loss_fn: Callable, probe: list[torch.Tensor], step: int) -> torch.Tensor:
        _, grads = gradient(loss_fn, params)
        return gradient_difference(params, loss_fn, grads, probe, step_length(params, h)).value
    return quotient


class _GivenSlope(torch.autograd.Function):
    """A detached value whose derivative in each of the params is given (a second difference's slope)."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, count: int, *tensors: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(*tensors[count:])
        return value.clone()

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        slopes = ctx.saved_tensors
        return (None, None, *(upstream * w for w in slopes), *(None for _ in slopes))


def _top_second(h: float) -> Callable[..., torch.Tensor]:
    def quotient(params: list[torch.Tensor], loss_fn: Callable, probe: list[torch.Tensor], step: int) -> torch.Tensor:
        theta = [p.detach() for p in params]
        leaves = [p.clone().requires_grad_(True) for p in theta]
        grads = [g.detach() for g in torch.autograd.grad(loss_fn(leaves), leaves)]
        value, slope = _second_difference(loss_fn, theta, probe, grads, h)
        return _GivenSlope.apply(value.detach(), len(params), *params, *slope)
    return quotient


def _trace(products: str, h: float | None = None) -> Callable[..., torch.Tensor]:
    def estimate(params: list[torch.Tensor], loss_fn: Callable, probe: list[torch.Tensor], step: int) -> torch.Tensor:
        # The same seed at the same step draws the same Rademacher probes for both forms.
        return HessianTrace(probes=8, products=products, fd_step=h, seed=1000 + step)(params, loss_fn)
    return estimate


def _adam_steps(task: Any, params: list[torch.Tensor], steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``params`` after ``steps`` Adam steps (lr 1e-2) on batches drawn from ``generator``, detached."""
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    adam = torch.optim.Adam(leaves, lr=1e-2)
    for _ in range(steps):
        adam.zero_grad()
        task.loss(leaves, task.sample_batch(generator)).backward()
        adam.step()
    return [p.detach() for p in leaves]


def _unroll_terms(task: Any, unroll: int, seed: int, pretrain: int,
                  terms: dict[str, tuple[Callable[..., torch.Tensor], bool]]) -> dict[str, tuple[list[float], list]]:
    """Each term along the same RNNProp unroll: its values and its meta-gradient w.r.t. φ.

    The probes of the top eigenvalue come first, from the warm-started power iteration
    along the unroll (detached), so that every form is evaluated at the same vectors.
    ``terms`` maps a name to (function, whether to evaluate it with primitive norms).
    """
    torch.manual_seed(seed)
    optimizer = create_optimizer("rnnprop")
    generator = torch.Generator().manual_seed(seed)
    start = _adam_steps(task, task.init_params(seed), pretrain, generator)
    state0 = optimizer.init_state(start)
    batches = [task.sample_batch(generator) for _ in range(unroll + 1)]
    tracker = HessianTopEigenvalue(products="hvp", seed=seed)
    params, state, probes = [p.clone().requires_grad_(True) for p in start], state0, []
    for t in range(unroll):
        grads = torch.autograd.grad(task.loss(params, batches[t]), params)
        params, state = optimizer.step(params, [g.detach() for g in grads], state)
        params = [p.detach().requires_grad_(True) for p in params]
        state = {k: v.detach() for k, v in state.items()}
        for _ in range(5 if t == 0 else 1):
            tracker(params, partial(task.loss, batch=batches[t + 1]))
        probes.append([p.clone() for p in tracker._probe])
    out: dict[str, Any] = {}
    for name, (term, primitive) in terms.items():
        with primitive_norms() if primitive else _nothing():
            params, state, total, values = [p.clone().requires_grad_(True) for p in start], state0, 0.0, []
            for t in range(unroll):
                grads = torch.autograd.grad(task.loss(params, batches[t]), params, retain_graph=True)
                params, state = optimizer.step(params, [g.detach() for g in grads], state)
                loss_fn = partial(task.loss, batch=batches[t + 1])
                value = term(params, loss_fn, probes[t], t)
                values.append(float(value.detach()))
                total = total + value
            weights = list(optimizer.parameters())
            try:
                meta = torch.autograd.grad(total, weights, allow_unused=True)
            except RuntimeError as exc:  # torch's batch_norm has no third derivative
                out[name] = str(exc).strip().splitlines()[-1]
                continue
        out[name] = (values, [torch.zeros_like(w) if m is None else m for m, w in zip(meta, weights)])
    return out


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def finite_difference_agreement(task_name: str, options: dict[str, Any], starts: list[tuple[int, int]],
                                unroll: int, sweep: tuple[float, ...], primitive_reference: bool) -> dict[str, Any]:
    """Value errors and meta-gradient cosines of the finite-difference forms against the exact ones."""
    task = create_task(task_name, **options)
    default_h = default_relative_step(torch.float32)
    terms: dict[str, tuple[Callable, bool]] = {
        "top: exact": (_top_hvp, primitive_reference),
        "trace: exact": (_trace("hvp"), primitive_reference),
        "top: finite difference (default h)": (_top_fd(None), False),
        "trace: finite difference (default h)": (_trace("finite_difference"), False),
        # Part 8's route along unrolls: the step it needs moves with the iterate.
        **{f"top: second difference, h={h:.0e}": (_top_second(h), False) for h in SECOND_STEPS},
    }
    if primitive_reference:
        terms["top: torch's own third derivative"] = (_top_hvp, False)
        terms["trace: torch's own third derivative"] = (_trace("hvp"), False)
    for h in sweep:
        terms[f"top: finite difference, h={h:.0e}"] = (_top_fd(h), False)
        terms[f"trace: finite difference, h={h:.0e}"] = (_trace("finite_difference", h), False)
    rows: dict[str, dict[str, list[float]]] = {}
    failures: dict[str, str] = {}
    for seed, pretrain in starts:
        result = _unroll_terms(task, unroll, seed, pretrain, terms)
        for name, outcome in result.items():
            if isinstance(outcome, str):
                failures[name] = outcome
                continue
            if name.endswith("exact"):
                continue
            values, meta = outcome
            reference_values, reference_meta = result[f"{name.split(':')[0]}: exact"]
            row = rows.setdefault(name, {"errors": [], "cosines": []})
            row["errors"] += [abs(v - r) / abs(r) for v, r in zip(values, reference_values)]
            row["cosines"].append(_cosine(meta, reference_meta))
    return {"params": task.num_params, "default_h": default_h, "failures": failures,
            "rows": {name: {"median_rel_error": statistics.median(r["errors"]), "max_rel_error": max(r["errors"]),
                            "min_cosine": min(r["cosines"]), "cosines": r["cosines"]}
                     for name, r in rows.items()}}


# ------------------------------------------------------------------ 5. a BatchNorm model


def batch_norm_model(rounds: int, unroll: int) -> dict[str, Any]:
    """The curvature terms on a BatchNorm ResNet: HVP form refused, finite differences measured."""
    task = create_task("timm", **RESNET)
    configs = {
        "none": {},
        "hessian_top_eigenvalue (finite difference)": {TOP: {"weight": 0.01, "products": "finite_difference"}},
        "hessian_trace (8 probes, finite difference)": {"hessian_trace": {"weight": 0.01,
                                                                          "products": "finite_difference"}},
        "hessian_top_eigenvalue (HVP)": {TOP: {"weight": 0.01, "products": "hvp"}},
    }
    trainers, errors = {}, {}
    for name, regs in configs.items():
        torch.manual_seed(0)
        trainer = MetaTrainer(create_optimizer("rnnprop"), lambda g: (task, 1), flat=FlatL2O(regs),
                              config=MetaTrainConfig(meta_steps=1, unroll=unroll, horizon=10 * unroll,
                                                     val_every=0))
        try:
            trainer.step(0)
        except RuntimeError as exc:
            errors[name] = str(exc).strip().splitlines()[-1]
            continue
        trainers[name] = trainer
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(1 + r)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["none"])
    return {"params": task.num_params, "unroll": unroll, "errors": errors,
            "cost": {name: {"ms": 1e3 * statistics.median(t), "ratio": statistics.median(t) / base}
                     for name, t in times.items()}}


# ------------------------------------------------------------------ 6. local entropy's spread


def local_entropy_spread(task_name: str, repeats: int) -> dict[str, dict[str, float]]:
    """Standard deviation of the smoothing estimate and relative spread of its gradient."""
    task = create_task(task_name)
    start = [p.detach() for p in task.init_params(0)]
    leaves = [p.clone().requires_grad_(True) for p in start]
    generator = torch.Generator().manual_seed(0)
    adam = torch.optim.Adam(leaves, lr=1e-2)
    for _ in range(100):
        adam.zero_grad()
        task.loss(leaves, task.sample_batch(generator)).backward()
        adam.step()
    rows = {}
    for point, theta in (("init", start), ("after 100 Adam steps", [p.detach() for p in leaves])):
        batch = task.sample_batch(generator)
        loss_fn = partial(task.loss, batch=batch)
        for samples, antithetic in ((16, False), (8, True), (4, True), (8, False)):
            reg = LocalEntropy(samples=samples, antithetic=antithetic, seed=1)
            values, grads = [], []
            for _ in range(repeats):
                params = [p.clone().requires_grad_(True) for p in theta]
                value = reg(params, loss_fn)
                grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
                values.append(float(value.detach()))
            stacked = torch.stack(grads)
            mean = stacked.mean(dim=0)
            spread = float((stacked - mean).norm(dim=1).pow(2).mean().sqrt() / mean.norm())
            label = f"{samples} {'antithetic' if antithetic else 'independent'}"
            rows[f"{point}: {label}"] = {"value_std": statistics.stdev(values), "grad_rel_spread": spread}
    return rows


# ------------------------------------------------------------------ 7. where the time goes


def _adam_iterate(task: Any, steps: int) -> tuple[list[torch.Tensor], Callable, list[torch.Tensor]]:
    """θ after ``steps`` Adam steps from seed 0, the loss on a fresh batch, and a random unit vector."""
    generator = torch.Generator().manual_seed(0)
    theta = _adam_steps(task, task.init_params(0), steps, generator)
    unit = [torch.randn(p.shape, generator=generator) for p in theta]
    unit = [u / norm(unit) for u in unit]
    return theta, partial(task.loss, batch=task.sample_batch(generator)), unit


def _interleaved_ms(pieces: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each piece, the pieces run round-robin after a warm-up."""
    for fn in pieces.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(repeats):
        for name, fn in pieces.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def step_profile(task_name: str, repeats: int) -> dict[str, float]:
    """Milliseconds of each piece of one unrolled step, plain and with the top-eigenvalue term.

    At an iterate after 20 Adam steps, in the order a meta-iteration runs them: the
    host's forward and gradient, the learned optimizer's step, the term's product, and
    the meta-backward through each (what the meta-gradient adds per step). Pieces are
    interleaved and medians taken, so their ratios are side by side.
    """
    theta, loss_fn, unit = _adam_iterate(create_task(task_name), 20)
    optimizer = create_optimizer("rnnprop")
    state = optimizer.init_state(theta)

    def leaf() -> list[torch.Tensor]:
        return [p.clone().requires_grad_(True) for p in theta]

    def forward() -> None:
        loss_fn(leaf())

    def plain_gradient() -> None:
        params = leaf()
        torch.autograd.grad(loss_fn(params), params)

    def graph_gradient() -> None:
        params = leaf()
        torch.autograd.grad(loss_fn(params), params, create_graph=True)

    def optimizer_step() -> None:
        params = leaf()
        grads = [g.detach() for g in torch.autograd.grad(loss_fn(params), params)]
        optimizer.step(params, grads, state)

    def hvp_term(backward: bool) -> Callable[[], None]:
        def run() -> None:
            params = leaf()
            grads = torch.autograd.grad(loss_fn(params), params, create_graph=True)
            value = dot(unit, hvp(grads, params, unit, create_graph=backward))
            if backward:
                torch.autograd.grad(value, params)
        return run

    def fd_term(backward: bool) -> Callable[[], None]:
        def run() -> None:
            params = leaf()
            grads = torch.autograd.grad(loss_fn(params), params, create_graph=True)
            value = gradient_difference(params, loss_fn, grads, unit, step_length(params),
                                        create_graph=backward).value
            if backward:
                torch.autograd.grad(value, params)
        return run

    pieces = {
        "forward f(θ)": forward,
        "forward + gradient (plain, the host's)": plain_gradient,
        "forward + gradient with its graph": graph_gradient,
        "forward + gradient + RNNProp step": optimizer_step,
        "gradient graph + HVP (with graph)": hvp_term(False),
        "gradient graph + HVP + backward of vᵀHv (3rd order)": hvp_term(True),
        "gradient graph + FD product (with graph)": fd_term(False),
        "gradient graph + FD product + its backward (2nd order)": fd_term(True),
    }
    return _interleaved_ms(pieces, repeats)


# ------------------------------------------------------------------ 8. routes around the third-order backward


def _second_difference(loss_fn: Callable, theta: list[torch.Tensor], unit: list[torch.Tensor],
                       grads: list[torch.Tensor], h: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """uᵀ(g₊ − g₋)/2s and (g₊ − 2g + g₋)/s², s = h·(1 + ‖θ‖): the term and its θ-derivative from
    two plain gradients, no graph (a route that needs no derivative beyond the first)."""
    s = h * (1.0 + float(norm(theta)))
    far = []
    for sign in (1.0, -1.0):
        point = [(p + sign * s * u).requires_grad_(True) for p, u in zip(theta, unit)]
        far.append(torch.autograd.grad(loss_fn(point), point))
    value = dot(unit, [(a - b) / (2 * s) for a, b in zip(*far)])
    return value, [(a - 2 * g + b) / s**2 for a, g, b in zip(far[0], grads, far[1])]


def third_order_routes(task_name: str, options: dict[str, Any], repeats: int, primitive: bool) -> dict[str, Any]:
    """Other ways to get vᵀHv and its θ-derivative D³f[v, v, ·], against the HVP route.

    Cost: the HVP route (host's gradient with its graph, HVP with graph, third-order
    backward), forward-over-forward mode (``torch.func.jvp`` twice, then one backward)
    and second differences of plain gradients, each with the host's gradient included.
    Accuracy: the cosine of each derivative with the HVP route's (computed with LayerNorm
    and BatchNorm written out when ``primitive``, where torch's own is wrong).
    """
    from torch.func import jvp

    task = create_task(task_name, **options)
    with primitive_norms() if primitive else _nothing():
        theta, loss_fn, unit = _adam_iterate(task, 20)

        def leaf() -> list[torch.Tensor]:
            return [p.clone().requires_grad_(True) for p in theta]

        def hvp_route() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            params = leaf()
            grads = torch.autograd.grad(loss_fn(params), params, create_graph=True)
            value = dot(unit, hvp(grads, params, unit, create_graph=True))
            return value, torch.autograd.grad(value, params)

        def taylor_route() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            params = leaf()
            torch.autograd.grad(loss_fn(params), params)  # the host's gradient

            def slope(*at: torch.Tensor) -> torch.Tensor:
                return jvp(lambda *x: loss_fn(list(x)), at, tuple(unit))[1]

            value = jvp(slope, tuple(params), tuple(unit))[1]
            return value, torch.autograd.grad(value, params)

        def second_route(h: float) -> Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]:
            def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
                params = leaf()
                grads = [g.detach() for g in torch.autograd.grad(loss_fn(params), params)]
                return _second_difference(loss_fn, theta, unit, grads, h)
            return run

        def plain() -> None:
            params = leaf()
            torch.autograd.grad(loss_fn(params), params)

        exact_value, exact = hvp_route()
        default_h = 0.5 * torch.finfo(theta[0].dtype).eps ** 0.25
        routes = {"forward-over-forward (torch.func.jvp twice)": taylor_route,
                  **{f"second difference, h={h:.0e}": second_route(h) for h in (default_h, 1e-3, 1e-4)}}
        accuracy: dict[str, Any] = {}
        for name, route in routes.items():
            try:
                value, derivative = route()
            except RuntimeError as exc:  # an op without a forward-mode formula
                accuracy[name] = {"error": str(exc).strip().splitlines()[0]}
                continue
            accuracy[name] = {"value_rel_error": abs(float(value.detach()) - float(exact_value.detach()))
                              / abs(float(exact_value.detach())),
                              "derivative_cosine": _cosine(list(derivative), list(exact))}
        timed = {"host's gradient alone": plain, "HVP route (the default)": hvp_route,
                 "forward-over-forward (torch.func.jvp twice)": taylor_route,
                 f"second difference, h={default_h:.0e}": second_route(default_h)}
        ms = _interleaved_ms({name: fn for name, fn in timed.items() if "error" not in accuracy.get(name, {})},
                             repeats)
    return {"params": task.num_params, "ms": ms, "accuracy": accuracy}


def conv_double_backward_waste(repeats: int) -> dict[str, float]:
    """HVP time of a conv layer on data, with the data requiring grad and without.

    torch's convolution double backward computes the gradient of the layer's input
    whenever the probe has a weight part, whether or not the input needs it, so for a
    network's first layer (on data) it is computed and dropped, at every HVP and again in
    the third-order backward. Equal times show it (conv-digits' first layer's shapes).
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 1, 3, 3, generator=generator)
    probe = torch.randn(8, 1, 3, 3, generator=generator)

    def run(data_grad: bool) -> Callable[[], None]:
        x = torch.randn(128, 1, 8, 8, generator=generator).requires_grad_(data_grad)

        def hvp_once() -> None:
            w = weight.clone().requires_grad_(True)
            (gw,) = torch.autograd.grad(F.conv2d(x, w, padding=1).square().sum(), w, create_graph=True)
            torch.autograd.grad(gw, w, probe)
        return hvp_once

    grad_output = torch.randn(128, 8, 8, 8, generator=generator)
    return _interleaved_ms({"data needs no grad": run(False), "data needs grad": run(True),
                            "the data's gradient alone": lambda: F.conv_transpose2d(grad_output, probe, padding=1)},
                           repeats)


# ------------------------------------------------------------------ report


def _print_cost(task_name: str, rows: dict[str, dict[str, float]]) -> None:
    print(f"   {task_name}")
    for name, row in rows.items():
        print(f"     {name:<62} {row['ms']:8.1f} ms  {row['ratio']:5.2f}x  (per round {row['median_round_ratio']:.2f}x)")


def _print_agreement(task_name: str, result: dict[str, Any]) -> None:
    print(f"   {task_name} ({result['params']:,} params; default h = {result['default_h']:.1e})")
    for name, row in result["rows"].items():
        print(f"     {name:<44} value rel. error median {row['median_rel_error']:8.1e} max {row['max_rel_error']:8.1e}"
              f"   meta-gradient cosine min {row['min_cosine']:.5f}")
    for name, error in result["failures"].items():
        print(f"     {name:<44} fails: {error}")


def _per_task(results: dict[str, Any], key: str, measure: Callable[[str], dict[str, Any]],
              line: Callable[[str, Any], str]) -> None:
    """Run ``measure`` on both digits tasks, store its rows under ``key`` and print them."""
    results[key] = {}
    for task_name in ("mlp_digits", "conv_digits"):
        rows = measure(task_name)
        results[key][task_name] = rows
        print(f"   {task_name}")
        for name, row in rows.items():
            print(f"     {line(name, row)}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke-test budget; numbers mean little")
    parser.add_argument("--out", default="runs/bench/regularizer_cost.json")
    parser.add_argument("--parts", default="1,2,3,4,5,6,7,8", help="which measurements to run, e.g. 1,4")
    parser.add_argument("--langevin", action="store_true", help="add the Langevin local entropy to part 1 (slow)")
    args = parser.parse_args(argv)
    parts = {int(p) for p in args.parts.split(",")}
    torch.set_num_threads(1)
    rounds, per_round = (1, 1) if args.quick else (7, 2)
    results: dict[str, Any] = {"threads": 1, "torch": torch.__version__}
    configs = {**CONFIGS, **(LANGEVIN if args.langevin else {})}
    if 1 in parts:
        print("1. Meta-iteration cost (RNNProp, unroll 20, regularizer at every step), ÷ unregularized "
              "(medians of interleaved rounds)")
        results["meta_iteration"], results["targets"] = {}, {}
        for task_name in ("mlp_digits", "conv_digits"):
            rows = meta_iteration_cost(task_name, configs, rounds, per_round)
            results["meta_iteration"][task_name] = rows
            _print_cost(task_name, rows)
        print("   targets: the top-eigenvalue term (default options) at every step of a 20-step unroll, "
              "median over adjacent pairs of meta-steps (95% interval of the median; quartiles)")
        for task_name, bound in TARGETS.items():
            row = paired_ratio(task_name, CONFIGS[DEFAULT_TOP], 3 if args.quick else 60)
            row.update(bound=bound, verdict=target_verdict(row["ci_low"], row["ci_high"], bound))
            row["met"] = row["verdict"] == "met"
            results["targets"][task_name] = row
            print(f"     {task_name:<12} ≤ {bound:.1f}x: {row['ratio']:.2f}x ({row['ci_coverage']:.0%} interval "
                  f"{row['ci_low']:.2f}-{row['ci_high']:.2f}; quartiles {row['q1']:.2f}-{row['q3']:.2f}; "
                  f"{row['pairs']} pairs)  {row['verdict'].upper() if row['verdict'] != 'met' else 'met'}")
    if 2 in parts:
        print("\n2. Top eigenvalue along an Adam trajectory on mlp_digits: error vs exact eigvalsh")
        rows = warm_vs_cold(*((10, 5) if args.quick else (100, 10)))
        results["warm_vs_cold"] = rows
        print(f"   {'estimator':<38} {'median err':>10} {'max err':>9} {'residual':>9} {'bound held':>10} "
              f"{'HVP/call':>9} {'ms/call':>8}")
        for name, row in rows.items():
            print(f"   {name:<38} {row['median_rel_error']:10.2e} {row['max_rel_error']:9.2e} "
                  f"{row['median_rel_residual']:9.2e} {row['residual_bound_held']:10.0%} "
                  f"{row['hvps_per_call']:9.1f} {row['ms_per_call']:8.2f}")
    if 3 in parts:
        print("\n3. Against other libraries (mlp_digits after 100 Adam steps, batch 128; no early stop)")
        rows = against_libraries(1 if args.quick else 5)
        results["libraries"] = rows
        for name, row in rows.items():
            print(f"   {name:<54} {row['ms']:8.1f} ms   value {row['value']:8.4f}  exact {row['exact']:8.4f}  "
                  f"rel err {row['rel_error']:.1e}")
        for target in ("1e-02", "1e-03"):
            ours = min((r["ms"] for n, r in rows.items() if n.startswith(f"top eigenvalue to {target}: ours")),
                       default=float("nan"))
            theirs = [r["ms"] for n, r in rows.items() if n.startswith(f"top eigenvalue to {target}: PyHessian")]
            if theirs and theirs[0] == theirs[0]:
                results[f"speedup_vs_pyhessian_top_{target}"] = theirs[0] / ours
                print(f"   top eigenvalue to {target} relative error: ours is {theirs[0] / ours:.1f}x faster "
                      f"than PyHessian")
    if 4 in parts:
        print("\n4. Finite-difference products against exact ones, same probes, along RNNProp unrolls "
              "(meta-gradients w.r.t. the optimizer's weights)")
        starts = [(0, 0)] if args.quick else [(0, 0), (0, 50), (1, 0), (1, 50)]
        unroll = 2 if args.quick else 8
        sweep = () if args.quick else (1e-7, 3e-7, 3e-6, 1e-5, 3e-5, 1e-4)
        results["finite_difference"] = {}
        for task_name, options, primitive in (("mlp_digits", {}, False), ("conv_digits", {}, False),
                                              ("timm", VIT, True)):
            label = "timm ViT" if task_name == "timm" else task_name
            result = finite_difference_agreement(task_name, options, starts, unroll, sweep, primitive)
            results["finite_difference"][label] = result
            _print_agreement(label, result)
        if not args.quick:
            for term in ("top", "trace"):
                cosines = {label: r["rows"][f"{term}: finite difference (default h)"]["min_cosine"]
                           for label, r in results["finite_difference"].items()}
                verdict = "agrees" if min(cosines.values()) >= 0.99 else "does NOT agree"
                results[f"{term}_finite_difference_agrees"] = min(cosines.values()) >= 0.99
                print(f"   {term}: the finite difference at the default h {verdict} with the exact meta-gradient "
                      f"(cosine ≥ 0.99, the rule for a default) on every model: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in cosines.items()))
    if 5 in parts:
        print("\n5. A BatchNorm model: timm test_resnet on 16x16 images, batch 16")
        result = batch_norm_model(1 if args.quick else 3, 2 if args.quick else 5)
        result["agreement"] = finite_difference_agreement(
            "timm", RESNET, [(0, 0)] if args.quick else [(0, 0), (1, 0)], 2 if args.quick else 4,
            (), primitive_reference=True)
        results["batch_norm"] = result
        print(f"   {result['params']:,} params, unroll {result['unroll']}, ÷ unregularized:")
        for name, row in result["cost"].items():
            print(f"     {name:<46} {row['ms']:8.1f} ms  {row['ratio']:5.2f}x")
        for name, error in result["errors"].items():
            print(f"     {name:<46} fails: {error}")
        _print_agreement("timm test_resnet", result["agreement"])
    if 6 in parts:
        print("\n6. Smoothing local entropy (γ = 100): spread over repeated calls, independent vs antithetic draws")
        _per_task(results, "local_entropy_spread", partial(local_entropy_spread, repeats=5 if args.quick else 40),
                  lambda name, row: f"{name:<40} value std {row['value_std']:8.2e}   gradient relative spread "
                                    f"{row['grad_rel_spread']:.3f}")
    if 7 in parts:
        print("\n7. Where the time goes: one unrolled step's pieces, ms (medians of interleaved repeats)")
        _per_task(results, "step_profile", partial(step_profile, repeats=5 if args.quick else 40),
                  lambda name, ms: f"{name:<56} {ms:8.2f} ms")
    if 8 in parts:
        print("\n8. Routes around the third-order backward: vᵀHv and its derivative, per call (host's gradient "
              "included), ms, and agreement with the HVP route")
        results["third_order_routes"] = {}
        for label, task_name, options, primitive in (("mlp_digits", "mlp_digits", {}, False),
                                                     ("conv_digits", "conv_digits", {}, False),
                                                     ("timm ViT", "timm", VIT, True)):
            row = third_order_routes(task_name, options, 5 if args.quick else 40, primitive)
            results["third_order_routes"][label] = row
            print(f"   {label} ({row['params']:,} params)")
            for name, ms in row["ms"].items():
                print(f"     {name:<48} {ms:8.2f} ms")
            for name, acc in row["accuracy"].items():
                print(f"     {name:<48} fails: {acc['error']}" if "error" in acc else
                      f"     {name:<48} value rel. error {acc['value_rel_error']:8.1e}   derivative cosine "
                      f"{acc['derivative_cosine']:.5f}")
        waste = conv_double_backward_waste(5 if args.quick else 60)
        results["conv_double_backward"] = waste
        print("   conv layer on data (128x1x8x8, 8 filters 3x3), HVP: "
              + ", ".join(f"{name} {ms:.3f} ms" for name, ms in waste.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
