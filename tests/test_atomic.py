"""Atomic writes publish ordinary files: the mode ``open()`` would give them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from flat_l2o_plugin import create_optimizer
from flat_l2o_plugin._atomic import write_atomically
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.optimizers.weights import save_learned_optimizer


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_the_umask_mode_not_0600(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "value.json"
    write_atomically(target, b"{}", ConfigError)
    assert target.read_bytes() == b"{}"
    assert _mode(target) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["value.json"]  # no temporary file left

    weights = save_learned_optimizer(tmp_path / "rnnprop.safetensors", create_optimizer("rnnprop"), name="rnnprop")
    assert _mode(weights) == 0o644

    os.umask(0o077)  # a user who wants private files still gets them
    private = tmp_path / "private.json"
    write_atomically(private, b"{}", ConfigError)
    assert _mode(private) == 0o600
