"""Checkpoints: the layout, the atomic swap, clear errors, and exact resume after an interruption."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from flat_l2o_plugin import FlatL2O, create_optimizer, create_task, get_plugin_manager
from flat_l2o_plugin.training import (MetaTrainConfig, MetaTrainer, TrainingCheckpointError, load_checkpoint,
                                      read_metrics, run_meta_training, save_checkpoint)
from flat_l2o_plugin.training import checkpoint as checkpoint_module
from flat_l2o_plugin.training.metrics import MetricsLog


def strip_wall_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture
def run(tmp_path, finished_run):
    copy_ = tmp_path / "run"
    shutil.copytree(finished_run, copy_)
    return copy_


def test_layout_is_safetensors_and_json_with_a_manifest(run):
    folder = run / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["best_weights.safetensors", "manifest.json", "trainer.json",
                                                        "trainer.safetensors", "weights.safetensors"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 4 and set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    state = json.loads((folder / "trainer.json").read_text(), parse_constant=refuse)
    assert state["step"] == 4 and state["config"]["meta_batch"] == 2
    create_optimizer("rnnprop").load_state_dict(load_file(folder / "weights.safetensors"))
    tensors = load_file(folder / "trainer.safetensors")
    assert tensors["rng/torch"].dtype == torch.uint8
    assert {"slot/0/generator", "slot/1/generator", "slot/0/trajectory/batches"} <= set(tensors)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoint", "config.json", "metrics.jsonl",
                                                     "optimizer.safetensors", "provenance.json"]
    assert (run / ".lock").read_bytes() == b""  # the holder's description is cleared when the run ends


@pytest.mark.parametrize("name", ["weights.safetensors", "trainer.safetensors", "trainer.json"])
def test_a_corrupt_file_is_an_error_naming_it(run, name, small_spec):
    path = run / "checkpoint" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TrainingCheckpointError, match=f"{path}.*corrupted"):
        run_meta_training(small_spec, run, resume=True)


def test_missing_files_and_folders_are_errors_naming_them(run, tmp_path):
    (run / "checkpoint" / "trainer.safetensors").unlink()
    with pytest.raises(TrainingCheckpointError, match="trainer.safetensors is missing"):
        load_checkpoint(run)
    (run / "checkpoint" / "manifest.json").unlink()
    with pytest.raises(TrainingCheckpointError, match="manifest.json is missing"):
        load_checkpoint(run)
    with pytest.raises(TrainingCheckpointError, match=f"no checkpoint in {tmp_path / 'empty'}"):
        load_checkpoint(tmp_path / "empty")


def test_a_kill_between_the_two_renames_leaves_the_previous_checkpoint(run):
    # The writer renamed checkpoint/ away and died before renaming its new folder into place;
    # its temporary folder is half written.
    (run / "checkpoint").rename(run / "checkpoint.old")
    half = run / ".checkpoint-00000005-abc.tmp"
    half.mkdir()
    (half / "weights.safetensors").write_bytes(b"\0" * 10)
    previous = load_checkpoint(run)
    assert previous.step == 4
    save_checkpoint(run, dataclasses.replace(previous, step=5))
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint"]
    assert load_checkpoint(run).step == 5


def test_a_failed_write_keeps_the_previous_checkpoint(run, monkeypatch):
    previous = load_checkpoint(run)
    real_write = checkpoint_module._write_file

    def write(path, payload):
        if path.name == "trainer.json":
            raise OSError("disk full")
        return real_write(path, payload)

    monkeypatch.setattr(checkpoint_module, "_write_file", write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(run, dataclasses.replace(previous, step=6))
    assert not list(run.glob(".checkpoint-*"))
    assert load_checkpoint(run).step == 4


def test_resuming_with_another_spec_or_a_fresh_start_over_a_checkpoint_is_refused(run, small_spec):
    with pytest.raises(TrainingCheckpointError, match="already holds a checkpoint"):
        run_meta_training(small_spec, run)
    changed = copy.deepcopy(small_spec)
    changed["trainer"]["unroll"] = 1
    with pytest.raises(TrainingCheckpointError, match=r"checkpoint was made with another configuration "
                                                     r"\(trainer.unroll: 2 -> 1\)"):
        run_meta_training(changed, run, resume=True)


def _trainer(run_dir, task, *, regularizers=None, optimizer_options=None, **config):
    torch.manual_seed(0)
    optimizer = create_optimizer("rnnprop", **(optimizer_options or {}))
    flat = FlatL2O({"hessian_top_eigenvalue": {"weight": 0.1, "iters": 3}} if regularizers is None else regularizers,
                   plugin_manager=get_plugin_manager(entry_points=False))
    base = dict(meta_steps=10, unroll=2, horizon=4, meta_batch=2, val_every=3, checkpoint_every=4,
                imitation_prob=0.3, curriculum=(4, 8), meta_lr_schedule="cosine", meta_lr_warmup=2, seed=7)
    sample = lambda g: (task, 1000 + int(torch.randint(0, 1000, (1,), generator=g)))  # noqa: E731
    return MetaTrainer(optimizer, sample, flat=flat, config=MetaTrainConfig(**{**base, **config}),
                       val_tasks=[(getattr(task, "task", task), 100)], run_dir=run_dir)


@pytest.mark.parametrize("change, file", [({"config": {"unroll": 1}}, "trainer.json.*unroll=2 \\(now 1\\)"),
                                          ({"optimizer_options": {"hidden_size": 8}}, "weights.safetensors"),
                                          ({"regularizers": {}}, "trainer.json.*regularizers")])
def test_a_mismatched_trainer_is_an_error_naming_the_file(tmp_path, change, file):
    task = create_task("mlp_digits", batch_size=32)
    _trainer(tmp_path, task, meta_steps=2, checkpoint_every=0, curriculum=()).train()
    config = {"meta_steps": 2, "checkpoint_every": 0, "curriculum": (), **change.get("config", {})}
    if "unroll" in config:
        config["horizon"] = 4
    trainer = _trainer(tmp_path, task, regularizers=change.get("regularizers"),
                       optimizer_options=change.get("optimizer_options"), **config)
    with pytest.raises(TrainingCheckpointError, match=file):
        trainer.train(resume=True)


class InterruptAt:
    """The task, except that its ``call``-th loss evaluation raises KeyboardInterrupt (a Ctrl-C)."""

    def __init__(self, task, call):
        self.task, self.call, self.calls, self.name = task, call, 0, task.name

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, params, batch):
        self.calls += 1
        if self.calls == self.call:
            raise KeyboardInterrupt
        return self.task.loss(params, batch)


def test_an_interrupt_mid_step_checkpoints_the_last_whole_step_and_resume_is_exact(tmp_path):
    task = create_task("mlp_digits", batch_size=32)
    counted = InterruptAt(task, call=0)  # counts the run's loss evaluations, never raises
    reference = _trainer(tmp_path / "reference", counted)
    expected = reference.train()
    expected_weights = {k: v.clone() for k, v in reference.optimizer.state_dict().items()}

    # Two thirds of the way through the evaluations: inside a meta-step past the first
    # periodic checkpoint (step 4), however many evaluations the estimators need per step.
    interrupted = _trainer(tmp_path / "run", InterruptAt(task, call=2 * counted.calls // 3))
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    step = load_checkpoint(tmp_path / "run").step
    assert 4 < step < 10 and step % 4  # written by the interrupt, not by the periodic schedule
    assert [r["meta_step"] for r in read_metrics(tmp_path / "run")] == list(range(step))
    # What a kill while appending could leave: a line of a step past the checkpoint, and half a line.
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"meta_step": step, "meta_loss": 0.0}) + "\n" + '{"meta_step": ')

    resumed = _trainer(tmp_path / "run", task)
    result = resumed.train(resume=True)
    assert result.resumed_from == step
    assert strip_wall_time(read_metrics(tmp_path / "run")) == strip_wall_time(read_metrics(tmp_path / "reference"))
    assert strip_wall_time(result.history) == strip_wall_time(read_metrics(tmp_path / "reference"))
    assert (result.best_step, result.best_score) == (expected.best_step, expected.best_score)
    assert any(h.get("curriculum_advanced") for h in result.history)
    assert any("imitation" in h for h in result.history[step:])
    weights = resumed.optimizer.state_dict()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)


def test_a_longer_budget_continues_a_finished_run(run, small_spec, tmp_path):
    longer = copy.deepcopy(small_spec)
    longer["trainer"]["meta_steps"] = 6
    result = run_meta_training(longer, run, resume=True)
    assert result.resumed_from == 4 and len(result.history) == 6
    fresh = tmp_path / "fresh"
    run_meta_training(longer, fresh)
    assert strip_wall_time(read_metrics(run)) == strip_wall_time(read_metrics(fresh))


def test_metrics_log_keeps_only_the_records_before_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.open()
    for step in range(5):
        log.append({"meta_step": step, "meta_loss": float("nan") if step == 2 else 1.0})
    log.close()
    kept = MetricsLog(tmp_path / "metrics.jsonl").open(keep=3)
    assert [r["meta_step"] for r in kept] == [0, 1, 2] and kept[2]["meta_loss"] != kept[2]["meta_loss"]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
