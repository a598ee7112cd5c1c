"""The real ``flat-l2o`` command in a subprocess, including the error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def flat_l2o(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLAT_L2O_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "flat_l2o_plugin", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_list_regularizers_names_and_describes_them():
    out = flat_l2o("list", "regularizers")
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert {"hessian_top_eigenvalue", "hessian_trace", "local_entropy", "sharpness"} <= set(names)
    assert "Hessian" in out.stdout


def test_list_verbose_shows_every_option_with_its_default(capsys):
    from flat_l2o_plugin.cli import main

    assert main(["list", "wrappers", "-v"]) == 0
    lines = capsys.readouterr().out.splitlines()
    foreign = lines[[i for i, line in enumerate(lines) if line.startswith("foreign ")][0] + 1:]
    options = dict(line.strip().split(" ", 1) for line in foreign[:11])
    assert options["hidden_as"] == '= "argument"' and options["input_layout"] == '= "NF"'
    assert options["update"] == '= "add"' and options["p"] == "= 10.0" and options["log_eps"] == "= 0.0"
    assert options["output_scale"] == "= 1.0" and options["inputs"] == '= ["grad"]'
    assert "plugin_manager" not in "\n".join(lines)  # Python-only: no config can spell it
    assert main(["list", "regularizers", "-v", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"name": "probes", "default": 8, "required": False} in rows["hessian_trace"]["options"]
    assert main(["list", "regularizers", "-v"]) == 0
    assert "activation keys weight, every" in capsys.readouterr().out


def test_plugins_json_lists_the_builtin_plugin_with_its_components():
    out = flat_l2o("plugins", "--json")
    assert out.returncode == 0, out.stderr
    records = {r["name"]: r for r in json.loads(out.stdout)}
    builtin = records["builtin"]
    assert builtin["status"] == "loaded" and builtin["distribution"] == "flat-l2o-plugin"
    assert "register_regularizers" in builtin["hooks"]
    assert "hessian_top_eigenvalue" in builtin["components"]["regularizers"]
    assert "rnnprop" in builtin["components"]["optimizers"]


def test_disabled_builtin_shows_with_all_and_the_variable_that_disabled_it():
    out = flat_l2o("plugins", "--all", "--json", env={"FLAT_L2O_DISABLE_PLUGINS": "builtin"})
    records = {r["name"]: r for r in json.loads(out.stdout)}
    assert records["builtin"]["status"] == "disabled"
    assert records["builtin"]["disabled_by"] == "FLAT_L2O_DISABLE_PLUGINS"
    assert flat_l2o("list", "regularizers", env={"FLAT_L2O_DISABLE_PLUGINS": "builtin"}).stdout == ""


@pytest.mark.parametrize("args", [("list", "bogus"), ("frobnicate",), ()])
def test_usage_errors_exit_2(args):
    out = flat_l2o(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


def test_every_verb_has_help_with_examples():
    for verb in ("plugins", "list", "demo", "meta-train", "evaluate", "flatness", "plot"):
        out = flat_l2o(verb, "--help")
        assert out.returncode == 0 and "examples:" in out.stdout


def test_demo_quick_prints_the_table_and_writes_its_outputs(tmp_path):
    out = flat_l2o("demo", "--quick", "--workers", "1", "--no-progress", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "test acc" in out.stdout and "rnnprop+hessian" in out.stdout and "adam" in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["table"]
    assert {r["task"] for r in rows} == {"mlp_sigmoid_unseen_seeds", "mlp_relu", "mlp_deeper"}
    assert len(rows) == 9
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert results["alpha"] in results["config"]["alphas"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "table.txt").read_text().strip() in out.stdout


TINY_RUN = """
[trainer]
meta_steps = {steps}
unroll = 2
horizon = 4
val_every = 2
val_steps = 4
checkpoint_every = 1
[regularizers.sharpness]
weight = 0.1
"""


def test_meta_train_then_evaluate(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(TINY_RUN.format(steps=4))
    run_dir = tmp_path / "run"
    out = flat_l2o("meta-train", str(config), "--run-dir", str(run_dir), "--no-progress",
                   "--set", "task.options.batch_size=32")
    assert out.returncode == 0, out.stderr
    assert str(run_dir) in out.stdout
    for name in ("optimizer.safetensors", "metrics.jsonl", "config.json", "provenance.json"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all("term/sharpness" in line for line in lines)
    assert json.loads((run_dir / "config.json").read_text())["task"]["options"] == {"batch_size": 32}
    assert json.loads((run_dir / "provenance.json").read_text())["torch"]

    plot = flat_l2o("plot", str(run_dir), "--out", str(tmp_path / "curves.png"))
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "curves.png").stat().st_size > 1000
    empty = flat_l2o("plot", str(tmp_path / "no-such-run"))
    assert empty.returncode == 2 and "Traceback" not in empty.stderr

    evaluation = tmp_path / "eval.json"
    out = flat_l2o("evaluate", str(run_dir / "optimizer.safetensors"), "--adam", "0.01", "--seeds", "2",
                   "--steps", "5", "--no-flatness", "--out", str(evaluation))
    assert out.returncode == 0, out.stderr
    rows = json.loads(evaluation.read_text())
    assert [r["optimizer"] for r in rows] == ["optimizer.safetensors", "adam(lr=0.01)"]
    assert all(r["runs"] == 2 and 0.0 <= r["test_accuracy"] <= 1.0 for r in rows)


@pytest.mark.parametrize("args, message", [
    (("--set", "trainer.meta_step=3"), "did you mean 'meta_steps'"),
    (("--set", "optimizer.name=rnnprp"), "did you mean 'rnnprop'"),
    (("--set", "regularizers.sharpness.rhoo=1"), "did you mean 'rho'"),
])
def test_meta_train_config_errors_exit_2_with_one_line(tmp_path, args, message):
    config = tmp_path / "run.toml"
    config.write_text(TINY_RUN.format(steps=2))
    out = flat_l2o("meta-train", str(config), "--run-dir", str(tmp_path / "run"), *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_meta_train_ctrl_c_checkpoints_and_resumes(tmp_path):
    import signal
    import time

    config = tmp_path / "run.toml"
    config.write_text(TINY_RUN.format(steps=400))
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAT_L2O_")}
    proc = subprocess.Popen([sys.executable, "-m", "flat_l2o_plugin", "meta-train", str(config), "--run-dir",
                             str(run_dir), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env,
                            # As at a terminal: a suite started in the background inherits SIGINT ignored.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 400 and (run_dir / "checkpoint").is_dir()

    config.write_text(TINY_RUN.format(steps=done + 2))
    out = flat_l2o("meta-train", str(config), "--run-dir", str(run_dir), "--no-progress", "--resume")
    assert out.returncode == 0, out.stderr
    steps = [json.loads(line)["meta_step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(done + 2))


def test_evaluate_errors_exit_2(tmp_path):
    missing = flat_l2o("evaluate", str(tmp_path / "missing.safetensors"))
    assert missing.returncode == 2 and "missing.safetensors" in missing.stderr and "Traceback" not in missing.stderr
    nothing = flat_l2o("evaluate")
    assert nothing.returncode == 2 and "at least one" in nothing.stderr


# ------------------------------------------------------------------ in-process: plugin clashes


def test_a_clashing_plugin_does_not_blind_flat_l2o_plugins(fake_entry_points, entry_point, capsys, monkeypatch):
    from flat_l2o_plugin.cli import main

    fake_entry_points(entry_point("duplicate", "duplicate_plugin", dist="dup-dist"))
    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert "builtin  [loaded]" in out and "duplicate  [loaded]" in out
    fix = "FLAT_L2O_DISABLE_PLUGINS=dup-dist"
    assert "conflict: regularizer 'hessian_top_eigenvalue' is registered by both plugin 'builtin'" in out
    assert fix in out and fix in err

    assert main(["plugins", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["duplicate"]["conflicts"] == records["builtin"]["conflicts"] and fix in \
        records["duplicate"]["conflicts"][0]
    assert "hessian_top_eigenvalue" in records["builtin"]["components"]["regularizers"]

    assert main(["list", "regularizers"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'builtin'" in err and "'duplicate'" in err and fix in err

    monkeypatch.setenv("FLAT_L2O_DISABLE_PLUGINS", "dup-dist")  # the advice works
    assert main(["list", "regularizers"]) == 0
