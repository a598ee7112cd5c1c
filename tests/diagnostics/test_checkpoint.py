"""Optimizee checkpoints: exact round trips, atomic writes, and errors that name the file."""

from __future__ import annotations

import json
import os

import pytest
import safetensors
import safetensors.torch
import torch

from flat_l2o_plugin import create_task
from flat_l2o_plugin.errors import ConfigError, UnknownComponentError
from flat_l2o_plugin.tasks import checkpoint
from flat_l2o_plugin.tasks.checkpoint import CheckpointError, load_optimizee, save_optimizee

OPTIONS = {"hidden_sizes": (7, 5), "activation": "tanh", "batch_size": 32}


@pytest.fixture(scope="module")
def task_and_params():
    task = create_task("mlp_digits", **OPTIONS)
    return task, task.init_params(seed=3)


def test_round_trip_gives_identical_tensors_and_the_same_task(tmp_path, task_and_params):
    task, params = task_and_params
    # float64 (not the task's default) and a non-contiguous tensor: both come back exactly.
    params = [p.double() for p in params]
    params[0] = params[0].t().contiguous().t()
    assert not params[0].is_contiguous()
    path = save_optimizee(tmp_path / "mlp.safetensors", "mlp_digits", OPTIONS, params)
    loaded_task, loaded = load_optimizee(path)
    assert len(loaded) == len(params)
    for original, restored in zip(params, loaded):
        assert restored.dtype == original.dtype and torch.equal(restored, original)
    assert loaded_task.name == task.name
    assert loaded_task.hidden_sizes == (7, 5)  # a tuple again, although JSON stored a list
    assert (loaded_task.activation, loaded_task.batch_size) == ("tanh", 32)
    batch = task.full_batch("val")
    assert torch.equal(loaded_task.loss(loaded, batch), task.loss(params, batch))


def test_the_file_is_plain_safetensors_with_the_task_in_its_metadata(tmp_path, task_and_params):
    _, params = task_and_params
    path = save_optimizee(tmp_path / "mlp.safetensors", "mlp_digits", OPTIONS, params)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(f"param.{i}" for i in range(len(params)))
        metadata = handle.metadata()
    assert set(metadata) == {"task", "task_options"}
    assert metadata["task"] == "mlp_digits"
    assert json.loads(metadata["task_options"]) == {"hidden_sizes": [7, 5], "activation": "tanh", "batch_size": 32}


def fail(*args, **kwargs):
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize("where", ["serialize", "fsync", "replace"])
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, task_and_params, monkeypatch,
                                                                         where):
    _, params = task_and_params
    path = tmp_path / "mlp.safetensors"
    save_optimizee(path, "mlp_digits", OPTIONS, params)
    before = path.read_bytes()
    if where == "serialize":
        monkeypatch.setattr(safetensors.torch, "save", fail)
    elif where == "fsync":  # the payload is already in the temporary file
        monkeypatch.setattr(checkpoint.os, "fsync", fail)
    else:
        monkeypatch.setattr(checkpoint.os, "replace", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_optimizee(path, "mlp_digits", OPTIONS, [p * 2 for p in params])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["mlp.safetensors"]
    assert all(torch.equal(a, b) for a, b in zip(load_optimizee(path)[1], params))


def test_a_failed_first_write_leaves_nothing(tmp_path, task_and_params, monkeypatch):
    _, params = task_and_params
    monkeypatch.setattr(checkpoint.os, "fsync", fail)
    with pytest.raises(RuntimeError):
        save_optimizee(tmp_path / "mlp.safetensors", "mlp_digits", OPTIONS, params)
    assert os.listdir(tmp_path) == []


def test_a_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(CheckpointError, match="nowhere.safetensors.*does not exist"):
        load_optimizee(path)
    assert issubclass(CheckpointError, ConfigError)  # the CLI's exit code 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "pickle"])
def test_a_corrupt_file_is_named(tmp_path, task_and_params, damage):
    _, params = task_and_params
    path = tmp_path / "broken.safetensors"
    if damage == "garbage":
        path.write_bytes(os.urandom(256))
    elif damage == "truncated":
        save_optimizee(path, "mlp_digits", OPTIONS, params)
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a torch.save pickle is refused, never unpickled
        torch.save(params, path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_optimizee(path)


@pytest.mark.parametrize(
    ("metadata", "match"),
    [(None, "'task'"), ({"task": "mlp_digits"}, "'task_options'"),
     ({"task": "mlp_digits", "task_options": "{not json"}, "not valid JSON"),
     ({"task": "mlp_digits", "task_options": "[1, 2]"}, "JSON object")],
)
def test_missing_or_bad_metadata_is_named(tmp_path, task_and_params, metadata, match):
    _, params = task_and_params
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({f"param.{i}": p for i, p in enumerate(params)}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=match) as info:
        load_optimizee(path)
    assert str(path) in str(info.value)


def test_an_unknown_task_is_named_with_the_file(tmp_path, task_and_params):
    _, params = task_and_params
    path = save_optimizee(tmp_path / "mlp.safetensors", "no_such_task", {}, params)
    with pytest.raises(CheckpointError, match="no_such_task") as info:
        load_optimizee(path)
    assert str(path) in str(info.value) and isinstance(info.value.__cause__, UnknownComponentError)


def test_params_that_do_not_fit_the_task_are_refused(tmp_path, task_and_params):
    _, params = task_and_params
    path = save_optimizee(tmp_path / "mlp.safetensors", "mlp_digits", {"hidden_sizes": (20,)}, params)
    with pytest.raises(CheckpointError, match="expects parameter shapes"):
        load_optimizee(path)


def test_foreign_or_missing_tensors_are_refused(tmp_path, task_and_params):
    _, params = task_and_params
    meta = {"task": "mlp_digits", "task_options": json.dumps(OPTIONS)}
    gap = tmp_path / "gap.safetensors"
    safetensors.torch.save_file({"param.0": params[0], "param.2": params[2]}, str(gap), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing \['param.1'\]"):
        load_optimizee(gap)
    extra = tmp_path / "extra.safetensors"
    foreign = {"param.0": params[0], "optimizer.m": params[0].clone()}
    safetensors.torch.save_file(foreign, str(extra), metadata=meta)
    with pytest.raises(CheckpointError, match="optimizer.m"):
        load_optimizee(extra)


def test_bad_arguments_to_save_write_nothing(tmp_path, task_and_params):
    _, params = task_and_params
    path = tmp_path / "mlp.safetensors"
    with pytest.raises(CheckpointError, match="JSON-serializable"):
        save_optimizee(path, "mlp_digits", {"dtype": torch.float64}, params)
    with pytest.raises(CheckpointError, match=r"params\[1\]"):
        save_optimizee(path, "mlp_digits", OPTIONS, [params[0], params[1].tolist()])
    with pytest.raises(CheckpointError, match="task_name"):
        save_optimizee(path, "", OPTIONS, params)
    with pytest.raises(CheckpointError, match="does not exist"):
        save_optimizee(tmp_path / "no" / "dir.safetensors", "mlp_digits", OPTIONS, params)
    assert os.listdir(tmp_path) == []
