"""Stacks of registered wrappers: built innermost first, transparent at weight 0, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flat_l2o_plugin import WrapperInfo, create_optimizer, hookimpl
from flat_l2o_plugin.errors import ConfigError, UnknownComponentError
from flat_l2o_plugin.testing import isolated_plugin_manager
from flat_l2o_plugin.wrappers import FlatnessAware, ForeignAdapter, LearnedOptimizerWrapper, unwrap, wrap


class Tagged(LearnedOptimizerWrapper):
    def __init__(self, optimizer, tag="?"):
        super().__init__(optimizer)
        self.tag = tag


class TagPlugin:
    name = "tag_plugin"

    @hookimpl
    def register_wrappers(self, register):
        register(WrapperInfo(name="tag_a", factory=Tagged, defaults={"tag": "a"}))
        register(WrapperInfo(name="tag_b", factory=Tagged, defaults={"tag": "b"}))


@pytest.fixture
def pm():
    return isolated_plugin_manager(TagPlugin())


def test_first_entry_is_innermost(pm):
    base = create_optimizer("rnnprop")
    stacked = wrap(base, [{"name": "tag_a"}, {"name": "tag_b"}, {"name": "tag_a", "tag": "c"}], plugin_manager=pm)
    chain = unwrap(stacked)
    assert [layer.tag for layer in chain[:-1]] == ["c", "b", "a"]
    assert chain[-1] is base
    assert list(stacked.state_dict()) == list(base.state_dict())
    assert wrap(base, [], plugin_manager=pm) is base


def test_the_stack_shares_its_plugin_manager(pm):
    stacked = wrap(create_optimizer("rnnprop"), [{"name": "flatness_aware"}], plugin_manager=pm)
    assert stacked.flat.pm is pm


def test_errors_name_the_entry(pm):
    base = create_optimizer("rnnprop")
    with pytest.raises(UnknownComponentError, match=r"wrappers\[1\]: unknown wrapper 'tag_c'.*did you mean"):
        wrap(base, [{"name": "tag_a"}, {"name": "tag_c"}], plugin_manager=pm)
    with pytest.raises(ConfigError, match=r"wrappers\[0\]: missing 'name'.*flatness_aware"):
        wrap(base, [{"regularizers": {}}], plugin_manager=pm)
    with pytest.raises(ConfigError, match=r"wrappers\[0\]: expected a table"):
        wrap(base, ["flatness_aware"], plugin_manager=pm)
    with pytest.raises(ConfigError, match=r"wrappers\[1\] \('flatness_aware'.*no option 'weight'; its options: "
                                          r"regularizers, plugin_manager, horizon"):
        wrap(base, [{"name": "tag_a"}, {"name": "flatness_aware", "weight": 1.0}], plugin_manager=pm)
    with pytest.raises(ConfigError, match=r"wrappers\[0\] \('foreign'.*foreign.inputs"):
        wrap(nn.Linear(1, 1), [{"name": "foreign", "inputs": ["nope"]}], plugin_manager=pm)
    with pytest.raises(UnknownComponentError, match=r"wrappers\[0\] \('flatness_aware'.*unknown regularizer"):
        wrap(base, [{"name": "flatness_aware", "regularizers": {"flatnes": {}}}], plugin_manager=pm)
    with pytest.raises(ConfigError, match="list of tables"):
        wrap(base, {"name": "flatness_aware"}, plugin_manager=pm)


class CellStackOptimizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(2, 10)
        self.out = nn.Linear(10, 1)

    def forward(self, x, hidden):
        h, c = self.cell(x, hidden)
        return self.out(h) * 0.1, (h, c)


FOREIGN = {"name": "foreign", "inputs": ["log_sign"], "hidden": (["zeros", 10], ["zeros", 10])}


def _unroll(optimizer, steps=3, explicit=False):
    """Iterates and meta-gradient; ``explicit``: hand the stack ``loss_fn`` and add its penalty."""
    gen = torch.Generator().manual_seed(0)
    a, target = torch.randn(8, 8, generator=gen), torch.randn(8, generator=gen)
    loss_fn = lambda ps: ((a @ ps[0] - target) ** 2).mean() + ps[0].pow(4).sum() * 1e-2  # noqa: E731
    params = [torch.randn(8, generator=gen).requires_grad_(True)]
    state, meta_loss, iterates = optimizer.init_state(params), torch.zeros(()), []
    for _ in range(steps):
        grads = [g.detach() for g in torch.autograd.grad(loss_fn(params), params)]
        params, state = optimizer.step(params, grads, state, **({"loss_fn": loss_fn} if explicit else {}))
        iterates.append(params[0].detach())
        meta_loss = meta_loss + loss_fn(params)
    if explicit:
        meta_loss = meta_loss + optimizer.pop_penalty()
    return iterates, torch.autograd.grad(meta_loss, list(optimizer.parameters()))


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_two_deep_stack_is_bit_identical_at_weight_zero(pm, weight):
    torch.manual_seed(0)
    module = CellStackOptimizer()
    bare = ForeignAdapter(module, **{k: v for k, v in FOREIGN.items() if k != "name"})
    bare_iterates, bare_grads = _unroll(bare)

    regularizers = {"sharpness": {"weight": weight}, "hessian_trace": {"weight": 0.0, "probes": 2}}
    stacked = wrap(module, [FOREIGN, {"name": "flatness_aware", "regularizers": regularizers}], plugin_manager=pm)
    assert isinstance(stacked, FlatnessAware) and isinstance(stacked.inner, ForeignAdapter)
    assert list(stacked.state_dict()) == list(module.state_dict())
    iterates, grads = _unroll(stacked, explicit=True)
    assert all(torch.equal(a, b) for a, b in zip(iterates, bare_iterates))
    same = [torch.equal(a, b) for a, b in zip(grads, bare_grads)]
    assert all(same) if weight == 0.0 else not all(same)


def test_two_flatness_wrappers_deep_at_weight_zero(pm):
    torch.manual_seed(0)
    bare = create_optimizer("l2o_dm")
    bare_iterates, bare_grads = _unroll(bare)
    stacked = wrap(bare, [{"name": "flatness_aware", "regularizers": {"sharpness": {"weight": 0.0}}},
                          {"name": "flatness_aware", "regularizers": {"sharpness": {"weight": 0.0,
                                                                                    "mode": "optimizee_loss"}}}],
                   plugin_manager=pm)
    iterates, grads = _unroll(stacked, explicit=True)
    assert all(torch.equal(a, b) for a, b in zip(iterates, bare_iterates))
    assert all(torch.equal(a, b) for a, b in zip(grads, bare_grads))


def test_wrapper_options_are_checked_with_a_suggestion_before_anything_is_built(pm):
    built = []

    class Recording(CellStackOptimizer):
        def forward(self, x, hidden):
            built.append(1)
            return super().forward(x, hidden)

    with pytest.raises(ConfigError, match=r"wrappers\[0\] \('foreign', from plugin 'builtin'\): wrapper 'foreign' has "
                                          r"no option 'output_scal' \(did you mean 'output_scale'\?\); its options: "
                                          r"inputs, hidden, hidden_as, input_layout, output_scale"):
        wrap(Recording(), [{**FOREIGN, "output_scal": 0.1}], plugin_manager=pm)
    assert not built
    with pytest.raises(ConfigError, match=r"no option 'options'.*written flat in its entry"):
        wrap(Recording(), [{"name": "foreign", "options": {"inputs": ["log_sign"]}}], plugin_manager=pm)
