"""A task family in a config: validated with errors naming the field, sampled like experiment.meta_train."""

from __future__ import annotations

import pytest
import torch

from flat_l2o_plugin.config import ConfigValueError, config_from_dict, load_config
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.tasks.families import UniformTasks
from flat_l2o_plugin.training import run_meta_training
from flat_l2o_plugin.training.experiment import meta_train
from flat_l2o_plugin.training.runner import normalize_spec

FAMILY = [{"name": "mlp_digits", "options": {"hidden_sizes": [8]}},
          {"name": "logistic_regression", "options": {}}]
TRAINER = {"meta_steps": 3, "unroll": 2, "horizon": 4, "val_every": 3, "val_steps": 4, "val_at_start": True,
           "meta_objective": "train", "checkpoint_every": 0}


def test_a_config_holds_a_family_as_tables_or_as_the_study_s_pairs() -> None:
    config = config_from_dict({"tasks": FAMILY})
    assert [t.name for t in config.tasks] == ["mlp_digits", "logistic_regression"]
    pairs = config_from_dict({"tasks": [["mlp_digits", {"hidden_sizes": [8]}], ["logistic_regression", {}]]})
    assert pairs.tasks == config.tasks


@pytest.mark.parametrize("data, message", [
    ({"tasks": "mlp"}, "tasks must be a list of task tables"),
    ({"tasks": [{"options": {}}]}, "tasks[0].name is missing"),
    ({"tasks": [{"name": "mlp", "option": {}}]}, "unknown key 'tasks[0].option' (did you mean 'options'?)"),
    ({"tasks": [["mlp"]]}, "tasks[0] must be a table"),
    ({"tasks": FAMILY, "task": {"name": "mlp"}}, "not both"),
])
def test_family_errors_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_unknown_family_task_is_named_by_its_index(tmp_path) -> None:  # noqa: ANN001
    from flat_l2o_plugin.config import validate_components
    from flat_l2o_plugin.errors import UnknownComponentError

    config = config_from_dict({"tasks": [FAMILY[0], {"name": "mlp_digitz"}]})
    with pytest.raises(UnknownComponentError, match=r"^tasks\[1\]\.name: unknown task 'mlp_digitz'"):
        validate_components(config)


def test_a_spec_without_a_family_is_unchanged() -> None:
    assert "tasks" not in normalize_spec({"tasks": []})
    assert normalize_spec({"tasks": FAMILY})["tasks"] == FAMILY
    with pytest.raises(ConfigError, match=r"spec\.tasks\[0\]"):
        normalize_spec({"tasks": [{"name": 3}]})


def test_uniform_tasks_draws_every_task_and_cycles_validation() -> None:
    family = UniformTasks(["a", "b", "c"])
    generator = torch.Generator().manual_seed(0)
    drawn = {family(generator)[0] for _ in range(60)}
    assert drawn == {"a", "b", "c"}
    assert family.validation_tasks(4) == [("a", 100), ("b", 101), ("c", 102), ("a", 103)]
    with pytest.raises(ConfigError):
        UniformTasks([])


@pytest.mark.slow
def test_meta_train_on_a_family_from_a_config_is_experiment_meta_train(tmp_path) -> None:  # noqa: ANN001
    """The run folder's weights are those of experiment.meta_train with the same family, wrappers and seed."""
    wrappers = [{"name": "sam_gradient", "rho": 0.05}]
    options = {"base": "adam", "lr": 0.01}
    config = load_config({"optimizer": {"name": "learned_correction", "options": options}, "wrappers": wrappers,
                          "tasks": FAMILY, "trainer": {**TRAINER, "seed": 3}, "val_tasks": 2})
    spec = config.as_dict()
    spec.pop("run_dir")
    result = run_meta_training({**spec, "threads": 1}, tmp_path / "run")
    reference = meta_train(optimizer="learned_correction", optimizer_options=options, wrappers=wrappers,
                           tasks=[(t["name"], t["options"]) for t in FAMILY], trainer=TRAINER, seed=3, val_tasks=2)
    assert result.best_score == reference["best_val_accuracy"]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "optimizer.safetensors"))
    inner = reference["state_dict"]  # the wrapper holds no weights: its keys are the model's
    assert saved.keys() == inner.keys() and all(torch.equal(saved[k], inner[k]) for k in saved)
