"""The run-folder contract: refused commands change nothing, resume compares against the checkpoint's
own configuration, one writer at a time, no run in the current folder by accident, identical runs
write identical state."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flat_l2o_plugin.cli import main as cli
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.training import TrainingCheckpointError, load_checkpoint, run_meta_training
from flat_l2o_plugin.training.run_folder import LOCK_FILE, RunFolderLockedError, RunLock
from flat_l2o_plugin.training.runner import RESUMABLE_KEYS, normalize_spec

REPO = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tmp_path, finished_run):
    copy_ = tmp_path / "run"
    shutil.copytree(finished_run, copy_)
    return copy_


@pytest.fixture
def config_file(tmp_path, small_spec):
    """The finished run's spec as a ``flat-l2o meta-train`` config file (the CLI has no ``threads``)."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({k: v for k, v in small_spec.items() if k != "threads"}))
    return path


@pytest.mark.parametrize("override", ["optimizer.name=l2o_dm", "regularizers.hessian_top_eigenvalue.weight=0.5",
                                      "val_tasks=2", "task.options.batch_size=16", "trainer.unroll=1"])
def test_a_refused_resume_without_config_json_changes_no_file_and_the_right_resume_still_works(
        run, config_file, override, capsys):
    (run / "config.json").unlink()
    before = snapshot(run)
    assert cli(["meta-train", str(config_file), "--run-dir", str(run), "--resume", "--no-progress",
                "--set", override]) == 2
    err = capsys.readouterr().err
    assert "made with another configuration" in err and override.split("=")[0] in err and "Traceback" not in err
    assert snapshot(run) == before
    assert cli(["meta-train", str(config_file), "--run-dir", str(run), "--resume", "--no-progress"]) == 0


def test_resume_compares_against_the_checkpoint_not_against_config_json(run, small_spec):
    changed = copy.deepcopy(small_spec)
    changed["regularizers"]["hessian_top_eigenvalue"]["weight"] = 0.5
    # config.json says the changed spec (a user edited it, or an old release rewrote it on refusal) ...
    (run / "config.json").write_text(json.dumps(changed))
    with pytest.raises(TrainingCheckpointError, match=r"weight: 0.1 -> 0.5"):
        run_meta_training(changed, run, resume=True)
    # ... but the checkpoint knows what the run was made with.
    assert load_checkpoint(run).state["run_config"]["regularizers"] == small_spec["regularizers"]
    longer = copy.deepcopy(small_spec)
    longer["trainer"]["meta_steps"] = 5
    assert run_meta_training(longer, run, resume=True).resumed_from == 4
    assert json.loads((run / "config.json").read_text()) == normalize_spec(longer)


def test_only_the_run_length_checkpoint_rate_and_threads_may_change_and_a_change_is_announced(
        run, small_spec, caplog):
    assert set(RESUMABLE_KEYS) == {"trainer.meta_steps", "trainer.checkpoint_every", "threads"}
    shorter = copy.deepcopy(small_spec)
    shorter["trainer"]["meta_steps"] = 3
    before = snapshot(run)
    with pytest.raises(TrainingCheckpointError, match="at meta-step 4, past meta_steps=3"):
        run_meta_training(shorter, run, resume=True)
    assert snapshot(run) == before
    longer = copy.deepcopy(small_spec)
    longer["trainer"].update(meta_steps=6, checkpoint_every=3)
    longer["threads"] = 2
    with caplog.at_level(logging.WARNING, logger="flat_l2o_plugin"):
        result = run_meta_training(longer, run, resume=True)
    assert result.resumed_from == 4 and len(result.history) == 6
    assert any("meta_steps changed from 4 to 6" in r.getMessage() and "may change on resume" in r.getMessage()
               for r in caplog.records)


def test_a_refused_fresh_start_changes_no_file(run, small_spec):
    before = snapshot(run)
    with pytest.raises(TrainingCheckpointError, match="already holds a checkpoint"):
        run_meta_training(small_spec, run)
    assert snapshot(run) == before


# ------------------------------------------------------------------ the lock

_HOLD = """
import sys, time
from flat_l2o_plugin.training.run_folder import RunLock
lock = RunLock(sys.argv[1]).acquire()
lock.record_holder()
print("held", flush=True)
time.sleep(120)
"""


def _hold_lock(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_exits_2_naming_the_folder_and_the_holder_and_changes_nothing(run, config_file, capsys):
    holder = _hold_lock(run)
    try:
        before = snapshot(run)
        assert cli(["meta-train", str(config_file), "--run-dir", str(run), "--resume", "--no-progress"]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"flat-l2o: error: run folder {run} is in use by process {holder.pid} on host ")
        assert snapshot(run) == before
        with pytest.raises(RunFolderLockedError, match=str(holder.pid)):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    holder = _hold_lock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # its note stays ...
    with RunLock(tmp_path) as lock:  # ... but the lock died with it
        lock.record_holder()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_bytes() == b""


def test_the_lock_is_reentrant_within_a_process_and_released_with_the_last_holder(tmp_path):
    with RunLock(tmp_path), RunLock(tmp_path):
        pass
    with RunLock(tmp_path):  # released: it can be taken again
        pass


@pytest.mark.slow
def test_two_meta_trains_started_on_one_folder_one_runs_the_other_is_refused(tmp_path, small_spec):
    folder = tmp_path / "run"
    spec = copy.deepcopy(small_spec)
    spec["trainer"]["meta_steps"] = 12
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAT_L2O_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    processes = []
    for seed in (3, 4):
        spec["trainer"]["seed"] = seed
        config = tmp_path / f"seed{seed}.json"
        config.write_text(json.dumps({k: v for k, v in spec.items() if k != "threads"}))
        processes.append(subprocess.Popen([sys.executable, "-m", "flat_l2o_plugin", "meta-train", str(config),
                                           "--run-dir", str(folder), "--no-progress"], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outcomes = [(p.wait(timeout=300), p.stderr.read(), p.pid) for p in processes]
    assert sorted(code for code, _, _ in outcomes) == [0, 2], outcomes
    (_, winner_err, winner_pid), (_, loser_err, _) = sorted(outcomes, key=lambda o: o[0])
    assert "Traceback" not in winner_err + loser_err
    # The loser met the winner's lock, or (if it came late) the winner's finished checkpoint.
    assert (f"run folder {folder} is in use by" in loser_err) or "already holds a checkpoint" in loser_err
    seed = load_checkpoint(folder).state["run_config"]["trainer"]["seed"]
    assert json.loads((folder / "config.json").read_text())["trainer"]["seed"] == seed
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 12


# ------------------------------------------------------------------ where a run may go


@pytest.mark.parametrize("how", ["argument", "option", "config"])
def test_an_empty_run_dir_is_refused_and_nothing_is_written_to_the_current_folder(tmp_path, monkeypatch, small_spec,
                                                                                   config_file, capsys, how):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    if how == "argument":
        with pytest.raises(ConfigError, match="run_dir is empty"):
            run_meta_training(small_spec, "")
    elif how == "option":
        assert cli(["meta-train", str(config_file), "--run-dir", "", "--no-progress"]) == 2
        assert "run_dir is empty" in capsys.readouterr().err
    else:
        assert cli(["meta-train", str(config_file), "--set", 'run_dir=""', "--no-progress"]) == 2
        assert "run_dir" in capsys.readouterr().err
    assert list(work.iterdir()) == []


def test_an_empty_config_file_says_it_starts_a_default_run(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # The run itself is refused (its folder is a file), after the note.
    monkeypatch.setenv("FLAT_L2O_RUN_DIR", str(blocker))
    assert cli(["meta-train", str(empty), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "sets nothing beyond the defaults: a default run of 200 meta-steps" in err
    assert f"run folder {blocker} is a file" in err


# ------------------------------------------------------------------ determinism


def test_two_identical_runs_write_identical_trainer_state_whatever_the_global_rngs_held(tmp_path, small_spec):
    states = []
    for index, junk in enumerate((1, 2)):
        random.seed(junk)  # what another process would start with
        np.random.seed(junk)
        run_meta_training(copy.deepcopy(small_spec), tmp_path / f"run{index}")
        folder = tmp_path / f"run{index}" / "checkpoint"
        trainer_json = json.loads((folder / "trainer.json").read_text())
        states.append(((folder / "trainer.safetensors").read_bytes(), trainer_json["rng"],
                       (folder / "weights.safetensors").read_bytes()))
    assert states[0] == states[1]


def test_a_checkpoint_from_before_run_config_falls_back_to_config_json(run, small_spec):
    import hashlib

    state_file = run / "checkpoint" / "trainer.json"
    state = json.loads(state_file.read_text())
    del state["run_config"]
    payload = json.dumps(state).encode()
    state_file.write_bytes(payload)
    manifest = json.loads((run / "checkpoint" / "manifest.json").read_text())
    manifest["files"]["trainer.json"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (run / "checkpoint" / "manifest.json").write_text(json.dumps(manifest))
    changed = copy.deepcopy(small_spec)
    changed["val_tasks"] = 2
    with pytest.raises(TrainingCheckpointError, match=r"config.json was made with another configuration \(val_tasks"):
        run_meta_training(changed, run, resume=True)
    longer = copy.deepcopy(small_spec)
    longer["trainer"]["meta_steps"] = 5
    assert run_meta_training(longer, run, resume=True).resumed_from == 4
