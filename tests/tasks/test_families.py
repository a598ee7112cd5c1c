"""Task families: deterministic sampling, task reuse, held-out tasks never met in meta-training."""

from __future__ import annotations

import pytest
import torch

from flat_l2o_plugin import create_optimizer
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.tasks import MLPTask, TaskFamily, create_family
from flat_l2o_plugin.tasks.families import FAMILIES, mlp_family
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer


def _digits_family(**options):  # noqa: ANN003, ANN202
    return mlp_family(dataset="digits", widths=(4, 8), depths=(1, 2), activations=("relu", "tanh"),
                      batch_size=32, **options)


def test_sampling_is_a_function_of_the_generator():
    family = _digits_family(subset_size=200, num_subsets=3)
    first = [family.sample_spec(torch.Generator().manual_seed(7)) for _ in range(3)]
    again = [family.sample_spec(torch.Generator().manual_seed(7)) for _ in range(3)]
    assert first == again
    generator = torch.Generator().manual_seed(0)
    specs = [family.sample_spec(generator) for _ in range(200)]
    # Every architecture, activation and data subset gets drawn; seeds are meta-training seeds.
    assert {tuple(s.options["hidden_sizes"]) for s in specs} == {(4,), (8,), (4, 4), (8, 8)}
    assert {s.options["activation"] for s in specs} == {"relu", "tanh"}
    assert {s.options["train_subset_seed"] for s in specs} == {0, 1, 2}
    assert all(s.seed >= 1000 for s in specs) and len({s.seed for s in specs}) == 200
    assert len(family.training_options()) == 4 * 2 * 3


def test_no_held_out_pair_is_ever_sampled_for_meta_training():
    family = _digits_family(held_out=[{"hidden_sizes": (16,)}, {"hidden_sizes": (8,), "activation": "tanh"}],
                            held_out_seeds=range(5))
    held_out = set(family.held_out_specs())
    assert len(held_out) == 2 * 5
    generator = torch.Generator().manual_seed(1)
    sampled = {family.sample_spec(generator) for _ in range(2000)}
    assert not sampled & held_out
    assert not {(s.architecture, s.seed) for s in sampled} & {(s.architecture, s.seed) for s in held_out}
    validation = family.validation_specs(8)
    assert all(100 <= s.seed < 1000 for s in validation) and not set(validation) & (sampled | held_out)


def test_tasks_are_built_once_per_architecture():
    built = []

    def create(name, **options):  # noqa: ANN001, ANN003, ANN202
        built.append(options)
        return MLPTask(**options)

    family = _digits_family(create=create)
    generator = torch.Generator().manual_seed(2)
    drawn = [family.sample(generator) for _ in range(60)]
    assert len(built) == len({id(task) for task, _ in drawn}) <= 8
    task, seed = drawn[0]
    assert isinstance(task, MLPTask) and task.batch_size == 32 and seed >= 1000
    assert family.build(family.sample_spec(torch.Generator().manual_seed(2)))[0] is task


def test_the_default_held_out_tasks_differ_from_training():
    family = mlp_family(widths=(8,), depths=(1,), activations=("relu",))
    training = {tuple(o["hidden_sizes"]) + (o["activation"], o["dataset"]) for o in family.training_options()}
    held_out = family.held_out_specs()
    assert {s.seed for s in held_out} == {0, 1, 2}
    assert all(tuple(s.options["hidden_sizes"]) + (s.options["activation"], s.options["dataset"]) not in training
               for s in held_out)
    assert {s.options["dataset"] for s in held_out} == {"mnist1d", "digits"}


def test_family_errors_and_the_factory_table():
    assert sorted(FAMILIES) == ["conv", "mlp"]
    family = create_family("conv", channels=[[2, 2]], activations=["relu"], dataset_options={"side": 8})
    assert family.training_options()[0]["channels"] == (2, 2)
    with pytest.raises(ConfigError, match="unknown task family 'transformer'; available: conv, mlp"):
        create_family("transformer")
    with pytest.raises(ConfigError, match="held-out seeds \\[5\\] lie inside train_seeds"):
        TaskFamily("mlp", train_seeds=(0, 10), held_out=[{}], held_out_seeds=[5, 50])
    with pytest.raises(ConfigError, match="overlap the validation seeds"):
        TaskFamily("mlp", train_seeds=(500, 2000))
    with pytest.raises(ConfigError, match=r"choices\['activation'\] is empty"):
        TaskFamily("mlp", choices={"activation": []})
    with pytest.raises(ConfigError, match="JSON-serializable"):
        TaskFamily("mlp", options={"dataset": object()})


def test_a_family_drives_the_meta_trainer():
    family = _digits_family()
    config = MetaTrainConfig(meta_steps=2, unroll=2, horizon=4, meta_batch=2, val_every=2, val_steps=3)
    trainer = MetaTrainer(create_optimizer("rnnprop"), family.sample, config=config,
                          val_tasks=family.validation_tasks(2))
    result = trainer.train()
    assert len(result.history) == 2 and result.best_step == 2
