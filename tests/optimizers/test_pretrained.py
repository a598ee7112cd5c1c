"""Pre-trained optimizers: registration, the digest check, the torch.optim face, timm, the CLI."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from flat_l2o_plugin import PretrainedInfo, get_plugin_manager, hookimpl
from flat_l2o_plugin.builtin import shipped_pretrained
from flat_l2o_plugin.cli import main
from flat_l2o_plugin.errors import DuplicateComponentError
from flat_l2o_plugin.integrations.torch_optim import LearnedOptimizerTorch, OptimizerStateError
from flat_l2o_plugin.optimizers.pretrained import PretrainedWeightsError, load_pretrained

SHIPPED = {info.name: info for info in shipped_pretrained()}


class _Plugin:
    """Registers the given infos as pretrained optimizers."""

    def __init__(self, *infos: PretrainedInfo) -> None:
        self.infos = infos

    @hookimpl
    def register_pretrained(self, register):  # noqa: ANN001, ANN201
        for info in self.infos:
            register(info)


def _copy_of(info: PretrainedInfo, **changes) -> PretrainedInfo:  # noqa: ANN003
    fields = {k: getattr(info, k) for k in info.__dataclass_fields__}
    return PretrainedInfo(**{**fields, **changes})


def test_the_shipped_weights_are_the_files_whose_digest_is_registered() -> None:
    assert set(SHIPPED) == {"l2o-correction-sam", "l2o-correction-adam"}
    for info in SHIPPED.values():
        path = Path(__file__).resolve().parents[2] / "flat_l2o_plugin" / info.weights
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256
    assert [w["name"] for w in SHIPPED["l2o-correction-sam"].wrappers] == ["sam_gradient"]


@pytest.mark.parametrize("name", ["l2o-correction-adam", "l2o-correction-sam"])
def test_a_pretrained_name_trains_without_warning_and_records_name_and_version(name: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    x = torch.randn(32, 6)
    y = x @ torch.randn(6, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = LearnedOptimizerTorch(model.parameters(), name)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = float(opt.step(closure).detach())
    for _ in range(30):
        last = float(opt.step(closure).detach())
    assert last < first
    identity = opt.state_dict()["learned_optimizer"]
    assert identity["pretrained"] == {"name": name, "version": SHIPPED[name].version}
    assert identity["optimizer"] == "learned_correction"


def test_state_of_another_pretrained_version_is_refused() -> None:
    model = torch.nn.Linear(3, 1)
    opt = LearnedOptimizerTorch(model.parameters(), "l2o-correction-adam")
    saved = opt.state_dict()
    saved["learned_optimizer"] = {**saved["learned_optimizer"],
                                  "pretrained": {"name": "l2o-correction-adam", "version": "0"}}
    with pytest.raises(OptimizerStateError, match="differing: pretrained"):
        opt.load_state_dict(saved)


def test_a_changed_weights_file_is_refused_naming_file_and_plugin(tmp_path: Path) -> None:
    info = SHIPPED["l2o-correction-adam"]
    source = Path(__file__).resolve().parents[2] / "flat_l2o_plugin" / info.weights
    package = tmp_path / "damaged_pretrained_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    data = bytearray(source.read_bytes())
    data[-1] ^= 1
    (package / "w.safetensors").write_bytes(bytes(data))
    bad = _copy_of(info, name="damaged", package="damaged_pretrained_pkg", weights="w.safetensors")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        pm = get_plugin_manager(entry_points=False, plugins=[("damaged-plugin", _Plugin(bad))])
        with pytest.raises(PretrainedWeightsError) as caught:
            load_pretrained("damaged", plugin_manager=pm)
        message = str(caught.value)
        assert "\n" not in message and str(package / "w.safetensors") in message and "'damaged-plugin'" in message
        assert load_pretrained("l2o-correction-adam", plugin_manager=pm).info is not None  # the rest still load
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("damaged_pretrained_pkg", None)


def test_a_name_registered_twice_or_equal_to_a_model_name_names_both_plugins() -> None:
    info = SHIPPED["l2o-correction-adam"]
    pm = get_plugin_manager(entry_points=False, plugins=[("other-plugin", _Plugin(info))])
    with pytest.raises(DuplicateComponentError, match="'l2o-correction-adam'.*'builtin'.*'other-plugin'"):
        pm.components
    # A pretrained name may not shadow a model: LearnedOptimizerTorch(params, name) takes both kinds.
    pm = get_plugin_manager(entry_points=False, plugins=[("shadow-plugin", _Plugin(_copy_of(info, name="rnnprop")))])
    with pytest.raises(DuplicateComponentError,
                       match="optimizer and pretrained optimizer 'rnnprop' is registered by both .*'builtin'.*"
                             "'shadow-plugin'"):
        pm.components


@pytest.mark.parametrize("changes, field", [({"name": "Bad_Name"}, "name"), ({"sha256": "abc"}, "sha256"),
                                            ({"weights": "w.pt"}, "weights"), ({"version": ""}, "version")])
def test_pretrained_info_refuses_bad_metadata(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"\.{field} "):
        _copy_of(SHIPPED["l2o-correction-adam"], **changes)


def test_options_and_weights_are_refused_with_a_pretrained_name(tmp_path: Path) -> None:
    from flat_l2o_plugin.errors import ConfigError

    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="drop options="):
        LearnedOptimizerTorch(params, "l2o-correction-adam", options={"lr": 0.1})


def test_timm_creates_every_pretrained_name_with_no_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm")
    from timm.optim._optim_factory import default_registry

    from flat_l2o_plugin.integrations.timm import register_installed_with_timm

    # timm's registry is global: what this test registers leaves with it.
    monkeypatch.setattr(default_registry, "_optimizers", dict(default_registry._optimizers))

    registered = register_installed_with_timm()
    model = torch.nn.Linear(4, 2)
    for name in SHIPPED:
        assert name in registered
        opt = timm.optim.create_optimizer_v2(model, name)
        assert isinstance(opt, LearnedOptimizerTorch)
        assert opt.learned_identity["pretrained"]["name"] == name


def test_cli_lists_pretrained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "pretrained", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["l2o-correction-sam"]["status"] == "ok"
    assert rows["l2o-correction-sam"]["wrappers"] == [{"name": "sam_gradient", "rho": 0.1}]
    assert rows["l2o-correction-adam"]["plugin"] == "builtin"
    assert main(["list", "pretrained"]) == 0
    out = capsys.readouterr().out
    assert "model: learned_correction(base=adam, lr=0.01) + sam_gradient(rho=0.1)" in out


def test_step_without_a_closure_on_a_sam_stack_names_the_closure_and_a_name_that_needs_none() -> None:
    from flat_l2o_plugin.integrations.torch_optim import ClosureRequiredError

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    opt = LearnedOptimizerTorch(model.parameters(), "l2o-correction-sam")
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ClosureRequiredError) as caught:
        opt.step()
    message = str(caught.value)
    assert "\n" not in message and "'l2o-correction-sam'" in message and "step(closure)" in message
    assert "train.py" in message and "l2o-correction-adam" in message and "l2o-correction-sam," not in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)  # the same optimizer steps with one
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    plain = LearnedOptimizerTorch(model.parameters(), "l2o-correction-adam")
    plain.step()  # and a stack that needs no closure steps without


def test_a_sam_gradient_of_radius_zero_needs_no_closure() -> None:
    from flat_l2o_plugin import create_optimizer
    from flat_l2o_plugin.wrappers import SAMGradient

    model = torch.nn.Linear(3, 1)
    model(torch.randn(2, 3)).sum().backward()
    opt = LearnedOptimizerTorch(model.parameters(), SAMGradient(create_optimizer("learned_correction"), rho=0.0))
    opt.step()
