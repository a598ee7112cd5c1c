"""A checkpoint's JSON files edited in every way: a resume continues correctly or is refused in one line.

The edits are recorded in the manifest (size and SHA-256), as a careful editor would, so
that what is tested is the reading of the content, not the corruption check.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flat_l2o_plugin.training import TrainingCheckpointError, load_checkpoint, run_meta_training
from flat_l2o_plugin.training.trainer_checkpoint import STATE_LAYOUT

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([-1, 0, 1, 2, 10**6]),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
                     st.sampled_from([{"float": "inf"}, {"float": "-inf"}, {"float": "nan"}]))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                            max_size=3), max_leaves=6)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON tree, as a path of keys and indices (long lists are sampled)."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index in sorted({0, 1, len(value) - 1} & set(range(len(value)))):
            out += _paths(value[index], prefix + (index,))
    return out


def _edit(tree: Any, path: tuple, action: str, value: Any) -> Any:
    if not path:
        return value if action != "wrap" else [tree]
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "wrap":
        parent[last] = {"value": parent[last]} if isinstance(last, str) else [parent[last]]
    else:
        parent[last] = value
    return tree


def _draw_edit(data: st.DataObject, original: Any, skip: tuple | None = None) -> Any:
    """A copy of ``original`` with one place replaced by random JSON, deleted, or wrapped."""
    path = data.draw(st.sampled_from([p for p in _paths(original) if p != skip]), label="path")
    action = data.draw(st.sampled_from(["replace", "delete", "wrap"]) if path else st.just("replace"),
                       label="action")
    value = data.draw(_JSON, label="value") if action == "replace" else None
    return _edit(copy.deepcopy(original), path, action, value)


def _rewrite(path: Path, payload: bytes) -> None:
    path.write_bytes(payload)
    if path.name != "manifest.json":
        manifest_path = path.parent / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["files"][path.name] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        manifest_path.write_text(json.dumps(manifest))


def _one_line(exc: BaseException) -> None:
    text = str(exc)
    assert "\n" not in text and len(text) < 1500, text


@pytest.fixture(scope="module")
def longer_spec(small_spec_module):
    spec = copy.deepcopy(small_spec_module)
    spec["trainer"]["meta_steps"] = 5  # one more meta-step: the restored state is used, not only read
    return spec


@pytest.fixture(scope="module")
def small_spec_module():
    from meta_training_specs import SMALL_SPEC

    return copy.deepcopy(SMALL_SPEC)


def test_the_layout_covers_everything_the_trainer_writes(finished_run):
    state = json.loads((finished_run / "checkpoint" / "trainer.json").read_text())
    informative = {"run_config", "learned_optimizer", "world_size", "step"}
    assert set(state) - informative == set(STATE_LAYOUT)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_an_edited_trainer_json_resumes_or_is_refused_in_one_line(finished_run, longer_spec, data):
    original = json.loads((finished_run / "checkpoint" / "trainer.json").read_text())
    edited = _draw_edit(data, original, skip=("step",))
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        shutil.copytree(finished_run, run)
        _rewrite(run / "checkpoint" / "trainer.json", json.dumps(edited).encode())
        try:
            result = run_meta_training(longer_spec, run, resume=True)
        except TrainingCheckpointError as exc:
            _one_line(exc)
            return
        assert len(result.history) == 5 and all(math.isfinite(h["meta_loss"]) for h in result.history[4:])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_edited_manifest_reads_or_is_refused_in_one_line(finished_run, data):
    original = json.loads((finished_run / "checkpoint" / "manifest.json").read_text())
    edited = _draw_edit(data, original)
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        shutil.copytree(finished_run, run)
        _rewrite(run / "checkpoint" / "manifest.json", json.dumps(edited).encode())
        try:
            checkpoint = load_checkpoint(run)
        except TrainingCheckpointError as exc:
            _one_line(exc)
            return
        assert checkpoint.step == 4


def test_a_deeply_nested_json_file_is_refused_naming_it(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for name in ("trainer.json", "manifest.json"):
        path = run / "checkpoint" / name
        saved = path.read_bytes()
        _rewrite(path, b"[" * 100_000 + b"]" * 100_000)
        with pytest.raises(TrainingCheckpointError, match=f"{path} is nested too deeply"):
            load_checkpoint(run)
        _rewrite(path, saved)


@pytest.mark.parametrize("recorded", ["\n", "a\nb", [1, "\n"]])
def test_a_manifest_size_with_a_newline_is_refused_in_one_line(finished_run, recorded):
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        shutil.copytree(finished_run, run)
        manifest_path = run / "checkpoint" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["files"]["best_weights.safetensors"]["bytes"] = recorded
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(TrainingCheckpointError, match="is corrupted") as error:
            load_checkpoint(run)
        _one_line(error.value)
