"""A plugin that raises inside a runtime hook stops training with a named error; the checkpoint survives."""

from __future__ import annotations

import pytest
import torch

from flat_l2o_plugin import FlatL2O, create_optimizer, create_task, hookimpl
from flat_l2o_plugin.errors import PluginHookError
from flat_l2o_plugin.testing import isolated_plugin_manager
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer
from flat_l2o_plugin.training.checkpoint import load_checkpoint


class FailsLater:
    """A third-party flatness term that breaks on its ``fail_at``-th call."""

    def __init__(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    @hookimpl
    def flatness_terms(self, params):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("boom")
        return {"extra": 0.0 * sum(p.sum() for p in params)}


def _trainer(run_dir, plugins=()):
    torch.manual_seed(0)
    task = create_task("mlp_digits", batch_size=32)
    pm = isolated_plugin_manager(*plugins)
    return MetaTrainer(create_optimizer("rnnprop"), lambda g: (task, 1000 + int(torch.randint(0, 99, (1,), generator=g))),
                       flat=FlatL2O(plugin_manager=pm), run_dir=run_dir,
                       config=MetaTrainConfig(meta_steps=6, unroll=2, horizon=4, val_every=0, checkpoint_every=1))


def test_hook_error_names_plugin_hook_and_step_and_leaves_the_checkpoint_intact(tmp_path):
    failing = FailsLater(fail_at=7)  # two calls per meta-step: fails during meta-step 3
    # Meta-step 3 unrolls optimizee steps 2 -> 4 of the second trajectory; the first term is at θ_3.
    with pytest.raises(PluginHookError, match=r"^meta-step 3, trajectory slot 0 \(task mlp_digits\[[^]]*\], init seed 10\d\d\): "
                                              r"plugin 'fails_later' raised in hook flatness_terms at optimizee step 3: "
                                              r"RuntimeError: boom$") as info:
        _trainer(tmp_path, [("fails_later", failing)]).train()
    assert isinstance(info.value.__cause__, RuntimeError)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.step == 3  # the last completed meta-step, written before the failure
    result = _trainer(tmp_path).train(resume=True)
    assert result.resumed_from == 3 and len(result.history) == 6
    assert all(torch.isfinite(torch.tensor(h["meta_loss"])) for h in result.history)


class FailsObserving:
    @hookimpl
    def after_unroll(self, step):
        if step == 2:
            raise ValueError("cannot log")


def test_an_observer_raising_names_the_meta_step(tmp_path):
    with pytest.raises(PluginHookError, match=r"^meta-step 2: plugin 'observer' raised in hook after_unroll at step 2: "
                                              r"ValueError: cannot log$"):
        _trainer(tmp_path, [("observer", FailsObserving())]).train()
