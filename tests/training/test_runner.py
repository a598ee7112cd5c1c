"""The runner: a run described by plain data, its folder, and its command line."""

from __future__ import annotations

import json

import pytest

from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.optimizers.weights import load_learned_optimizer
from flat_l2o_plugin.training import read_metrics, run_meta_training
from flat_l2o_plugin.training.runner import main, normalize_spec


def test_the_run_folder_echoes_the_spec_and_holds_the_best_optimizer(finished_run, small_spec):
    assert json.loads((finished_run / "config.json").read_text()) == normalize_spec(small_spec)
    optimizer = load_learned_optimizer(finished_run / "optimizer.safetensors")
    assert type(optimizer).__name__ == "RNNProp"
    records = read_metrics(finished_run)
    assert [r["meta_step"] for r in records] == [0, 1, 2, 3]
    assert {"meta_loss", "loss", "meta_lr", "skipped_total", "diverged_total", "seconds"} <= set(records[0])
    assert "hessian_top_eigenvalue/value" in records[0] and "val_accuracy" in records[1]


@pytest.mark.parametrize("spec, field", [({"optimiser": {}}, "unknown key"), ({"task": "mlp"}, "spec.task"),
                                         ({"trainer": {"unrol": 2}}, "spec.trainer"),
                                         ({"trainer": {"unroll": 0}}, "spec.trainer: MetaTrainConfig.unroll"),
                                         ({"val_tasks": -1}, "spec.val_tasks"), ({"threads": 0}, "spec.threads")])
def test_spec_errors_name_the_field(spec, field, tmp_path):
    with pytest.raises(ConfigError, match=field):
        run_meta_training(spec, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_command_line_reports_errors_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing.json"), str(tmp_path / "run")]) == 2
    assert "missing.json" in capsys.readouterr().err
    (tmp_path / "spec.json").write_text(json.dumps({"trainer": {"meta_steps": 1}}))
    assert main([str(tmp_path / "spec.json"), str(tmp_path / "run"), "--resume"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_a_run_folder_from_before_optimizer_modules_resumes(tmp_path, small_spec):
    run_dir = tmp_path / "run"
    small_spec["trainer"]["meta_steps"] = 2
    run_meta_training(small_spec, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["optimizer"] == {"name": "rnnprop", "options": {}, "module": None, "weights": None,
                                  "python_path": []}
    saved["optimizer"] = {"name": "rnnprop", "options": {}}  # as written before module/weights existed
    (run_dir / "config.json").write_text(json.dumps(saved))
    small_spec["trainer"]["meta_steps"] = 3
    assert len(run_meta_training(small_spec, run_dir, resume=True).history) == 3
