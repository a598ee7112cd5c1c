"""``[optimizer] module = "package.module:Class"``: the user's own class, its options and weights, from a config."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from flat_l2o_plugin.config import load_config, validate_components
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.optimizers.external import build_optimizer, load_state_dict_file
from flat_l2o_plugin.training.runner import build_learned_optimizer
from flat_l2o_plugin.wrappers import ForeignAdapter

CLIENT = textwrap.dedent('''
    import torch
    from torch import nn

    UNPICKLED = []


    def mark():
        UNPICKLED.append(1)
        return "payload"


    class Payload:
        def __reduce__(self):
            return (mark, ())


    class CellOptimizer(nn.Module):
        def __init__(self, hidden_size=8, scale=1.0):
            super().__init__()
            self.cell = nn.LSTMCell(1, hidden_size)
            self.out = nn.Linear(hidden_size, 1)
            self.scale = scale

        def forward(self, x, hidden):
            h, c = self.cell(x, hidden)
            return self.out(h) * self.scale, (h, c)
''')

FOREIGN = {"name": "foreign", "inputs": ["grad"], "hidden": [["zeros", 8], ["zeros", 8]]}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project folder: their module file (under a name unique to this test) and a config beside it."""
    name = f"client_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(CLIENT)
    monkeypatch.chdir(tmp_path.parent)  # not the project folder: the config's folder must be searched
    return tmp_path, name


def _config(folder, name, extra=""):
    path = folder / "run.toml"
    path.write_text(f'[optimizer]\nmodule = "{name}:CellOptimizer"\noptions = {{ hidden_size = 8 }}\n{extra}\n'
                    f'[[wrappers]]\nname = "foreign"\ninputs = ["grad"]\nhidden = [["zeros", 8], ["zeros", 8]]\n')
    return path


def test_a_config_names_the_users_class_its_options_and_weights(project):
    folder, name = project
    torch.manual_seed(1)
    (folder / "weights").mkdir()
    saved = {k: torch.randn_like(v) for k, v in _fresh_state(folder, name).items()}
    torch.save(saved, folder / "weights" / "pretrained.pt")
    config = load_config(_config(folder, name, 'weights = "weights/pretrained.pt"'), environ={})
    assert config.optimizer.name is None and config.optimizer.module == f"{name}:CellOptimizer"
    assert config.optimizer.weights == str(folder / "weights" / "pretrained.pt")  # relative to the config
    assert config.optimizer.python_path == [str(folder)]
    validate_components(config)
    model, learned = build_learned_optimizer(config.as_dict()["optimizer"], config.wrappers)
    assert isinstance(learned, ForeignAdapter) and learned.inner is model
    assert list(learned.state_dict()) == list(saved)  # the user's own keys
    assert all(torch.equal(learned.state_dict()[k], v) for k, v in saved.items())

    save_file(saved, folder / "weights" / "pretrained.safetensors")
    config = load_config(_config(folder, name, 'weights = "weights/pretrained.safetensors"'), environ={})
    model, _ = build_learned_optimizer(config.as_dict()["optimizer"], config.wrappers)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def _fresh_state(folder, name):
    config = load_config(_config(folder, name), environ={})
    return build_optimizer(config.as_dict()["optimizer"]).state_dict()


def test_only_tensors_are_ever_unpickled(project):
    folder, name = project
    config = load_config(_config(folder, name), environ={})
    build_optimizer(config.as_dict()["optimizer"])  # imports the user's module, whose classes we need below
    module = sys.modules[name]
    torch.save({"cell.weight_ih": torch.zeros(1), "extra": module.Payload()}, folder / "evil.pt")
    with pytest.raises(ConfigError, match=r"optimizer.weights: .*evil.pt is not a tensors-only file.*weights_only"):
        load_state_dict_file(folder / "evil.pt")
    assert module.UNPICKLED == []  # the payload's code never ran

    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, folder / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"holds a dict with entries \['epoch', 'state_dict'\], not a state_dict"):
        load_state_dict_file(folder / "checkpoint.pt")
    (folder / "weights.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"must be a .safetensors file or a tensors-only .pt/.pth/.bin"):
        load_state_dict_file(folder / "weights.npz")
    with pytest.raises(ConfigError, match="does not exist"):
        load_state_dict_file(folder / "missing.pt")


def test_weights_that_do_not_fit_name_the_keys(project):
    folder, name = project
    state = _fresh_state(folder, name)
    torch.save({**{k: v for k, v in state.items() if k != "out.bias"}, "out.extra": torch.zeros(1)},
               folder / "other.pt")
    config = load_config(_config(folder, name, 'weights = "other.pt"'), environ={})
    with pytest.raises(ConfigError, match=r"optimizer.weights: .*other.pt does not fit .*missing from the file: "
                                          r"\['out.bias'\]; not in the module: \['out.extra'\]"):
        validate_components(config)


@pytest.mark.parametrize("optimizer, message", [
    ({"module": "no_such_module_xyz:Optimizer"}, r"optimizer.module: no module named 'no_such_module_xyz'"),
    ({"module": "{name}:CellOptimizr"}, r"has no attribute 'CellOptimizr' \(did you mean 'CellOptimizer'\?\)"),
    ({"module": "{name}.CellOptimizer"}, r"optimizer.module must look like 'package.module:Class'"),
    ({"module": "{name}:CellOptimizer", "name": "rnnprop"}, r"give name .* or module .*, not both"),
    ({"name": "{name}:CellOptimizer"}, r"optimizer.name must be a component name.*write module = "),
    ({"module": "{name}:CellOptimizer", "options": {"hiden_size": 3}},
     r"optimizer.options: optimizer 'CellOptimizer' has no option 'hiden_size' \(did you mean 'hidden_size'\?\)"),
])
def test_errors_name_the_optimizer_field(project, optimizer, message):
    folder, name = project
    optimizer = {k: v.format(name=name) if isinstance(v, str) else v for k, v in optimizer.items()}
    with pytest.raises(ConfigError, match=message):
        config = load_config({"optimizer": {**optimizer, "python_path": [str(folder)]}, "wrappers": [FOREIGN]},
                             environ={})
        validate_components(config)


def test_a_module_no_wrapper_adapts_is_refused_with_the_fix(project):
    folder, name = project
    config = load_config({"optimizer": {"module": f"{name}:CellOptimizer", "python_path": [str(folder)]}},
                         environ={})
    with pytest.raises(ConfigError, match=r"is not a learned optimizer .*name = \"foreign\", first in the list"):
        validate_components(config)


def test_another_module_of_the_same_name_is_not_silently_used(project, tmp_path_factory):
    folder, name = project
    load_config(_config(folder, name), environ={})
    build_optimizer(load_config(_config(folder, name), environ={}).as_dict()["optimizer"])
    other = tmp_path_factory.mktemp("other")
    (other / f"{name}.py").write_text(CLIENT)
    with pytest.raises(ConfigError, match=rf"a module named '{name}' is already imported from .*rename one"):
        build_optimizer(load_config(_config(other, name), environ={}).as_dict()["optimizer"])


def test_registered_optimizers_take_weights_too(tmp_path):
    from flat_l2o_plugin import create_optimizer

    torch.manual_seed(3)
    trained = create_optimizer("l2o_dm")
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "l2o_dm.safetensors")
    config = load_config({"optimizer": {"name": "l2o_dm", "weights": str(tmp_path / "l2o_dm.safetensors")}},
                         environ={})
    model = build_optimizer(config.as_dict()["optimizer"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_paths_resolve_without_touching_the_callers_table(project):
    folder, name = project
    optimizer = {"module": f"{name}:CellOptimizer", "weights": "w.pt"}
    # A callable hidden spec makes the dict impossible to copy through JSON.
    source = {"optimizer": optimizer, "wrappers": [{**FOREIGN, "hidden": lambda n, device, dtype: None}]}
    config = load_config(source, environ={})
    assert config.optimizer.weights == str(folder.parent / "w.pt")  # relative to the current directory
    assert optimizer == {"module": f"{name}:CellOptimizer", "weights": "w.pt"}
