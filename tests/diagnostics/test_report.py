"""The flatness report against exact Hessians, closed forms and hessian-eigenthings.

The reference model is our own MLP task (64-4-10, sigmoid, digits) in float64 at a
minimum found by L-BFGS, measured on the whole training split; its nn.Module twin for
hessian-eigenthings is two ``nn.Linear`` layers holding the same tensors.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import hessian_eigenthings as he
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flat_l2o_plugin import create_task
from flat_l2o_plugin.diagnostics import FlatnessReport, flatness_report, plot_density, task_flatness
from flat_l2o_plugin.errors import ConfigError

DTYPE = torch.float64


def exact_hessian(loss_fn, params: list[Tensor]) -> Tensor:
    sizes = [p.numel() for p in params]

    def flat_loss(v: Tensor) -> Tensor:
        return loss_fn([piece.reshape(p.shape) for piece, p in zip(torch.split(v, sizes), params)])

    return torch.autograd.functional.hessian(flat_loss, torch.cat([p.reshape(-1) for p in params]))


def hutchinson_std(hessian: Tensor, probes: int) -> float:
    """Exact standard deviation of the mean of ``probes`` Rademacher samples vᵀHv."""
    off_diagonal = (hessian**2).sum() - (torch.diagonal(hessian) ** 2).sum()
    return math.sqrt(2.0 * float(off_diagonal) / probes)


def as_module(params: list[Tensor]) -> nn.Module:
    """The nn.Module computing the same function as MLPTask with one hidden sigmoid layer."""
    w1, b1, w2, b2 = params
    model = nn.Sequential(nn.Linear(w1.shape[1], w1.shape[0]), nn.Sigmoid(), nn.Linear(w2.shape[1], w2.shape[0]))
    model = model.to(DTYPE)
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[0].bias.copy_(b1)
        model[2].weight.copy_(w2)
        model[2].bias.copy_(b2)
    return model


def reference_operator(mlp: SimpleNamespace) -> he.HessianOperator:
    """hessian-eigenthings' Hessian of the same loss: one batch, the whole training split."""
    x, y = mlp.batch
    # MLPTask casts inputs to the params' dtype; an nn.Module needs them cast beforehand.
    return he.HessianOperator(as_module(mlp.params), [(x.to(DTYPE), y)], he.supervised_loss(F.cross_entropy))


@pytest.fixture(scope="module")
def trained_mlp() -> SimpleNamespace:
    task = create_task("mlp_digits", hidden_sizes=(4,))
    batch = task.full_batch("train")
    params = [p.to(DTYPE).requires_grad_(True) for p in task.init_params(0)]
    optimizer = torch.optim.LBFGS(params, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = task.loss(params, batch)
        loss.backward()
        return loss

    optimizer.step(closure)
    params = [p.detach() for p in params]

    def loss_fn(p):
        return task.loss(p, batch)

    hessian = exact_hessian(loss_fn, params)
    # L-BFGS ends at a slightly different point on every CPU, so the spectrum's gaps vary. A
    # budget of d Lanczos steps per eigenvalue lets each run meet the residual rule whatever
    # the gaps (at worst by spanning the whole space); it stops far earlier in practice.
    report = task_flatness(task, params, top_k=3, trace_probes=64, slq_probes=8, lanczos_steps=40,
                           gammas=(100.0, 1000.0), entropy_samples=32, eigen_steps=310, seed=0)
    return SimpleNamespace(task=task, batch=batch, params=params, loss_fn=loss_fn, hessian=hessian,
                           eigenvalues=torch.linalg.eigvalsh(hessian), report=report)


def test_top_eigenvalues_match_the_exact_hessian_and_hessian_eigenthings(trained_mlp, rounding):
    exact = sorted(trained_mlp.eigenvalues.tolist(), key=abs, reverse=True)[:3]
    report = trained_mlp.report
    ours, residuals = list(report.top_eigenvalues), list(report.top_residuals)
    slack = rounding(trained_mlp.hessian)
    tol = report.settings["eigen_tol"]
    for value, residual, reference in zip(ours, residuals, exact):
        # The measured residual bounds the error; the stopping rule bounds the residual.
        assert abs(value - reference) <= residual + slack
        assert residual <= tol * math.hypot(*ours) + slack

    # hessian-eigenthings stops on its own rule: bound its values by the residual of its
    # vectors, measured with its own operator (so a different Hessian would show).
    operator = reference_operator(trained_mlp)
    reference = he.deflated_power_iteration(operator, k=3, max_iter=1000, tol=1e-8, seed=0)
    for theirs, vector, value, residual, exact_value in zip(
            reference.eigenvalues.tolist(), reference.eigenvectors, ours, residuals, exact):
        theirs_residual = float(torch.linalg.vector_norm(operator.matvec(vector) - theirs * vector))
        assert abs(theirs - exact_value) <= theirs_residual + slack
        assert abs(value - theirs) <= residual + theirs_residual + 2 * slack


def test_top_eigenvalues_of_a_clustered_spectrum_are_within_their_residuals(rounding):
    # The third and fourth eigenvalues 1e-4 apart, as on the MLP above on some CPUs: a rule
    # on the change of the estimate stops far from the third.
    eigenvalues = torch.tensor([3.0, 1.0, 0.5001, 0.5, 0.4, 0.3] + [0.1] * 14, dtype=DTYPE)
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=DTYPE))
    a = q @ torch.diag(eigenvalues) @ q.T
    a = 0.5 * (a + a.T)
    report = flatness_report(lambda p: 0.5 * p[0] @ a @ p[0], [torch.zeros(20, dtype=DTYPE)], top_k=4,
                             trace_probes=2, slq_probes=1, lanczos_steps=4, gammas=(100.0,), entropy_samples=2)
    tol = report.settings["eigen_tol"]
    assert tol == 1e-6
    for value, residual, exact in zip(report.top_eigenvalues, report.top_residuals, eigenvalues[:4].tolist()):
        assert abs(value - exact) <= tol * abs(exact) + rounding(a)
        assert abs(value - exact) <= residual + rounding(a)


def test_trace_matches_the_exact_hessian_and_hessian_eigenthings(trained_mlp):
    exact = float(trained_mlp.eigenvalues.sum())
    std = hutchinson_std(trained_mlp.hessian, probes=64)
    report = trained_mlp.report
    assert report.settings["trace_probes"] == 64
    assert abs(report.trace - exact) < 4 * std
    # The reported standard error comes from 8 batches (7 degrees of freedom): within a
    # factor of about 2.5 of the true one, outside with probability < 1e-3.
    assert 0.4 * std < report.trace_stderr < 2.5 * std
    # Lanczos probes give a second Hutchinson estimate, from 8 probes.
    assert abs(report.slq_trace - exact) < 4 * hutchinson_std(trained_mlp.hessian, probes=8)

    operator = reference_operator(trained_mlp)
    # Hutch++ with 3d products sketches the whole space: the exact trace of *its* operator,
    # which checks that the nn.Module twin is the same function as our task.
    assert he.trace(operator, num_matvecs=3 * operator.size, method="hutch++", seed=0).estimate == \
        pytest.approx(exact, rel=1e-9)
    reference = he.hutchinson(operator, num_samples=64, seed=0)
    assert abs(reference.estimate - exact) < 4 * std
    assert abs(report.trace - reference.estimate) < 4 * math.sqrt(2) * std


def test_spectral_density_integrates_to_one_and_spans_the_spectrum(trained_mlp, rounding):
    report = trained_mlp.report
    grid, density = report.density_grid, report.density
    assert float(torch.trapezoid(torch.tensor(density), torch.tensor(grid))) == pytest.approx(1.0, abs=1e-4)
    assert grid[0] < float(trained_mlp.eigenvalues.min()) and grid[-1] > float(trained_mlp.eigenvalues.max())
    # Each probe's top node is within its Ritz residual r of λ_max (within r²/gap, gap to
    # λ₂), and 40 steps leave r small: the extreme nodes converge first.
    exact = trained_mlp.eigenvalues
    slack = rounding(trained_mlp.hessian)
    for nodes, residuals in zip(report.quadrature_nodes, report.quadrature_residuals):
        top, residual = nodes[-1], residuals[-1]
        assert float(exact[-1]) - residual**2 / (top - float(exact[-2])) - slack <= top <= float(exact[-1]) + slack
        assert residual < 1e-3 * top
    assert all(sum(w) == pytest.approx(1.0, abs=1e-10) for w in report.quadrature_weights)


def test_report_loss_is_the_full_split_loss(trained_mlp):
    report = trained_mlp.report
    assert report.loss == pytest.approx(float(trained_mlp.loss_fn(trained_mlp.params)), rel=1e-12)
    assert report.task == trained_mlp.task.name and report.split == "train"
    assert report.num_params == 310
    val = task_flatness(trained_mlp.task, trained_mlp.params, split="val", top_k=1, trace_probes=2,
                        slq_probes=1, lanczos_steps=5, gammas=(100.0,), entropy_samples=4)
    val_loss = float(trained_mlp.task.loss(trained_mlp.params, trained_mlp.task.full_batch("val")))
    assert val.split == "val" and val.loss == pytest.approx(val_loss, rel=1e-12)


def quadratic(dim: int = 6, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    eigenvalues = torch.linspace(0.5, 3.0, dim, dtype=DTYPE)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DTYPE))
    a = q @ torch.diag(eigenvalues) @ q.T
    theta = torch.randn(dim, generator=g, dtype=DTYPE)
    return 0.5 * (a + a.T), eigenvalues, theta / theta.norm()


def local_entropy(a: Tensor, theta: Tensor, gamma: float) -> float:
    """F(θ; γ) of f = ½θᵀAθ at temperature 1: a Gaussian integral in closed form."""
    m = a + gamma * torch.eye(len(theta), dtype=DTYPE)
    return float(0.5 * len(theta) * math.log(2 * math.pi) - 0.5 * torch.logdet(m)
                 + 0.5 * gamma**2 * theta @ torch.linalg.solve(m, theta) - 0.5 * gamma * theta @ theta)


def test_local_entropy_matches_the_closed_form_on_a_quadratic(rounding):
    a, eigenvalues, theta = quadratic()
    report = flatness_report(lambda p: 0.5 * p[0] @ a @ p[0], [theta], top_k=2, trace_probes=8, slq_probes=2,
                             lanczos_steps=6, gammas=(50.0, 500.0), entropy_samples=256, seed=0)
    assert list(report.local_entropy) == [50.0, 500.0]
    for gamma, value in report.local_entropy.items():
        # Draws move f by ~0.2 nats at γ = 50: Monte-Carlo error ~0.2/√256, bias far smaller.
        assert value == pytest.approx(local_entropy(a, theta, gamma), abs=0.05)
    for value, residual, exact in zip(report.top_eigenvalues, report.top_residuals, [3.0, 2.5]):
        assert abs(value - exact) <= residual + rounding(a)
        assert residual <= report.settings["eigen_tol"] * math.hypot(*report.top_eigenvalues) + rounding(a)
    # Six steps on d = 6 span the space: every node is an eigenvalue, to rounding.
    assert len(report.quadrature_nodes[0]) == 6
    for node, residual, exact in zip(report.quadrature_nodes[0], report.quadrature_residuals[0], eigenvalues):
        assert abs(node - float(exact)) <= residual + rounding(a)


def test_json_holds_every_measurement_and_the_settings(trained_mlp):
    report = trained_mlp.report
    data = json.loads(report.to_json())
    assert data == json.loads(json.dumps(report.as_dict()))
    assert data["top_eigenvalues"] == list(report.top_eigenvalues)
    assert data["trace"] == report.trace and data["trace_stderr"] == report.trace_stderr
    assert data["local_entropy"] == [{"gamma": g, "local_entropy": v} for g, v in report.local_entropy.items()]
    assert len(data["density_grid"]) == len(data["density"]) == data["settings"]["density_points"] == 1024
    assert data["slq_trace"] == pytest.approx(report.slq_trace)
    assert data["settings"]["gammas"] == [100.0, 1000.0] and data["settings"]["dtype"] == "float64"
    assert data["task"] == trained_mlp.task.name


def test_a_single_trace_probe_has_no_stderr_and_serializes_as_null():
    a, _, theta = quadratic(dim=3)
    report = flatness_report(lambda p: 0.5 * p[0] @ a @ p[0], [theta], top_k=1, trace_probes=1, slq_probes=1,
                             lanczos_steps=3, gammas=(100.0,), entropy_samples=4)
    assert report.trace_stderr is None and json.loads(report.to_json())["trace_stderr"] is None
    assert isinstance(report, FlatnessReport)


def test_same_seed_same_report_and_dtype_promotion(rounding):
    a, _, theta = quadratic(dim=5, seed=3)
    kw = dict(top_k=2, trace_probes=4, slq_probes=2, lanczos_steps=4, gammas=(100.0,), entropy_samples=8, seed=7)
    first = flatness_report(lambda p: 0.5 * p[0] @ a @ p[0], [theta], **kw)
    again = flatness_report(lambda p: 0.5 * p[0] @ a @ p[0], [theta], **kw)
    assert first.as_dict() == again.as_dict()
    promoted = flatness_report(lambda p: 0.5 * p[0] @ a @ p[0], [theta.float()], dtype=DTYPE, **kw)
    assert promoted.settings["dtype"] == "float64"
    # The Hessian of a quadratic does not depend on θ: both are within their residuals of
    # the same eigenvalues.
    for ours, theirs, r1, r2 in zip(promoted.top_eigenvalues, first.top_eigenvalues, promoted.top_residuals,
                                    first.top_residuals):
        assert abs(ours - theirs) <= r1 + r2 + 2 * rounding(a)


def test_plot_density_writes_a_png(trained_mlp, tmp_path):
    path = plot_density(trained_mlp.report, tmp_path / "density.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize(
    ("options", "match"),
    [({"top_k": 0}, "top_k"), ({"top_k": 10}, "exceeds"), ({"gammas": (10.0, 0.0)}, "gamma"),
     ({"slq_probes": 1.5}, "slq_probes"), ({"sigma": -1.0}, "sigma")],
)
def test_bad_settings_raise_config_errors_naming_them(options, match):
    a, _, theta = quadratic(dim=3)
    base = dict(top_k=1, trace_probes=1, slq_probes=1, lanczos_steps=2, gammas=(100.0,), entropy_samples=2)
    with pytest.raises(ConfigError, match=match):
        flatness_report(lambda p: 0.5 * p[0] @ a @ p[0], [theta], **{**base, **options})


def test_a_diverged_optimizee_is_refused():
    a, _, theta = quadratic(dim=3)
    with pytest.raises(ConfigError, match="not finite"):
        flatness_report(lambda p: 0.5 * p[0] @ a @ p[0], [theta * float("nan")])


def test_task_flatness_needs_a_full_batch_and_a_known_split(trained_mlp):
    class NoFullBatch:
        name = "streaming"

        def loss(self, params, batch):
            raise AssertionError("not reached")

    with pytest.raises(ConfigError, match="full_batch"):
        task_flatness(NoFullBatch(), trained_mlp.params)
    with pytest.raises(ConfigError, match="bogus"):
        task_flatness(trained_mlp.task, trained_mlp.params, split="bogus")
