"""The foreign adapter fits the conventions L2O code is written in, with no shim.

The modules below follow public PyTorch L2O code: a two-``LSTMCell`` L2O-DM port whose
state travels as two arguments and which preprocesses its own gradient, a module that
keeps its state in attributes, and modules whose weights ``parameters()`` misses.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from flat_l2o_plugin import FlatL2O, create_task
from flat_l2o_plugin.errors import ConfigError, UnregisteredParametersWarning
from flat_l2o_plugin.optimizers import log_sign_preprocess
from flat_l2o_plugin.testing import check_learned_optimizer, isolated_plugin_manager
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer
from flat_l2o_plugin.wrappers import ForeignAdapter

TWO_CELLS = [[["zeros", 20], ["zeros", 20]], [["zeros", 20], ["zeros", 20]]]


class TwoCellOptimizer(nn.Module):
    """``forward(inp, hidden, cell) -> (update, hidden, cell)``, its own log/sign preprocessing."""

    def __init__(self, preproc=True, hidden_sz=20, preproc_factor=10.0):
        super().__init__()
        self.recurs = nn.LSTMCell(2 if preproc else 1, hidden_sz)
        self.recurs2 = nn.LSTMCell(hidden_sz, hidden_sz)
        self.output = nn.Linear(hidden_sz, 1)
        self.preproc, self.preproc_factor = preproc, preproc_factor

    def forward(self, inp, hidden, cell):
        if self.preproc:
            g = inp.detach()
            keep = g.abs() >= math.exp(-self.preproc_factor)
            first = torch.where(keep, torch.log(g.abs() + 1e-8) / self.preproc_factor, torch.full_like(g, -1.0))
            second = torch.where(keep, torch.sign(g), math.exp(self.preproc_factor) * g)
            inp = torch.cat([first, second], dim=-1)
        h0, c0 = self.recurs(inp, (hidden[0], cell[0]))
        h1, c1 = self.recurs2(h0, (hidden[1], cell[1]))
        return self.output(h1), (h0, h1), (c0, c1)


class KeywordStateOptimizer(TwoCellOptimizer):
    def forward(self, inp, *, hidden, cell):
        return super().forward(inp, hidden, cell)


class StatefulOptimizer(nn.Module):
    """Keeps its LSTM state in ``self.hx`` / ``self.cx``; ``forward(x)``; resets with its own method."""

    def __init__(self, input_size=3, hidden_size=12):
        super().__init__()
        self.cell1 = nn.LSTMCell(input_size, hidden_size)
        self.cell2 = nn.LSTMCell(hidden_size, hidden_size)
        self.head = nn.Linear(hidden_size, 1)
        self.hidden_size = hidden_size
        self.hx = None
        self.cx = None

    def reset_state(self, n, training_script_helper):  # never called by the adapter
        raise AssertionError("the adapter must not need the module's reset")

    def forward(self, x):
        h0, c0 = self.cell1(x, (self.hx[0], self.cx[0]))
        h1, c1 = self.cell2(h0, (self.hx[1], self.cx[1]))
        self.hx, self.cx = [h0, h1], [c0, c1]
        return self.head(h1)


STATEFUL = {"hidden_as": "attributes", "inputs": ["log_sign", "param"],
            "hidden": {"hx": [["zeros", 12], ["zeros", 12]], "cx": [["zeros", 12], ["zeros", 12]]}}


def two_cell_adapter(module=None):
    return ForeignAdapter(module or TwoCellOptimizer(), inputs=["grad"], hidden_as="arguments", hidden=TWO_CELLS,
                          output_scale=0.1)


def stateful_adapter(module=None):
    return ForeignAdapter(module or StatefulOptimizer(), output_scale=0.1, **STATEFUL)


def stateful_without_param_input():
    # The θ feature is detached on purpose, a cut that the check's finite difference would see.
    return ForeignAdapter(StatefulOptimizer(input_size=2), output_scale=0.1,
                          **{**STATEFUL, "inputs": ["log_sign"]})


@pytest.mark.parametrize("make", [two_cell_adapter, stateful_without_param_input], ids=["arguments", "attributes"])
def test_both_conventions_pass_the_learned_optimizer_conformance_check(make):
    check_learned_optimizer(make, meta_training=False)


# ---------------------------------------------------------------------- state over several arguments


def test_state_over_several_arguments_matches_the_module_driven_by_hand():
    torch.manual_seed(0)
    module = TwoCellOptimizer()
    adapter = two_cell_adapter(module)
    assert list(adapter.state_dict()) == list(TwoCellOptimizer().state_dict())  # no shim, no prefix
    theta, target = torch.randn(7), torch.randn(7)
    state = adapter.init_state([theta])
    assert sorted(state) == ["hidden.0.0", "hidden.0.1", "hidden.1.0", "hidden.1.1", "step"]
    hidden, cell = [torch.zeros(7, 20)] * 2, [torch.zeros(7, 20)] * 2
    ours, by_hand = theta, theta
    for _ in range(3):
        (ours,), state = adapter.step([ours], [ours - target], state)
        update, hidden, cell = module((by_hand - target).unsqueeze(-1), hidden, cell)
        by_hand = by_hand + 0.1 * update.squeeze(-1)
        assert torch.equal(ours, by_hand)
    assert torch.equal(state["hidden.1.1"], cell[1])


def test_keyword_state_arguments_from_a_table():
    torch.manual_seed(0)
    positional = two_cell_adapter(TwoCellOptimizer())
    keywords = ForeignAdapter(KeywordStateOptimizer(), inputs=["grad"], hidden_as="arguments", output_scale=0.1,
                              hidden={"hidden": TWO_CELLS[0], "cell": TWO_CELLS[1]})
    keywords.load_state_dict(positional.state_dict())
    theta, grad = torch.randn(5), torch.randn(5)
    a, state_a = positional.step([theta], [grad], positional.init_state([theta]))
    b, state_b = keywords.step([theta], [grad], keywords.init_state([theta]))
    assert torch.equal(a[0], b[0])
    assert torch.equal(state_a["hidden.1.0"], state_b["hidden.cell.0"])


def test_log_sign_p_and_epsilon_reproduce_a_ports_own_preprocessing():
    torch.manual_seed(0)
    own = TwoCellOptimizer(preproc=True)
    ours = TwoCellOptimizer(preproc=False)
    ours.recurs = nn.LSTMCell(2, 20)
    ours.load_state_dict(own.state_dict())
    theta = torch.zeros(6)  # the new iterate is the scaled update itself, to the last bit
    grad = torch.tensor([3e-5, -5e-5, 0.3, -1e-6, 0.0, 2e-4])  # around the threshold e^-10 ≈ 4.5e-5
    reference = two_cell_adapter(own)

    def adapter(**preprocessing):
        return ForeignAdapter(ours, inputs=["log_sign"], hidden_as="arguments", hidden=TWO_CELLS,
                              output_scale=0.1, **preprocessing)

    expected, _ = reference.step([theta], [grad], reference.init_state([theta]))
    matched = adapter(p=10.0, log_eps=1e-8)
    got, _ = matched.step([theta], [grad], matched.init_state([theta]))
    assert torch.equal(got[0], expected[0])
    plain = adapter(p=10.0)
    differs, _ = plain.step([theta], [grad], plain.init_state([theta]))
    assert not torch.equal(differs[0], expected[0])


def test_the_parameter_value_is_an_input_detached():
    torch.manual_seed(0)
    module = StatefulOptimizer()
    adapter = stateful_adapter(module)
    theta = torch.randn(4, requires_grad=True)
    grad = torch.randn(4)
    (new,), _ = adapter.step([theta], [grad], adapter.init_state([theta]))
    # θ enters the update only additively: its feature is detached.
    (dtheta,) = torch.autograd.grad(new.sum(), theta)
    assert torch.equal(dtheta, torch.ones(4))
    module.hx = [torch.zeros(4, 12)] * 2
    module.cx = [torch.zeros(4, 12)] * 2
    features = torch.cat([log_sign_preprocess(grad, 10.0), theta.detach().unsqueeze(-1)], dim=-1)
    assert torch.equal(new.detach(), theta.detach() + 0.1 * module(features).squeeze(-1).detach())


# ---------------------------------------------------------------------- state kept in the module


def test_state_in_attributes_is_owned_per_trajectory_by_the_adapter():
    torch.manual_seed(0)
    module = StatefulOptimizer()
    adapter = stateful_adapter(module)
    gen = torch.Generator().manual_seed(1)
    starts = [torch.randn(5, generator=gen), torch.randn(9, generator=gen)]

    def alone(theta, steps=3):
        state = adapter.init_state([theta])
        for _ in range(steps):
            (theta,), state = adapter.step([theta], [theta * 0.5], state)
        return theta

    expected = [alone(s) for s in starts]
    # Two trajectories interleaved, as the slots of a meta-batch: neither sees the other's state.
    thetas, states = list(starts), [adapter.init_state([s]) for s in starts]
    for _ in range(3):
        for i in range(2):
            (thetas[i],), states[i] = adapter.step([thetas[i]], [thetas[i] * 0.5], states[i])
    assert all(torch.equal(a, b) for a, b in zip(thetas, expected))
    # The module holds no trajectory's state (nor its graph) between calls.
    assert module.hx is None and module.cx is None
    copy.deepcopy(adapter)


def test_state_in_attributes_resumes_mid_trajectory_from_a_saved_state():
    torch.manual_seed(0)
    adapter = stateful_adapter()
    theta = torch.randn(6)
    state = adapter.init_state([theta])
    for _ in range(2):
        (theta,), state = adapter.step([theta], [theta], state)
    saved = load_safetensors(save_safetensors({k: v.detach().contiguous() for k, v in state.items()}))
    expected, _ = adapter.step([theta], [theta], state)
    # A fresh process: a new module that never ran, the weights and the state from disk.
    fresh = stateful_adapter(StatefulOptimizer())
    fresh.load_state_dict(adapter.state_dict())
    got, _ = fresh.step([theta], [theta], saved)
    assert torch.equal(got[0], expected[0])


def _trainer(run_dir, meta_steps):
    torch.manual_seed(0)
    task = create_task("quadratic", dim=6, condition_number=4.0)
    adapter = stateful_adapter()
    config = MetaTrainConfig(meta_steps=meta_steps, unroll=2, horizon=6, meta_batch=2, val_every=0,
                             checkpoint_every=100, meta_lr=1e-2)
    return MetaTrainer(adapter, lambda g: (task, int(torch.randint(1000, 10**6, (1,), generator=g))),
                       flat=FlatL2O(plugin_manager=isolated_plugin_manager()), config=config, run_dir=run_dir)


def _interrupt_after(steps):
    def progress(step):
        # Raised as meta-step `steps` reports, before it is checkpointed: `steps` whole steps are saved.
        if step == steps:
            raise KeyboardInterrupt

    return progress


def test_state_in_attributes_meta_trains_at_meta_batch_two_and_resumes_mid_trajectory_exactly(tmp_path):
    reference = _trainer(tmp_path / "reference", 5)
    expected = reference.train()
    assert expected.skipped == 0 and all(math.isfinite(h["meta_loss"]) for h in expected.history)

    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "run", 5).train(progress=_interrupt_after(2))  # mid-trajectory: at step 4 of 6
    resumed = _trainer(tmp_path / "run", 5)
    result = resumed.train(resume=True)
    assert result.resumed_from == 2
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in result.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in expected.history]
    for key, value in reference.optimizer.state_dict().items():
        assert torch.equal(resumed.optimizer.state_dict()[key], value)


# ---------------------------------------------------------------------- weights parameters() misses


class ListOfCells(nn.Module):
    def __init__(self):
        super().__init__()
        self.cells = [nn.LSTMCell(1, 8), nn.LSTMCell(8, 8)]  # a plain list: not registered
        self.scale = torch.ones(1, requires_grad=True)       # a plain tensor: not registered
        self.out = nn.Linear(8, 1)

    def forward(self, x, hidden):
        new = []
        for cell, state in zip(self.cells, hidden):
            x, c = cell(x, state)
            new.append((x, c))
        return self.out(x) * self.scale, new


class RegisteredCells(ListOfCells):
    def __init__(self):
        super().__init__()
        self.cells = nn.ModuleList(self.cells)
        self.scale = nn.Parameter(self.scale.detach())


def _cells_adapter(module):
    return ForeignAdapter(module, hidden=[[["zeros", 8], ["zeros", 8]]] * 2)


def test_weights_that_parameters_does_not_list_are_reported():
    with pytest.warns(UnregisteredParametersWarning, match=r"uses 9 weight tensor.*\(cells\[0\]\.bias_hh, "
                                                           r"cells\[0\]\.bias_ih.* and 3 more\)"):
        _cells_adapter(ListOfCells())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cells_adapter(RegisteredCells())


# ---------------------------------------------------------------------- the signature, checked when built


def test_a_signature_that_does_not_fit_names_the_setting_that_does():
    with pytest.raises(ConfigError, match=r"foreign.hidden_as: TwoCellOptimizer.forward\(inp, hidden, cell\) takes "
                                          r"its state as 2 arguments \(hidden, cell\).*hidden_as = 'arguments'"):
        ForeignAdapter(TwoCellOptimizer(), inputs=["grad"], hidden=TWO_CELLS)
    with pytest.raises(ConfigError, match=r"foreign.hidden_as: StatefulOptimizer.forward\(x\) takes no state argument"
                                          r".*\(it has hx, cx\).*hidden_as = 'attributes'"):
        ForeignAdapter(StatefulOptimizer(), inputs=["log_sign", "param"], hidden=[["zeros", 12], ["zeros", 12]])
    with pytest.raises(ConfigError, match=r"foreign.hidden: TwoCellOptimizer.forward.*takes 2 state argument\(s\) "
                                          r"\(hidden, cell\) but foreign.hidden lists 3"):
        ForeignAdapter(TwoCellOptimizer(), inputs=["grad"], hidden_as="arguments", hidden=[*TWO_CELLS, ["zeros", 1]])
    with pytest.raises(ConfigError, match=r"no argument 'cel' \(did you mean 'cell'\?\)"):
        ForeignAdapter(KeywordStateOptimizer(), inputs=["grad"], hidden_as="arguments",
                       hidden={"hidden": TWO_CELLS[0], "cel": TWO_CELLS[1]})
    with pytest.raises(ConfigError, match=r"foreign.hidden: hidden_as='attributes' needs a table"):
        ForeignAdapter(StatefulOptimizer(), hidden_as="attributes", hidden=[["zeros", 12]])
    with pytest.raises(ConfigError, match=r"foreign.hidden_as must be one of"):
        ForeignAdapter(StatefulOptimizer(), hidden_as="attribute", hidden={"hx": ["zeros", 12]})


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(1)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(1, 1)

    def forward(self, x):
        return self.out(self.drop(self.norm(x)))


def test_the_build_time_probe_leaves_the_module_and_the_random_state_as_they_were():
    module = WithBatchNorm()
    stateful = StatefulOptimizer()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    ForeignAdapter(module)
    stateful_adapter(stateful)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
    assert stateful.hx is None and stateful.cx is None
