"""The retrofit examples run end to end at a tiny budget; two of them from a config file alone."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flat_l2o_plugin.cli import main
from flat_l2o_plugin.optimizers.weights import WeightsError, load_learned_optimizer


def test_retrofit_foreign_optimizer_example_meta_trains_with_the_term(load_example):
    logs = load_example("retrofit_foreign_optimizer").main(meta_steps=2, unroll=2, horizon=4, probes=1)
    assert len(logs["meta_loss"]) == 2 and all(math.isfinite(x) for x in logs["meta_loss"])
    # start_fraction 0.5 of a 4-step trajectory: the first unroll (θ_1, θ_2) already reaches θ_2.
    assert logs["hessian_trace"][0] != 0.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # gym, imported by learn2learn
def test_learn2learn_example_runs_with_the_term(tmp_path, load_example, examples_dir):
    pytest.importorskip("learn2learn")
    config = tmp_path / "experiment.toml"
    config.write_text((examples_dir / "learn2learn_flatness.toml").read_text()
                      .replace("steps = 200", "steps = 3").replace("batch_size = 64", "batch_size = 16"))
    logs = load_example("learn2learn_flatness").main(config, overrides=["regularizers.hessian_trace.probes=1"])
    assert len(logs["loss"]) == 3 and all(math.isfinite(x) for x in logs["loss"])
    # None at the first step: its parameters are the model's own, which the transform did not produce.
    assert logs["hessian_trace"][0] == 0.0 and all(t != 0.0 for t in logs["hessian_trace"][1:])
    assert 0.0 <= logs["val_accuracy"][0] <= 1.0


# ---------------------------------------------------------------------- retrofits from a config alone

TINY = ["--no-progress", "--set", "trainer.meta_steps=2", "--set", "trainer.unroll=2", "--set", "trainer.horizon=4",
        "--set", "trainer.val_every=0", "--set", "task.options.batch_size=32"]


@pytest.fixture
def flat_l2o(monkeypatch, capsys):
    """``flat-l2o ARGS...`` in this process (the same entry point as the console script)."""
    for name in [n for n in os.environ if n.startswith("FLAT_L2O_")]:
        monkeypatch.delenv(name)

    def run(*args):
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.err

    return run


def _client(path: Path, name: str):
    """The user's module file, imported the way the user's own script would."""
    spec = importlib.util.spec_from_file_location(f"client_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_l2o_dm_port_meta_trains_from_its_config_alone(tmp_path, examples_dir, flat_l2o):
    folder = examples_dir / "retrofit_l2o_dm_port"
    port = _client(folder / "l2o_dm_port.py", "l2o_dm_port")
    torch.manual_seed(0)
    pretrained = port.Optimizer(preproc=True)
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pt")  # what the port's own script saves

    run_dir = tmp_path / "run"
    code, err = flat_l2o("meta-train", str(folder / "meta_train.toml"), "--run-dir", str(run_dir), *TINY,
                         "--set", "regularizers.hessian_trace.probes=1",
                         "--set", f"optimizer.weights='{tmp_path / 'pretrained.pt'}'")
    assert code == 0, err
    records = _metrics(run_dir)
    assert len(records) == 2 and all(math.isfinite(r["meta_loss"]) for r in records)
    assert records[0]["term/hessian_trace"] > 0  # start_fraction 0.5 of 4 steps: due from θ_2
    # The trained weights are the port's own: a bare Optimizer loads them strictly.
    trained = port.Optimizer(preproc=True)
    trained.load_state_dict(load_file(run_dir / "optimizer.safetensors"))
    moved = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), pretrained.state_dict().values())]
    assert any(moved)  # started from the pretrained weights and meta-trained them
    with pytest.raises(WeightsError, match=r"user's own module \(.*l2o_dm_port:Optimizer.*load_state_dict"):
        load_learned_optimizer(run_dir / "optimizer.safetensors")  # names code, which a file must not import


def test_stateful_module_meta_trains_from_its_config_alone_and_resumes_mid_trajectory(tmp_path, examples_dir,
                                                                                     flat_l2o):
    folder = examples_dir / "retrofit_stateful_module"
    config = str(folder / "meta_train.toml")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    code, err = flat_l2o("meta-train", config, "--run-dir", str(whole), *TINY, "--set", "trainer.meta_steps=3")
    assert code == 0, err
    records = _metrics(whole)
    assert len(records) == 3 and all(math.isfinite(r["meta_loss"]) for r in records)
    assert all(r["term/sharpness"] > 0 for r in records)
    client = _client(folder / "stateful_l2o.py", "stateful_l2o")
    bare = client.MetaOptimizer(hidden_size=20)
    bare.load_state_dict(load_file(whole / "optimizer.safetensors"))
    assert bare.hx is None  # the module is never asked to hold a trajectory's state

    # One meta-step (θ_2 of a 4-step trajectory), then a resume to three: the same run.
    code, err = flat_l2o("meta-train", config, "--run-dir", str(cut), *TINY, "--set", "trainer.meta_steps=1")
    assert code == 0, err
    code, err = flat_l2o("meta-train", config, "--run-dir", str(cut), *TINY, "--set", "trainer.meta_steps=3",
                         "--resume")
    assert code == 0, err
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _metrics(cut)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_a_config_that_does_not_fit_the_module_is_refused_before_anything_is_written(tmp_path, examples_dir,
                                                                                     flat_l2o):
    folder = examples_dir / "retrofit_l2o_dm_port"
    config = tmp_path / "meta_train.toml"
    config.write_text("\n".join(line for line in (folder / "meta_train.toml").read_text().splitlines()
                                if not line.startswith("hidden_as")))
    code, err = flat_l2o("meta-train", str(config), "--run-dir", str(tmp_path / "run"), *TINY,
                         "--set", f"optimizer.python_path=['{folder}']")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "takes its state as 2 arguments (hidden, cell)" in err and "set hidden_as = 'arguments'" in err
    assert not (tmp_path / "run").exists()
