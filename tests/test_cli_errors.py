"""Bad input to ``flat-l2o``: one line on stderr, exit 2, never a traceback, nothing written.

In-process ``main(argv)`` calls (fast enough to fuzz); ``test_cli.py`` runs the real
command in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import string
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flat_l2o_plugin import create_optimizer
from flat_l2o_plugin.cli import main
from flat_l2o_plugin.optimizers.weights import save_learned_optimizer

TINY = {"task": {"name": "mlp_digits", "options": {"batch_size": 16}},
        "trainer": {"meta_steps": 1, "unroll": 1, "horizon": 2, "val_every": 0, "checkpoint_every": 0},
        "val_tasks": 0}


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``flat-l2o ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_refused(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("flat-l2o: error: ") and "\n" not in last
    for fragment in fragments:
        assert fragment in last, (fragment, last)


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "rnnprop.safetensors"
    return save_learned_optimizer(path, create_optimizer("rnnprop"), name="rnnprop")


# ------------------------------------------------------------------ meta-train


@pytest.mark.parametrize("override, field", [
    ("trainer.meta_lr=1e300", "trainer.meta_lr"),
    ("trainer.seed=100000000000000000000", "trainer.seed"),
    ("trainer.clip=-1", "trainer.clip"),
    ("trainer.meta_lr=nan", "trainer.meta_lr"),
    ("regularizers.sharpness.weight=-0.1", "regularizers.sharpness.weight"),
    ('optimizer.options.hidden_size="a"', "optimizer.options.hidden_size must be an integer"),
    ("regularizers.hessian_top_eigenvalue.iters=2.5", "regularizers.hessian_top_eigenvalue.iters must be an integer"),
    ('task.options.batch_size="big"', "task.options.batch_size must be an integer"),
    # torch refuses the allocation with a C++ backtrace in its message: one line of it is kept
    ("optimizer.options.hidden_size=100000000000000000000", "optimizer.options: 'rnnprop' rejected"),
])
def test_bad_values_are_refused_naming_the_field(config, tmp_path, override, field):
    code, _, err = run_cli("meta-train", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress",
                           "--set", override)
    assert_refused(code, err, field)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)) * 3, "is not UTF-8 text"),
    (b"[trainer\nmeta_steps = ", "could not be parsed"),
])
def test_a_config_file_that_is_not_a_config_is_refused(tmp_path, content, message):
    path = tmp_path / "run.toml"
    path.write_bytes(content)
    assert_refused(*run_cli("meta-train", str(path))[::2], str(path), message)


def test_a_directory_given_as_the_config_file_is_reported_as_a_directory(tmp_path):
    assert_refused(*run_cli("meta-train", str(tmp_path))[::2], "is a directory")


@pytest.mark.parametrize("where, message", [
    ("file", "is a file, not a folder"),
    ("under-a-file", "is a file, not a folder"),
    ("uncreatable", "File name too long"),
])
def test_run_folders_that_cannot_be_are_refused(config, tmp_path, where, message):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    run_dir = {"file": blocker, "under-a-file": blocker / "run",
               "uncreatable": tmp_path / ("x" * 300) / "run"}[where]
    assert_refused(*run_cli("meta-train", str(config), "--run-dir", str(run_dir), "--no-progress")[::2],
                   "run folder", message)
    assert blocker.read_text() == "keep me"


def test_a_checkpoint_whose_trainer_json_was_tampered_with_is_refused(config, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("meta-train", str(config), "--run-dir", str(run_dir), "--no-progress")[0] == 0
    state_file = run_dir / "checkpoint" / "trainer.json"
    original = state_file.read_bytes()
    deep = "[" * 100_000 + "]" * 100_000
    for change, message in [({"skipped": "three"}, "skipped must be an integer >= 0"),
                            ({"rng": {"python": [3, "x", None], "numpy": ["MT19937", 0, 0, 0.0]}},
                             "rng.python.1 must be a list"),
                            ({"estimators": "DEEP"}, "nested too deeply")]:
        text = json.dumps({**json.loads(original), **change}).replace('"DEEP"', deep)
        rewrite_checkpoint_file(state_file, text.encode())
        code, _, err = run_cli("meta-train", str(config), "--run-dir", str(run_dir), "--no-progress", "--resume",
                               "--set", "trainer.meta_steps=2")
        assert_refused(code, err, str(state_file), message)


def rewrite_checkpoint_file(path: Path, payload: bytes) -> None:
    """Replace a checkpoint file and record it in the manifest, as a careful editor would."""
    import hashlib

    path.write_bytes(payload)
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))


# ------------------------------------------------------------------ evaluate


@pytest.mark.parametrize("args, message", [
    (("--seeds", "0"), "--seeds must be >= 1"),
    (("--seeds", "-1"), "--seeds must be >= 1"),
    (("--steps", "-5"), "--steps must be >= 1"),
    (("--steps", "0"), "--steps must be >= 1"),
    (("--adam", "nan"), "--adam must be a finite learning rate > 0"),
    (("--adam", "-0.1"), "--adam must be a finite learning rate > 0"),
    (("--adam", "inf"), "--adam must be a finite learning rate > 0"),
    (("--adam", "1e300"), "at most 3.4e+38"),  # finite as a Python float, not as a float32
    (("--adam", "1e39"), "at most 3.4e+38"),
])
def test_evaluate_refuses_meaningless_numbers(weights, args, message):
    assert_refused(*run_cli("evaluate", str(weights), *args)[::2], message)


def test_evaluate_on_an_mnist_root_with_a_code_pickle_says_the_file_was_refused(tmp_path):
    processed = tmp_path / "MNIST" / "processed"
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    processed.mkdir()
    for name in ("training.pt", "test.pt"):
        (processed / name).write_bytes(pickle.dumps(print, protocol=2))  # names a callable: weights_only refuses it
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / "MNIST" / "raw" / name).write_bytes(b"")
    code, _, err = run_cli("evaluate", "--adam", "0.01", "--task", "mlp", "--task-option", "dataset=mnist",
                           "--task-option", f'dataset_options={{root = "{tmp_path}"}}', "--seeds", "1",
                           "--steps", "1", "--no-flatness")
    assert_refused(code, err, f"refused {processed / 'training.pt'}")


# ------------------------------------------------------------------ the real command's exit codes


@pytest.mark.parametrize("args", [("evaluate", "--adam", "nan"), ("meta-train", "/"), ("evaluate", "--seeds", "x")])
def test_the_installed_command_exits_2_without_a_traceback(args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAT_L2O_")}
    done = subprocess.run([sys.executable, "-m", "flat_l2o_plugin", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.strip()


# ------------------------------------------------------------------ fuzzing the arguments

_NUMBERS = st.one_of(st.integers(-3, 3).map(str), st.sampled_from(["nan", "inf", "-inf", "1e300", "-1e300",
                                                                  "100000000000000000000", "0.0", "1e-320"]))
_WORDS = st.text(alphabet=string.ascii_letters + string.digits + "._-=[]{}\"', /\\\x00é", max_size=12)
_KEYS = st.sampled_from(["trainer.meta_lr", "trainer.seed", "trainer.clip", "trainer.unroll", "trainer.horizon",
                         "trainer.meta_batch", "trainer.imitation_prob", "trainer.imitation_lr",
                         "trainer.meta_lr_min", "trainer.curriculum", "trainer.meta_lr_schedule", "val_tasks",
                         "run_dir", "optimizer.name", "optimizer.options.hidden_size",
                         "optimizer.options.output_scale", "task.name", "task.options.batch_size",
                         "regularizers.sharpness.weight", "regularizers.sharpness.rho",
                         "regularizers.hessian_top_eigenvalue.iters", "regularizers.local_entropy.gamma",
                         "wrappers", "plugins.disable", "plugins.strict", "trainer", "nonsense.key", "", "."])
_VALUES = st.one_of(_NUMBERS, _WORDS, st.sampled_from(["true", "[]", "[1, 2]", "{}", '"x"', "[-1]", "{a = 1}"]))


@st.composite
def meta_train_argv(draw, folder: Path) -> list[str]:
    argv = ["meta-train", draw(st.sampled_from([str(folder / "run.json"), str(folder / "missing.toml"),
                                                str(folder), str(folder / "bytes.toml"), str(folder / "empty.yaml")]))]
    for _ in range(draw(st.integers(0, 3))):
        argv += ["--set", f"{draw(_KEYS)}={draw(_VALUES)}"]
    argv += draw(st.sampled_from([[], ["--resume"], ["--table", "tool.x"]]))
    run_dir = draw(st.sampled_from(["run", "", "blocker", "blocker/run", "x" * 300, "\x00"]))
    # Whatever the fuzzed values, an accepted run is one short meta-step.
    return argv + ["--run-dir", str(folder / run_dir) if run_dir else "", "--no-progress",
                   "--set", "trainer.meta_steps=1", "--set", "val_tasks=0"]


@st.composite
def evaluate_argv(draw, weights: Path, folder: Path) -> list[str]:
    argv = ["evaluate", *draw(st.lists(st.sampled_from([str(weights), str(folder / "missing.safetensors"),
                                                        str(folder / "bytes.toml"), str(folder)]), max_size=2))]
    for option, values in [("--adam", _NUMBERS), ("--seeds", st.integers(-2, 1).map(str)),
                           ("--steps", st.integers(-2, 2).map(str)), ("--task", _WORDS),
                           ("--task-option", st.builds(lambda k, v: f"{k}={v}", _WORDS, _VALUES)),
                           ("--split", st.sampled_from(["val", "test", "train"]))]:
        if draw(st.booleans()):
            argv += [option, draw(values)]
    return argv + ["--no-flatness"]


def _fuzz_folder(root: Path) -> Path:
    folder = root / "fuzz"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(TINY))
    (folder / "bytes.toml").write_bytes(bytes(range(256)))
    (folder / "empty.yaml").write_text("")
    (folder / "blocker").write_text("")
    return folder


def _assert_clean(argv: list[str], code: int, err: str) -> None:
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    if code == 2:
        last = err.rstrip("\n").splitlines()[-1]
        assert last.startswith("flat-l2o: error: ") or ": error: " in last, (argv, err)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_meta_train_arguments_succeed_or_fail_in_one_line(tmp_path, data):
    folder = _fuzz_folder(tmp_path)
    argv = data.draw(meta_train_argv(folder))
    code, _, err = run_cli(*argv)
    _assert_clean(argv, code, err)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_evaluate_arguments_succeed_or_fail_in_one_line(tmp_path, weights, data):
    folder = _fuzz_folder(tmp_path)
    argv = data.draw(evaluate_argv(weights, folder))
    code, _, err = run_cli(*argv)
    _assert_clean(argv, code, err)
