"""Fixtures of the meta-training tests: one small run spec, and the run it produces."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

# Helper modules of these tests (the shared specs, the torchrun worker) are imported by name.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from meta_training_specs import SMALL_SPEC  # noqa: E402


@pytest.fixture
def small_spec():
    return copy.deepcopy(SMALL_SPEC)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed run folder of ``SMALL_SPEC`` (copy it before modifying it)."""
    from flat_l2o_plugin.training import run_meta_training

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_meta_training(copy.deepcopy(SMALL_SPEC), run_dir)
    return run_dir
