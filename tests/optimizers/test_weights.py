"""Saving and loading a learned optimizer: one safetensors file, rebuilt through the registry."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import torch
from torch import nn

from flat_l2o_plugin import OptimizerInfo, get_plugin_manager, hookimpl
from flat_l2o_plugin.errors import ConfigError, UnknownComponentError
from flat_l2o_plugin.optimizers import RNNProp
from flat_l2o_plugin.optimizers.weights import (
    FORMAT_VERSION,
    METADATA_KEY,
    WeightsError,
    load_learned_optimizer,
    read_learned_optimizer_config,
    save_learned_optimizer,
    tensors_digest,
)


@pytest.fixture
def pm():
    # Built-ins only: the tests must not depend on what happens to be installed.
    return get_plugin_manager(entry_points=False)


def _perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    """Weights unlike a fresh build's, so a load that silently kept them would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in module.parameters():
            weight.add_(0.1 * torch.randn(weight.shape, generator=gen, dtype=weight.dtype))
    return module


def _one_step(opt: nn.Module, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(3, 4, generator=gen, dtype=dtype), torch.randn(5, generator=gen, dtype=dtype)]
    grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
    with torch.no_grad():
        state = opt.init_state(params)
        params, state = opt.step(params, grads, state)
        return opt.step(params, grads, state)


def _folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", get_plugin_manager(entry_points=False).components.optimizers.names())
def test_round_trip_gives_identical_steps(tmp_path: Path, pm, name: str) -> None:
    torch.manual_seed(0)
    original = _perturbed(pm.components.optimizers.get(name).create()).eval()
    path = save_learned_optimizer(tmp_path / f"{name}.safetensors", original, name=name, plugin_manager=pm)

    loaded = load_learned_optimizer(path, plugin_manager=pm).eval()

    assert type(loaded) is type(original)
    assert loaded.state_dict().keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    (params_a, state_a), (params_b, state_b) = _one_step(original), _one_step(loaded)
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert _folder_listing(tmp_path) == [f"{name}.safetensors"]  # one file, no sidecar, no leftovers


def test_config_records_name_complete_options_and_versions(tmp_path: Path, pm) -> None:
    opt = RNNProp(hidden_size=8, output_scale=0.05)
    path = save_learned_optimizer(tmp_path / "r.safetensors", opt, name="rnnprop",
                                  options={"hidden_size": 8, "output_scale": 0.05}, plugin_manager=pm)
    config = read_learned_optimizer_config(path)

    assert config["format_version"] == FORMAT_VERSION == 1
    assert config["optimizer"] == "rnnprop"
    assert config["package_version"]
    # Defaults the caller left out are written down too, so a later change of a
    # default cannot change what this file rebuilds.
    assert config["options"] == {"hidden_size": 8, "num_layers": 2, "beta1": 0.95, "beta2": 0.95,
                                 "eps": 1e-8, "output_scale": 0.05, "random_scaling": 0.0}
    with safetensors.safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()[METADATA_KEY]) == config


def test_float64_weights_load_as_float64(tmp_path: Path, pm) -> None:
    torch.manual_seed(0)
    original = _perturbed(RNNProp(hidden_size=4)).double().eval()
    path = save_learned_optimizer(tmp_path / "r.safetensors", original, name="rnnprop",
                                  options={"hidden_size": 4}, plugin_manager=pm)
    loaded = load_learned_optimizer(path, plugin_manager=pm).eval()
    assert loaded.output_layer.weight.dtype == torch.float64
    (a, _), (b, _) = _one_step(original, torch.float64), _one_step(loaded, torch.float64)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


class _TinyOptimizer(nn.Module):
    """A third-party learned optimizer: θ ← θ - exp(log_lr)·g."""

    def __init__(self, initial_lr: float = 0.1) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(float(initial_lr)).log())

    def init_state(self, params):
        return {"step": torch.zeros((), dtype=torch.int64)}

    def step(self, params, grads, state):
        return [p - self.log_lr.exp() * g for p, g in zip(params, grads)], {"step": state["step"] + 1}


class _TinyPlugin:
    @hookimpl
    def register_optimizers(self, register: Callable[[OptimizerInfo], None]) -> None:
        register(OptimizerInfo(name="tiny_sgd", factory=_TinyOptimizer, description="learned step size"))


def test_third_party_optimizer_loads_where_its_plugin_is_installed(tmp_path: Path) -> None:
    with_plugin = get_plugin_manager(entry_points=False, plugins=[("tiny", _TinyPlugin())])
    opt = _TinyOptimizer(initial_lr=0.3)
    path = save_learned_optimizer(tmp_path / "tiny.safetensors", opt, name="tiny_sgd", plugin_manager=with_plugin)

    loaded = load_learned_optimizer(path, plugin_manager=with_plugin)
    assert torch.equal(loaded.log_lr, opt.log_lr)

    with pytest.raises(UnknownComponentError, match=r"tiny\.safetensors.*unknown optimizer 'tiny_sgd'"):
        load_learned_optimizer(path, plugin_manager=get_plugin_manager(entry_points=False))


def test_default_plugin_manager_and_no_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_learned_optimizer(tmp_path / "r.safetensors", RNNProp(), name="rnnprop")

    def refuse(*args, **kwargs):
        raise AssertionError("a weights file must never be unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    assert isinstance(load_learned_optimizer(path), RNNProp)


# ---------------------------------------------------------------------- atomicity


def _disk_full_after_half(monkeypatch: pytest.MonkeyPatch) -> None:
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, handle) -> None:
            self._handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc_info) -> None:
            self._handle.close()

        def write(self, data: bytes) -> int:
            self._handle.write(data[: len(data) // 2])
            self._handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfWriter(real_fdopen(fd, *a, **k)))


def _fsync_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", fsync)


def _interrupted_before_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    def replace(src, dst) -> None:
        raise KeyboardInterrupt  # not an Exception: cleanup must not rely on `except Exception`

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("failure", [_disk_full_after_half, _fsync_fails, _interrupted_before_rename])
def test_failed_write_leaves_previous_file_and_no_partial_file(
    tmp_path: Path, pm, monkeypatch: pytest.MonkeyPatch, failure: Callable[[pytest.MonkeyPatch], None]
) -> None:
    path = tmp_path / "r.safetensors"
    old = RNNProp(hidden_size=4)
    save_learned_optimizer(path, old, name="rnnprop", options={"hidden_size": 4}, plugin_manager=pm)
    before = path.read_bytes()

    failure(monkeypatch)
    with pytest.raises((OSError, KeyboardInterrupt)):
        save_learned_optimizer(path, _perturbed(RNNProp(hidden_size=4)), name="rnnprop",
                               options={"hidden_size": 4}, plugin_manager=pm)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert _folder_listing(tmp_path) == ["r.safetensors"]
    loaded = load_learned_optimizer(path, plugin_manager=pm)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))


def test_failed_first_write_leaves_nothing(tmp_path: Path, pm, monkeypatch: pytest.MonkeyPatch) -> None:
    _disk_full_after_half(monkeypatch)
    with pytest.raises(OSError):
        save_learned_optimizer(tmp_path / "r.safetensors", RNNProp(), name="rnnprop", plugin_manager=pm)
    monkeypatch.undo()
    assert _folder_listing(tmp_path) == []


# ---------------------------------------------------------------------- errors


def test_missing_file_is_named(tmp_path: Path, pm) -> None:
    with pytest.raises(WeightsError, match=r"nope\.safetensors does not exist; write one with save_learned_optimizer"):
        load_learned_optimizer(tmp_path / "nope.safetensors", plugin_manager=pm)
    with pytest.raises(WeightsError, match="is not a file"):
        load_learned_optimizer(tmp_path, plugin_manager=pm)


def test_missing_folder_on_save_is_named(tmp_path: Path, pm) -> None:
    with pytest.raises(WeightsError, match="does not exist; create it first"):
        save_learned_optimizer(tmp_path / "no" / "r.safetensors", RNNProp(), name="rnnprop", plugin_manager=pm)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_named(tmp_path: Path, pm, damage: str) -> None:
    path = tmp_path / "r.safetensors"
    if damage == "garbage":
        path.write_bytes(b"\x00\x01 this is not a safetensors file")
    else:
        save_learned_optimizer(path, RNNProp(), name="rnnprop", plugin_manager=pm)
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"r\.safetensors .*(not a readable safetensors file|truncated)"):
        load_learned_optimizer(path, plugin_manager=pm)


def _write_raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _config(**overrides) -> str:
    return json.dumps({"format_version": 1, "optimizer": "rnnprop", "options": {}, "package_version": "0.1.0",
                       **overrides})


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (None, "has no 'flat_l2o_plugin.learned_optimizer' metadata.*save_learned_optimizer"),
        ({METADATA_KEY: "{not json"}, "metadata is not valid JSON"),
        ({METADATA_KEY: "[1, 2]"}, "must be a JSON object, got list"),
        ({METADATA_KEY: json.dumps({"optimizer": "rnnprop"})}, r"metadata lacks \['format_version', 'options'"),
        ({METADATA_KEY: _config(format_version=2, package_version="9.0")},
         "format version 2, written by flat-l2o-plugin 9.0; .*upgrade"),
        ({METADATA_KEY: _config(format_version="1")}, "format_version must be a positive integer"),
        ({METADATA_KEY: _config(options=[1])}, "'options' must be a JSON object"),
        ({METADATA_KEY: _config(optimizer="")}, "'optimizer' must be a registered name"),
        ({METADATA_KEY: _config(options={"hidden_size": 0})}, "cannot build 'rnnprop'.*hidden_size"),
        ({METADATA_KEY: _config(options={"no_such_option": 1})}, "no_such_option"),
        ({METADATA_KEY: _config(tensors_sha256="abc")}, "'tensors_sha256' must be 64 hex digits"),
    ],
)
def test_bad_metadata_is_named(tmp_path: Path, pm, metadata, message: str) -> None:
    path = _write_raw(tmp_path / "bad.safetensors", RNNProp().state_dict(), metadata)
    with pytest.raises(WeightsError, match=message) as info:
        load_learned_optimizer(path, plugin_manager=pm)
    assert str(path) in str(info.value)


def test_unknown_optimizer_name(tmp_path: Path, pm) -> None:
    path = _write_raw(tmp_path / "x.safetensors", RNNProp().state_dict(), {METADATA_KEY: _config(optimizer="rnnpop")})
    with pytest.raises(UnknownComponentError, match=r"x\.safetensors.*unknown optimizer 'rnnpop' \(did you mean 'rnnprop'\?\)"):
        load_learned_optimizer(path, plugin_manager=pm)


def test_shape_mismatch_lists_the_tensors(tmp_path: Path, pm) -> None:
    # Weights of a 20-unit RNNProp under a config that builds an 8-unit one.
    path = _write_raw(tmp_path / "m.safetensors", RNNProp(hidden_size=20).state_dict(),
                      {METADATA_KEY: _config(options={"hidden_size": 8})})
    with pytest.raises(WeightsError, match=r"m\.safetensors.*shape mismatch: .*cells\.0\.weight_hh: expected \(32, 8\), the file has \(80, 20\).*more"):
        load_learned_optimizer(path, plugin_manager=pm)


def test_missing_and_unexpected_tensors(tmp_path: Path, pm) -> None:
    tensors = dict(RNNProp().state_dict())
    tensors.pop("output_layer.bias")
    tensors["extra"] = torch.zeros(1)
    path = _write_raw(tmp_path / "k.safetensors", tensors, {METADATA_KEY: _config()})
    with pytest.raises(WeightsError, match=r"missing from the file: \['output_layer.bias'\].*not in the rebuilt optimizer: \['extra'\]"):
        load_learned_optimizer(path, plugin_manager=pm)


def test_save_refuses_a_config_that_does_not_rebuild_the_module(tmp_path: Path, pm) -> None:
    with pytest.raises(WeightsError, match="shape mismatch.*save with the name and options the optimizer was built with"):
        save_learned_optimizer(tmp_path / "r.safetensors", RNNProp(hidden_size=8), name="rnnprop", plugin_manager=pm)
    with pytest.raises(WeightsError, match=r"module given do not fit.*not in the rebuilt optimizer: \['input_layer"):
        save_learned_optimizer(tmp_path / "r.safetensors", RNNProp(), name="l2o_dm", plugin_manager=pm)
    with pytest.raises(WeightsError, match="options must be JSON-serializable"):
        save_learned_optimizer(tmp_path / "r.safetensors", RNNProp(), name="rnnprop",
                               options={"eps": object()}, plugin_manager=pm)
    with pytest.raises(WeightsError, match="must be the learned optimizer's nn.Module"):
        save_learned_optimizer(tmp_path / "r.safetensors", {"not": "a module"}, name="rnnprop",  # type: ignore[arg-type]
                               plugin_manager=pm)
    with pytest.raises(UnknownComponentError):
        save_learned_optimizer(tmp_path / "r.safetensors", RNNProp(), name="nope", plugin_manager=pm)
    assert _folder_listing(tmp_path) == []
    assert issubclass(WeightsError, ConfigError)


# ---------------------------------------------------------------------- tensor digest


def test_a_flipped_bit_in_the_tensor_data_is_refused_in_one_line_naming_the_file(tmp_path: Path, pm, capsys) -> None:
    path = save_learned_optimizer(tmp_path / "r.safetensors", _perturbed(RNNProp()), name="rnnprop",
                                  plugin_manager=pm)
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x04  # one bit of one weight, the header untouched
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"r\.safetensors is corrupted: its tensors' SHA-256") as info:
        load_learned_optimizer(path, plugin_manager=pm)
    assert "\n" not in str(info.value)

    from flat_l2o_plugin.cli import main

    assert main(["evaluate", str(path), "--seeds", "1", "--steps", "1", "--no-flatness"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is corrupted" in err and str(path) in err


def test_a_file_written_before_the_digest_existed_loads_and_a_new_save_adds_one(tmp_path: Path, pm) -> None:
    original = _perturbed(RNNProp())
    path = _write_raw(tmp_path / "old.safetensors", original.state_dict(), {METADATA_KEY: _config()})
    loaded = load_learned_optimizer(path, plugin_manager=pm)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), original.state_dict().values()))
    save_learned_optimizer(path, loaded, name="rnnprop", plugin_manager=pm)
    digest = read_learned_optimizer_config(path)["tensors_sha256"]
    assert digest == tensors_digest(original.state_dict()) and len(digest) == 64
