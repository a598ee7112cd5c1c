"""The foreign adapter runs users' own L2O modules, unchanged, as learned optimizers.

The modules below are written the way public PyTorch re-implementations of
Andrychowicz et al. (2016) write them: one around ``nn.LSTM`` fed a length-1 sequence,
one a stack of ``nn.LSTMCell`` with a list of ``(h, c)`` pairs.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from flat_l2o_plugin import FlatL2O
from flat_l2o_plugin.errors import ConfigError, FlatL2OError
from flat_l2o_plugin.optimizers import adam_features, log_sign_preprocess
from flat_l2o_plugin.testing import check_learned_optimizer, isolated_plugin_manager
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer
from flat_l2o_plugin.wrappers import ForeignAdapter


class LSTMOptimizer(nn.Module):
    def __init__(self, input_size=2, hidden_size=20, num_layers=2):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers)
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, inp, hidden):
        output, hidden = self.lstm(inp, hidden)
        return self.linear(output) * 0.1, hidden


class CellStackOptimizer(nn.Module):
    def __init__(self, input_size=2, hidden_size=20, num_layers=2):
        super().__init__()
        self.cells = nn.ModuleList(
            [nn.LSTMCell(input_size if i == 0 else hidden_size, hidden_size) for i in range(num_layers)])
        self.output = nn.Linear(hidden_size, 1)

    def forward(self, x, hidden):
        new_hidden = []
        for cell, (h, c) in zip(self.cells, hidden):
            h, c = cell(x, (h, c))
            new_hidden.append((h, c))
            x = h
        return self.output(x).squeeze(-1), new_hidden


class GRUOptimizer(nn.Module):
    """A single-tensor hidden state."""

    def __init__(self, input_size=1, hidden_size=8):
        super().__init__()
        self.cell = nn.GRUCell(input_size, hidden_size)
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, x, h):
        h = self.cell(x, h)
        return self.out(h), h


def lstm_adapter(**overrides):
    spec = dict(inputs=["log_sign"], input_layout="1NF", hidden=[["zeros", 2, "N", 20], ["zeros", 2, "N", 20]])
    return ForeignAdapter(LSTMOptimizer(), **{**spec, **overrides})


def cell_stack_adapter(**overrides):
    spec = dict(inputs=["log_sign"], hidden=[[["zeros", 20], ["zeros", 20]], [["zeros", 20], ["zeros", 20]]],
                output_scale=0.1)
    return ForeignAdapter(CellStackOptimizer(), **{**spec, **overrides})


ADAPTERS = {
    "lstm": (lstm_adapter, ["hidden.0", "hidden.1"]),
    "cell_stack": (cell_stack_adapter, ["hidden.0.0", "hidden.0.1", "hidden.1.0", "hidden.1.1"]),
}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_adapted_modules_pass_the_learned_optimizer_conformance_check(kind):
    check_learned_optimizer(ADAPTERS[kind][0], meta_training=False)


def _grads(params, targets):
    return [p.detach() - t for p, t in zip(params, targets)]


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_protocol_state_and_meta_gradient(kind):
    make, hidden_keys = ADAPTERS[kind]
    torch.manual_seed(0)
    adapter = make()
    params = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64)]
    targets = [torch.zeros_like(p) for p in params]
    state = adapter.init_state(params)
    assert list(state) == ["step", *hidden_keys]
    new_params, state = params, state
    for _ in range(2):  # the recurrent weights get a gradient from the second step on
        new_params, state = adapter.step(new_params, _grads(new_params, targets), state)
    assert [p.shape for p in new_params] == [p.shape for p in params]
    assert [p.dtype for p in new_params] == [torch.float32, torch.float64]
    assert list(state) == ["step", *hidden_keys] and int(state["step"]) == 2

    meta_loss = sum(p.sum() for p in new_params)
    names, weights = zip(*adapter.named_parameters())
    for name, grad in zip(names, torch.autograd.grad(meta_loss, weights)):
        assert grad.abs().sum() > 0, name

    # The flat state saves and resumes like any other.
    with torch.no_grad():
        loaded = load_safetensors(save_safetensors({k: v.detach().contiguous() for k, v in state.items()}))
        a, _ = adapter.step(new_params, _grads(new_params, targets), state)
        b, _ = adapter.step(new_params, _grads(new_params, targets), loaded)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_matches_the_module_driven_by_hand():
    torch.manual_seed(0)
    module = CellStackOptimizer()
    adapter = ForeignAdapter(module, inputs="log_sign", p=5.0, output_scale=0.1, update="subtract",
                             hidden=[[["zeros", 20], ["zeros", 20]], [["zeros", 20], ["zeros", 20]]])
    theta, target = torch.randn(7), torch.randn(7)
    state = adapter.init_state([theta])
    hidden = [(torch.zeros(7, 20), torch.zeros(7, 20)) for _ in range(2)]
    ours, by_hand = theta, theta
    for _ in range(3):
        (ours,), state = adapter.step([ours], [ours - target], state)
        update, hidden = module(log_sign_preprocess(by_hand - target, 5.0), hidden)
        by_hand = by_hand - 0.1 * update
        assert torch.equal(ours, by_hand)
    assert torch.equal(state["hidden.1.0"], hidden[1][0])


def test_adam_inputs_and_a_callable_hidden_state():
    torch.manual_seed(0)
    module = GRUOptimizer(input_size=3)
    adapter = ForeignAdapter(module, inputs=["adam", "grad"], beta1=0.9, beta2=0.99,
                             hidden=lambda n, device, dtype: torch.zeros(n, 8, device=device, dtype=dtype))
    theta, grad = torch.randn(6), torch.randn(6)
    state = adapter.init_state([theta])
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "hidden", "step"]
    (new,), state = adapter.step([theta], [grad], state)
    features, m, v = adam_features(grad, torch.zeros(6), torch.zeros(6), torch.tensor(1),
                                   beta1=0.9, beta2=0.99, eps=1e-8)
    update, h = module(torch.cat([features, grad.unsqueeze(-1)], dim=-1), torch.zeros(6, 8))
    assert torch.equal(new, theta + update.squeeze(-1))
    assert torch.equal(state["exp_avg"], m) and torch.equal(state["hidden"], h)


def test_state_dict_keys_are_the_modules():
    module = LSTMOptimizer()
    adapter = lstm_adapter()
    assert list(adapter.state_dict()) == list(module.state_dict())
    adapter.load_state_dict(module.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(adapter.parameters(), module.parameters()))


def test_spec_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"foreign.inputs\[1\]"):
        ForeignAdapter(GRUOptimizer(), inputs=["grad", "logsign"])
    with pytest.raises(ConfigError, match=r"foreign.hidden.1"):
        ForeignAdapter(GRUOptimizer(), hidden=[["zeros", 8], ["ones", 8]])
    with pytest.raises(ConfigError, match=r"foreign.hidden.0"):
        ForeignAdapter(GRUOptimizer(), hidden=[["zeros", "N", "N"]])
    with pytest.raises(ConfigError, match="foreign.update"):
        ForeignAdapter(GRUOptimizer(), update="minus")
    with pytest.raises(ConfigError, match="foreign.input_layout"):
        ForeignAdapter(GRUOptimizer(), input_layout="NTF")


def test_a_module_that_does_not_fit_the_spec_is_refused_when_the_adapter_is_built():
    with pytest.raises(ConfigError, match=r"foreign.inputs: the module takes 1 feature.*inputs = \['grad'\]"):
        ForeignAdapter(GRUOptimizer(input_size=1), inputs=["log_sign"], hidden=["zeros", 8])
    with pytest.raises(ConfigError, match=r"foreign.input_layout.*input_layout = 'NF'"):
        ForeignAdapter(CellStackOptimizer(input_size=2), inputs=["log_sign"], input_layout="1NF",
                       hidden=[[["zeros", 20], ["zeros", 20]]] * 2)
    with pytest.raises(ConfigError, match=r"foreign.hidden: GRUOptimizer.forward\(x, h\) takes its state as 1.*"
                                          r"foreign.hidden is None"):
        ForeignAdapter(GRUOptimizer(), hidden=None)
    with pytest.raises(ConfigError, match="hidden leaves"):
        ForeignAdapter(CellStackOptimizer(input_size=1), hidden=[[["zeros", 20], ["zeros", 20]]] * 3)
    with pytest.raises(ConfigError, match=r"foreign.hidden: IgnoresItsState.forward returned 'hidden' of shape "
                                          r"\(3, 8\).*builds \(3, 5\)"):
        ForeignAdapter(IgnoresItsState(), hidden=["zeros", 5])


class IgnoresItsState(GRUOptimizer):
    def forward(self, x, h):
        return super().forward(x, None)


class Quadratic:
    """f(θ) = ½θᵀAθ - bᵀθ with the eigenvalues of A in [0.5, 2]; deterministic batches."""

    name = "quadratic"

    def __init__(self, dim: int = 10) -> None:
        gen = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
        self.a = q @ torch.diag(torch.empty(dim).uniform_(0.5, 2.0, generator=gen)) @ q.T
        self.b = torch.randn(dim, generator=gen)
        self.dim = dim

    def init_params(self, seed):
        return [torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))]

    def sample_batch(self, generator):
        return None

    def loss(self, params, batch):
        theta = params[0]
        return 0.5 * theta @ self.a @ theta - self.b @ theta

    def evaluate(self, params, split="test"):
        return {"loss": float(self.loss(params, None))}


def _trajectory_loss(optimizer, task, steps=10, seed=12345):
    params = [p.requires_grad_(True) for p in task.init_params(seed)]
    state, total = optimizer.init_state(params), 0.0
    with torch.no_grad():
        for _ in range(steps):
            grad = task.a @ params[0] - task.b
            params, state = optimizer.step(params, [grad], state)
            total += float(task.loss(params, None))
    return total / steps


def test_meta_training_through_meta_trainer_lowers_the_meta_loss():
    torch.manual_seed(0)
    task = Quadratic()
    adapter = lstm_adapter()
    before = _trajectory_loss(adapter, task)
    trainer = MetaTrainer(adapter, lambda g: (task, int(torch.randint(1000, 10**6, (1,), generator=g))),
                          flat=FlatL2O(plugin_manager=isolated_plugin_manager()),
                          config=MetaTrainConfig(meta_steps=25, unroll=5, horizon=10, meta_lr=1e-2, val_every=0))
    result = trainer.train()
    assert result.skipped == 0
    after = _trajectory_loss(adapter, task)
    assert after < before - 0.1 * abs(before)
