"""One flatness term, one behaviour: activated in the host's config or attached by a wrapper.

The estimators' state (the warm-started power-iteration probe, the probe generators,
the running scale of ``weighting="scale_free"``) is kept per trajectory slot and saved
in checkpoints, whichever route activated the regularizer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from meta_training_specs import SMALL_SPEC

from flat_l2o_plugin import FlatL2O, create_optimizer, create_task
from flat_l2o_plugin.errors import FlatL2OError
from flat_l2o_plugin.testing import isolated_plugin_manager
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer, read_metrics, run_meta_training
from flat_l2o_plugin.wrappers import FlatnessAware

REGULARIZERS = {
    "hessian_top_eigenvalue": {"weight": 0.1, "iters": 2, "weighting": "scale_free"},
    "hessian_trace": {"weight": 0.05, "probes": 2},
}


def _spec(route: str, meta_steps: int = 4) -> dict:
    spec = copy.deepcopy(SMALL_SPEC)
    spec["trainer"].update(meta_steps=meta_steps, imitation_prob=0.0, checkpoint_every=100)
    spec["val_tasks"] = 1
    if route == "host":
        spec["regularizers"] = copy.deepcopy(REGULARIZERS)
    else:
        spec["regularizers"] = {}
        spec["wrappers"] = [{"name": "flatness_aware", "regularizers": copy.deepcopy(REGULARIZERS)}]
    return spec


def _interrupt_at(step):
    def progress(meta_step):
        if meta_step == step:  # before meta-step `step` is checkpointed: `step` whole steps are saved
            raise KeyboardInterrupt

    return progress


def _records(run_dir):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run_dir)]


def test_host_and_attached_routes_are_one_run_at_meta_batch_two_across_a_kill_and_resume(tmp_path):
    assert SMALL_SPEC["trainer"]["meta_batch"] == 2
    run_meta_training(_spec("host"), tmp_path / "host")
    run_meta_training(_spec("attached"), tmp_path / "attached")
    with pytest.raises(KeyboardInterrupt):
        run_meta_training(_spec("attached"), tmp_path / "resumed", progress=_interrupt_at(2))
    run_meta_training(_spec("attached"), tmp_path / "resumed", resume=True)

    expected = _records(tmp_path / "host")
    assert all("term/hessian_top_eigenvalue" in r and "hessian_trace/value" in r for r in expected)
    assert _records(tmp_path / "attached") == expected
    assert _records(tmp_path / "resumed") == expected
    weights = load_file(tmp_path / "host" / "optimizer.safetensors")
    for route in ("attached", "resumed"):
        other = load_file(tmp_path / route / "optimizer.safetensors")
        assert all(torch.equal(other[k], v) for k, v in weights.items()), route


def test_a_wrapper_attached_after_the_trainer_was_built_is_refused():
    pm = isolated_plugin_manager()
    host = FlatL2O(plugin_manager=pm)
    wrapped = FlatnessAware(create_optimizer("rnnprop"), {"sharpness": {"weight": 0.1}}, plugin_manager=pm)
    task = create_task("mlp_digits", batch_size=16)
    trainer = MetaTrainer(wrapped, lambda g: (task, 1000), flat=host,
                          config=MetaTrainConfig(meta_steps=1, unroll=2, horizon=4, val_every=0))
    wrapped.attach(host)
    with pytest.raises(FlatL2OError, match=r"attached to the host after the trainer was built.*before"):
        trainer.train()
