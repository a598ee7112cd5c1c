"""The reference host loop: flatness terms reach φ, non-finite unrolls never do, seeds repeat."""

from __future__ import annotations

import math

import pytest
import torch

from flat_l2o_plugin import FlatL2O, create_optimizer, create_task, get_plugin_manager
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer

TINY = dict(meta_steps=1, unroll=3, horizon=6, val_every=0, clip=0.0)


@pytest.fixture(scope="module")
def task():
    return create_task("mlp_digits", batch_size=32)


def _meta_gradient(task, regularizers, *, seed=0, **config):
    torch.manual_seed(seed)
    optimizer = create_optimizer("rnnprop")
    pm = get_plugin_manager(entry_points=False)
    trainer = MetaTrainer(optimizer, lambda g: (task, 7), flat=FlatL2O(regularizers, plugin_manager=pm),
                          config=MetaTrainConfig(**{**TINY, **config}))
    logs = trainer.step(0)
    return [p.grad.clone() for p in optimizer.parameters()], logs


def test_regularizer_changes_the_meta_gradient(task):
    plain, _ = _meta_gradient(task, {})
    regularized, logs = _meta_gradient(task, {"hessian_top_eigenvalue": {"weight": 1.0, "iters": 5}})
    assert "term/hessian_top_eigenvalue" in logs and logs["hessian_top_eigenvalue/value"] > 0
    diff = sum((a - b).abs().sum() for a, b in zip(plain, regularized))
    assert diff > 1e-6 * sum(a.abs().sum() for a in plain)


def test_weight_zero_is_bit_identical_to_no_regularizer(task):
    plain, plain_logs = _meta_gradient(task, {})
    zero, zero_logs = _meta_gradient(task, {"hessian_top_eigenvalue": {"weight": 0.0}})
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    assert plain_logs["meta_loss"] == zero_logs["meta_loss"]
    assert "term/hessian_top_eigenvalue" not in zero_logs


def test_optimizee_loss_mode_changes_the_gradient_fed_to_the_optimizer(task):
    plain, _ = _meta_gradient(task, {})
    mode, logs = _meta_gradient(task, {"sharpness": {"weight": 1.0, "rho": 0.5, "mode": "optimizee_loss"}})
    assert "term/sharpness" not in logs  # not part of the meta-loss
    assert any(not torch.equal(a, b) for a, b in zip(plain, mode))


class _NaNAfter:
    """Wraps a task so that its loss is NaN from the ``n``-th call on."""

    def __init__(self, task, n):
        self.task, self.n, self.calls, self.name = task, n, 0, "nan_task"

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, params, batch):
        self.calls += 1
        value = self.task.loss(params, batch)
        return value * math.nan if self.calls >= self.n else value


def test_non_finite_unroll_is_skipped_counted_and_never_applied(task):
    torch.manual_seed(0)
    optimizer = create_optimizer("rnnprop")
    before = [p.detach().clone() for p in optimizer.parameters()]
    nan_task = _NaNAfter(task, n=2)
    trainer = MetaTrainer(optimizer, lambda g: (nan_task, 0), flat=FlatL2O(),
                          config=MetaTrainConfig(meta_steps=3, unroll=3, horizon=6, val_every=0))
    result = trainer.train()
    assert result.skipped == 3
    assert all(h["skipped"] for h in result.history)
    assert result.history[0]["diverged_task"] == "nan_task"
    assert all(torch.equal(a, b) for a, b in zip(before, optimizer.parameters()))
    assert all(torch.isfinite(p).all() for p in optimizer.parameters())


def test_training_continues_after_a_divergent_trajectory(task):
    torch.manual_seed(0)
    optimizer = create_optimizer("rnnprop")
    calls = {"n": 0}

    def sample(generator):
        calls["n"] += 1
        return (_NaNAfter(task, n=1) if calls["n"] == 1 else task), 3

    trainer = MetaTrainer(optimizer, sample, flat=FlatL2O(),
                          config=MetaTrainConfig(meta_steps=3, unroll=2, horizon=4, val_every=0))
    result = trainer.train()
    assert [h["skipped"] for h in result.history] == [True, False, False]
    assert all(torch.isfinite(p).all() for p in optimizer.parameters())


def test_same_seed_same_metrics(task):
    def run():
        torch.manual_seed(0)
        optimizer = create_optimizer("rnnprop")
        sample = lambda g: (task, int(torch.randint(0, 1000, (1,), generator=g)))  # noqa: E731
        trainer = MetaTrainer(optimizer, sample, flat=FlatL2O({"hessian_top_eigenvalue": {"weight": 0.1}}),
                              val_tasks=[(task, 100)],
                              config=MetaTrainConfig(meta_steps=4, unroll=2, horizon=4, val_every=2, val_steps=5,
                                                     seed=5))
        result = trainer.train()
        return [{k: v for k, v in h.items() if k != "seconds"} for h in result.history]

    assert run() == run()


def test_validation_keeps_the_best_checkpoint(task):
    torch.manual_seed(0)
    optimizer = create_optimizer("rnnprop")
    trainer = MetaTrainer(optimizer, lambda g: (task, 11), flat=FlatL2O(), val_tasks=[(task, 100)],
                          config=MetaTrainConfig(meta_steps=6, unroll=2, horizon=4, val_every=2, val_steps=10))
    result = trainer.train()
    assert [v["meta_step"] for v in result.validation] == [2, 4, 6]
    assert result.best_score == max(v["val_accuracy"] for v in result.validation)
    assert trainer.validate()["val_accuracy"] == pytest.approx(result.best_score)


def test_after_unroll_sees_every_meta_step(task):
    from flat_l2o_plugin import hookimpl

    seen = []

    class Observer:
        @hookimpl
        def after_unroll(self, step, logs):
            seen.append((step, logs["meta_loss"]))

    pm = get_plugin_manager(entry_points=False, plugins=[("observer", Observer())])
    optimizer = create_optimizer("rnnprop")
    trainer = MetaTrainer(optimizer, lambda g: (task, 1), flat=FlatL2O(plugin_manager=pm),
                          config=MetaTrainConfig(meta_steps=3, unroll=2, horizon=4, val_every=0))
    trainer.train()
    assert [s for s, _ in seen] == [0, 1, 2] and all(math.isfinite(v) for _, v in seen)


@pytest.mark.parametrize("bad", [{"unroll": 0}, {"horizon": 7, "unroll": 2}, {"meta_lr": 0.0}])
def test_config_errors_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MetaTrainConfig(**bad)


def test_meta_training_never_touches_the_test_split(task):
    splits = []

    class Spy:
        def __init__(self, inner):
            self.inner, self.name = inner, inner.name

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def evaluate(self, params, split="test"):
            splits.append(split)
            return self.inner.evaluate(params, split)

    spy = Spy(task)
    trainer = MetaTrainer(create_optimizer("rnnprop"), lambda g: (spy, 1), flat=FlatL2O(), val_tasks=[(spy, 100)],
                          config=MetaTrainConfig(meta_steps=2, unroll=2, horizon=4, val_every=1, val_steps=3))
    trainer.train()
    assert splits and set(splits) == {"val"}


def test_tasks_without_accuracy_validate_on_minus_the_loss():
    task = create_task("quadratic", dim=5)
    trainer = MetaTrainer(create_optimizer("rnnprop"), lambda g: (task, 1), flat=FlatL2O(), val_tasks=[(task, 100)],
                          config=MetaTrainConfig(meta_steps=2, unroll=2, horizon=4, val_every=1, val_steps=5))
    result = trainer.train()
    assert all("val_accuracy" not in v and v["val_score"] == -v["val_loss"] for v in result.validation)
    assert result.best_score == max(v["val_score"] for v in result.validation)


# ----------------------------------------------------------------- the host's gradient graph


class _Float64:
    """A task in float64, so that summation order is the only difference between two runs."""

    def __init__(self, task):
        self.task, self.name = task, f"{task.name}[float64]"

    def __getattr__(self, name):
        return getattr(self.task, name)

    def init_params(self, seed):
        return [p.double() for p in self.task.init_params(seed)]


class _Classic:
    """A regularizer written as ``reg(params, loss_fn)``: it never sees the host's loss or gradient."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, params, loss_fn):
        return self.inner(params, loss_fn)


def _float64_meta_gradient(task, regularizers, classic):
    torch.manual_seed(0)
    optimizer = create_optimizer("rnnprop").double()
    flat = FlatL2O(regularizers, plugin_manager=get_plugin_manager(entry_points=False))
    if classic:
        for active in flat.active.values():
            active.regularizer = _Classic(active.regularizer)
            active.accepts = frozenset()
    trainer = MetaTrainer(optimizer, lambda g: (task, 7), flat=flat, config=MetaTrainConfig(**TINY))
    logs = trainer.step(0)
    return [p.grad.clone() for p in optimizer.parameters()], logs


@pytest.mark.parametrize("regularizers", [
    pytest.param({"hessian_top_eigenvalue": {"weight": 1.0, "products": "hvp", "seed": 0}}, id="top_eigenvalue_hvp"),
    pytest.param({"hessian_trace": {"weight": 0.1, "probes": 2, "products": "hvp", "seed": 0}}, id="trace_hvp"),
    pytest.param({"sharpness": {"weight": 1.0}}, id="sharpness"),
])
def test_the_hosts_gradient_graph_leaves_the_meta_gradient_as_it_was(task, regularizers):
    """The trainer builds ∇f(θ_t) once, for the regularizers and for its own next step.

    In float64 the two runs differ only by the order in which the meta-backward sums
    the same terms: relative differences of order 1e-13, far below 1e-9.
    """
    task64 = _Float64(task)
    shared, shared_logs = _float64_meta_gradient(task64, regularizers, classic=False)
    own, own_logs = _float64_meta_gradient(task64, regularizers, classic=True)
    assert shared_logs["meta_loss"] == pytest.approx(own_logs["meta_loss"], rel=1e-12)
    for a, b in zip(shared, own):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_finite_difference_term_through_the_trainer_matches_the_hvp_term(task):
    # The same probes and steps; only the final quotient differs (see test_finite_difference).
    task64 = _Float64(task)
    exact, _ = _float64_meta_gradient(task64, {"hessian_top_eigenvalue": {"weight": 1.0, "products": "hvp",
                                                                          "seed": 0}}, classic=False)
    plain, _ = _float64_meta_gradient(task64, {}, classic=False)
    approx, _ = _float64_meta_gradient(task64, {"hessian_top_eigenvalue": {
        "weight": 1.0, "products": "finite_difference", "seed": 0}}, classic=False)
    term_exact = torch.cat([(a - b).reshape(-1) for a, b in zip(exact, plain)])
    term_approx = torch.cat([(a - b).reshape(-1) for a, b in zip(approx, plain)])
    cosine = float(term_exact @ term_approx / (term_exact.norm() * term_approx.norm()))
    assert cosine > 0.999


def test_the_trainer_hands_its_gradient_graph_over_and_old_plugins_still_run(task):
    import good_plugin
    import host_values_plugin
    from flat_l2o_plugin.testing import isolated_plugin_manager

    flat = FlatL2O({"l2_norm": {"weight": 1e-3}, "sees_grads": {"weight": 1e-3}, "sees_loss": {"weight": 1e-3}},
                   plugin_manager=isolated_plugin_manager(good_plugin, host_values_plugin))
    trainer = MetaTrainer(create_optimizer("rnnprop"), lambda g: (task, 7), flat=flat, config=MetaTrainConfig(**TINY))
    logs = trainer.step(0)
    # A plugin written as reg(params, loss_fn) runs at every step, as before.
    assert flat.active["l2_norm"].regularizer.calls == TINY["unroll"]
    assert logs["term/l2_norm"] > 0 and math.isfinite(logs["meta_loss"])
    # One that names grads gets the host's gradient graph at every step, ...
    handed = flat.active["sees_grads"].regularizer.seen
    assert len(handed) == TINY["unroll"] and all(g is not None and all(x.requires_grad for x in g) for g in handed)
    # ... and one that names loss the host's loss, of the very function it evaluates.
    seen = flat.active["sees_loss"].regularizer.seen
    assert len(seen) == TINY["unroll"] and all(loss is not None and float(loss.detach()) == again
                                                for loss, again in seen)


def test_a_third_party_plugin_written_for_reg_params_loss_fn_runs_unchanged(task):
    """A plugin that knows only the documented ``reg(params, loss_fn)`` contract and the
    ``flatness_terms`` hook as it was before ``grads``: both run at every step, are called
    exactly as before, and their terms reach the meta-gradient."""
    from flat_l2o_plugin import RegularizerInfo, hookimpl
    from flat_l2o_plugin.testing import isolated_plugin_manager

    calls: list[tuple[int, list[str]]] = []

    class GradientNorm:
        # Its own names for the two arguments, and a catch-all it forwards nowhere.
        def __call__(self, theta, f, *args, **kwargs):
            calls.append((len(args), sorted(kwargs)))
            g = torch.autograd.grad(f(theta), theta, create_graph=True)
            return sum((x * x).sum() for x in g)

    hook_steps: list[int] = []

    class ThirdParty:
        @hookimpl
        def register_regularizers(self, register):
            register(RegularizerInfo(name="gradient_norm", factory=GradientNorm, description="‖∇f‖²"))

        @hookimpl
        def flatness_terms(self, params, loss_fn, step, loss):  # the hook's arguments before grads
            hook_steps.append(step)
            return {"third_party_hook": 1e-3 * (loss_fn(params) - loss.detach()) ** 2 + 1e-3 * loss_fn(params)}

    def meta_gradient(regularizers, plugin):
        torch.manual_seed(0)
        optimizer = create_optimizer("rnnprop")
        flat = FlatL2O(regularizers, plugin_manager=isolated_plugin_manager(*plugin))
        logs = MetaTrainer(optimizer, lambda g: (task, 7), flat=flat, config=MetaTrainConfig(**TINY)).step(0)
        return [p.grad.clone() for p in optimizer.parameters()], logs

    plain, _ = meta_gradient({}, ())
    # The hessian term makes the trainer build its gradient graph: the classic plugin must
    # still get nothing but (params, loss_fn).
    regularized, logs = meta_gradient({"gradient_norm": {"weight": 1.0},
                                       "hessian_top_eigenvalue": {"weight": 1e-3, "seed": 0}}, (ThirdParty(),))
    assert calls == [(0, [])] * TINY["unroll"]
    assert hook_steps == list(range(1, TINY["unroll"] + 1))
    assert logs["term/gradient_norm"] > 0 and "term/third_party_hook" in logs
    assert all(torch.isfinite(g).all() for g in regularized)
    assert sum(float((a - b).abs().sum()) for a, b in zip(plain, regularized)) > 0
