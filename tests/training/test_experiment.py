"""The experiment building blocks the benchmarks share: baselines by name, the flatness measures, wrapped runs."""

from __future__ import annotations

import math

import pytest
import torch

from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.training.experiment import baseline_class, evaluate, meta_train, smoothed_loss


def test_smoothed_loss_is_the_local_entropy_without_its_constant_on_a_quadratic():
    # f = ½ θᵀAθ: E exp(−f(θ+ε)), ε ~ N(0, I/γ), has a closed form, so −log of it is exact:
    # ½ θᵀ(A⁻¹ + I/γ)⁻¹θ + ½ log det(I + A/γ).
    a = torch.diag(torch.tensor([2.0, 0.5, 8.0], dtype=torch.float64))
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    gamma, samples = 20.0, 200_000
    eye = torch.eye(3, dtype=torch.float64)

    def minus_log_mean(m: torch.Tensor) -> float:
        """−log E exp(−½(θ+ε)ᵀM(θ+ε)), ε ~ N(0, I/γ)."""
        return float(0.5 * theta @ torch.linalg.inv(torch.linalg.inv(m) + eye / gamma) @ theta
                     + 0.5 * torch.logdet(eye + m / gamma))

    exact = minus_log_mean(a)
    value = smoothed_loss(lambda p: 0.5 * p[0] @ a @ p[0], [theta], gamma=gamma, samples=samples, seed=0)
    # −log of a mean of n draws w = exp(−f(θ+ε)): by the delta method its standard error
    # is the relative spread of w over √n, with E w² = exp(−minus_log_mean(2A)); its bias
    # is about half the relative variance over n.
    relative_variance = math.exp(2 * exact - minus_log_mean(2 * a)) - 1
    assert abs(value - exact) <= 5 * math.sqrt(relative_variance / samples) + relative_variance / samples
    # Flatter (smaller A) means a smaller excess over f(θ).
    flat = smoothed_loss(lambda p: 0.5 * p[0] @ (a / 10) @ p[0], [theta], gamma=gamma, samples=20_000, seed=0)
    assert flat - float(0.5 * theta @ (a / 10) @ theta) < value - float(0.5 * theta @ a @ theta)


def test_baselines_by_name_or_import_path():
    from flat_l2o_plugin.baselines import SAM, EntropySGD

    assert baseline_class("adam") is torch.optim.Adam
    assert (baseline_class("sam"), baseline_class("entropy_sgd")) == (SAM, EntropySGD)
    assert baseline_class("torch.optim:RMSprop") is torch.optim.RMSprop
    with pytest.raises(ConfigError, match="'nonsense'"):
        baseline_class("nonsense")
    with pytest.raises(ConfigError, match="cannot import"):
        baseline_class("torch.optim:NoSuchOptimizer")


class CountingClosureSGD(torch.optim.SGD):
    """SGD that asks for a closure, re-evaluates it once and checks it sees the same batch's loss."""

    uses_closure = True
    closure_losses: list[float] = []

    def step(self, closure=None):
        assert closure is not None
        grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]
        loss = closure()
        regrads = [p.grad for group in self.param_groups for p in group["params"]]
        assert all(torch.allclose(g, r) for g, r in zip(grads, regrads)), "closure used another batch"
        type(self).closure_losses.append(float(loss))
        return super().step()


def test_evaluate_passes_a_same_batch_closure_to_optimizers_that_use_one():
    CountingClosureSGD.closure_losses = []
    result = evaluate(baseline={"name": f"{__name__}:CountingClosureSGD", "lr": 0.1}, task=("mlp_digits", {}),
                      seed=0, steps=6, flatness=False)
    assert len(CountingClosureSGD.closure_losses) == 6
    assert result["diverged_at"] is None


def test_wrapped_learned_optimizer_is_meta_trained_and_evaluated_with_its_stack():
    run = meta_train(optimizer="rnnprop", wrappers=[{"name": "sam_gradient", "rho": 0.05}],
                     trainer={"meta_steps": 2, "unroll": 2, "horizon": 4, "val_every": 1, "val_steps": 4},
                     seed=0, val_tasks=1)
    assert run["wrappers"] == [{"name": "sam_gradient", "rho": 0.05}]
    learned = {"name": "rnnprop", "wrappers": run["wrappers"], "state_dict": run["state_dict"]}
    result = evaluate(learned=learned, task=("mlp_digits", {}), seed=0, steps=8, curve_points=4,
                      curve_flatness=True, entropy_gamma=1000.0)
    assert math.isfinite(result["top_eigenvalue"]) and math.isfinite(result["smoothed_loss"])
    assert len(result["curve"]["top_eigenvalue"]) == len(result["curve"]["step"]) == 5
    # The last curve point is the final point, measured by the same seeded estimator.
    assert result["curve"]["top_eigenvalue"][-1] == result["top_eigenvalue"]


def test_meta_training_on_a_task_family_draws_every_member(monkeypatch):
    """Trajectories draw their task from the family; validation cycles through it."""
    from flat_l2o_plugin.training import meta_trainer

    drawn, validated = [], []
    original_new, original_validate = meta_trainer.MetaTrainer._new_trajectory, meta_trainer.MetaTrainer.validate

    def new_trajectory(self, slot):
        traj = original_new(self, slot)
        drawn.append(traj.task.name)
        return traj

    def validate(self):
        validated.extend(task.name for task, _ in self.val_tasks)
        return original_validate(self)

    monkeypatch.setattr(meta_trainer.MetaTrainer, "_new_trajectory", new_trajectory)
    monkeypatch.setattr(meta_trainer.MetaTrainer, "validate", validate)
    tasks = [("mlp", {"dataset": "digits", "hidden_sizes": [4], "activation": "tanh", "batch_size": 16}),
             ("mlp", {"dataset": "digits", "hidden_sizes": [6], "activation": "tanh", "batch_size": 16})]
    meta_train(optimizer="learned_correction", optimizer_options={"hidden_size": 4}, tasks=tasks, val_tasks=2,
               trainer={"meta_steps": 8, "unroll": 2, "horizon": 2, "val_every": 8, "val_steps": 2})
    assert set(drawn) == {"mlp_digits[64-4-10,tanh]", "mlp_digits[64-6-10,tanh]"}
    assert validated == ["mlp_digits[64-4-10,tanh]", "mlp_digits[64-6-10,tanh]"]


def test_meta_training_seeds_python_and_numpy_as_well_as_torch(monkeypatch):
    """A task or plugin drawing from ``random`` or ``np.random`` sees the same stream on every run."""
    import random

    import numpy as np

    from flat_l2o_plugin.training import experiment
    from flat_l2o_plugin.training.seeding import seed_everything

    seen = []
    original = experiment._task

    def task_drawing_globals(spec):  # a task that samples from the global generators when built
        seen.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
        return original(spec)

    monkeypatch.setattr(experiment, "_task", task_drawing_globals)
    for scramble in (1, 2):
        random.seed(scramble), np.random.seed(scramble), torch.manual_seed(scramble)
        meta_train(optimizer="learned_correction", optimizer_options={"hidden_size": 4}, seed=7, val_tasks=1,
                   trainer={"meta_steps": 1, "unroll": 1, "horizon": 1, "val_every": 0, "val_steps": 1})
    assert seen[0] == seen[1]
    seed_everything(7)  # the optimizer's init draws from torch first; Python and NumPy are untouched until the task
    assert seen[0][:2] == (random.random(), float(np.random.rand()))
