"""A real run, killed (SIGKILL) or interrupted (SIGINT) at random moments and resumed each time,
ends with exactly the metrics and weights of a run that was never interrupted."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meta_training_specs import SMALL_SPEC

from flat_l2o_plugin.training import load_checkpoint, read_metrics, run_meta_training

REPO = Path(__file__).resolve().parents[2]
META_STEPS = 40
SPEC = copy.deepcopy(SMALL_SPEC)
SPEC["trainer"].update(meta_steps=META_STEPS, horizon=6, val_every=10, meta_lr_schedule="cosine", meta_lr_warmup=3)


def strip_wall_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_meta_training(copy.deepcopy(SPEC), run_dir)
    return run_dir


def _completed_lines(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def _launch(spec_file: Path, run_dir: Path, resume: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAT_L2O_")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "flat_l2o_plugin.training.runner", str(spec_file), str(run_dir)]
    return subprocess.Popen(command + (["--resume"] if resume else []), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)


def default_sigint() -> None:
    """In the child: SIGINT raises KeyboardInterrupt, as at a terminal.

    A suite started in the background (``cmd &`` in a script, ``nohup``) inherits SIGINT
    ignored, and so would the run, which would then never see the interruption."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(process: subprocess.Popen, run_dir: Path, after_lines: int, delay: float, sig: int) -> str:
    deadline = time.monotonic() + 180
    while _completed_lines(run_dir) < after_lines:
        if process.poll() is not None:
            pytest.fail(f"the run ended before its interruption at line {after_lines}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no metrics line {after_lines} after 180 s")
        time.sleep(0.005)
    time.sleep(delay)  # somewhere inside the next meta-step (or its checkpoint)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    return stderr


def _run_with_interruptions(tmp_path: Path, signals: list[int], seed: int) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    events = []
    for index, sig in enumerate([*signals, None]):
        spec = copy.deepcopy(SPEC)
        # The checkpoint rate may change on resume; the metrics must not.
        spec["trainer"]["checkpoint_every"] = every = rng.choice([1, 2, 3])
        spec_file = tmp_path / f"spec{index}.json"
        spec_file.write_text(json.dumps(spec))
        resume = index > 0
        start = load_checkpoint(run_dir).step if resume else 0
        process = _launch(spec_file, run_dir, resume)
        if sig is None:
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr
            break
        # Past the first checkpoint of this run, so that there is something to resume.
        after = rng.randint(start + every + 1, min(start + every + 8, META_STEPS - 3))
        stderr = _interrupt(process, run_dir, after, rng.uniform(0.0, 0.08), sig)
        step = load_checkpoint(run_dir).step
        lines = _completed_lines(run_dir)
        if sig == signal.SIGKILL:
            assert process.returncode == -signal.SIGKILL
        else:
            assert process.returncode == 130, stderr
            assert lines - 1 <= step <= lines  # the last completed meta-step
            assert f"holds meta-step {step}; train(resume=True) continues" in stderr
        events.append((signal.Signals(sig).name, after, step))
    return events


def _assert_matches(run_dir: Path, reference: Path, events) -> None:
    assert strip_wall_time(read_metrics(run_dir)) == strip_wall_time(read_metrics(reference)), events
    ours, theirs = load_file(run_dir / "optimizer.safetensors"), load_file(reference / "optimizer.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), events
    assert not list(run_dir.glob(".checkpoint-*")) and not (run_dir / "checkpoint.old").exists()


@pytest.mark.integration
def test_sigkill_and_sigint_then_resume_matches_the_uninterrupted_run(tmp_path, reference):
    seed = random.randrange(2**32)
    events = _run_with_interruptions(tmp_path, [signal.SIGKILL, signal.SIGINT], seed)
    print(f"seed {seed}: (signal, after metrics line, resumed from checkpoint step) {events}")
    _assert_matches(tmp_path / "run", reference, (seed, events))


@pytest.mark.integration
@pytest.mark.slow
def test_three_sigkills_and_a_sigint_then_resume_matches_the_uninterrupted_run(tmp_path, reference):
    seed = random.randrange(2**32)
    events = _run_with_interruptions(tmp_path, [signal.SIGKILL, signal.SIGKILL, signal.SIGINT, signal.SIGKILL],
                                     seed)
    print(f"seed {seed}: (signal, after metrics line, resumed from checkpoint step) {events}")
    _assert_matches(tmp_path / "run", reference, (seed, events))
