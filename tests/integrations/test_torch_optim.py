"""The ``torch.optim.Optimizer`` face: ordinary training loops with a meta-trained optimizer."""

from __future__ import annotations

import copy
import gc
import io
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flat_l2o_plugin import OptimizerInfo, create_optimizer, create_task, get_plugin_manager, hookimpl
from flat_l2o_plugin.errors import ConfigError, FlatL2OError, UnknownComponentError
from flat_l2o_plugin.integrations.torch_optim import (
    IDENTITY_KEY,
    LR_RULE,
    LearnedOptimizerTorch,
    OptimizerStateError,
    StepMultiplierWarning,
    UntrainedOptimizerWarning,
)
from flat_l2o_plugin.optimizers.weights import save_learned_optimizer
from flat_l2o_plugin.tasks import load_dataset
from flat_l2o_plugin.training import train_with_learned_optimizer
from flat_l2o_plugin.training.evaluate import batch_generator


def _mlp(seed: int = 0, hidden: int = 32, activation: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), activation or nn.ReLU(), nn.Linear(hidden, 10))


def _digits_batches(count: int, seed: int = 0, size: int = 128) -> list[tuple[Tensor, Tensor]]:
    x, y = load_dataset("digits").split("train")
    gen = torch.Generator().manual_seed(seed)
    return [(x[idx], y[idx]) for idx in (torch.randperm(x.shape[0], generator=gen)[:size] for _ in range(count))]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> list[float]:
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def _assert_same_state(a: LearnedOptimizerTorch, b: LearnedOptimizerTorch) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        assert sa[index].keys() == sb[index].keys()
        for key in sa[index]:
            assert sa[index][key].dtype == sb[index][key].dtype, (index, key)
            assert torch.equal(sa[index][key], sb[index][key]), (index, key)


# ---------------------------------------------------------------------- behaviour


def test_loss_goes_down_on_an_ordinary_module(meta_trained: nn.Module) -> None:
    model = _mlp()
    losses = _train(model, LearnedOptimizerTorch(model.parameters(), meta_trained), _digits_batches(60))
    assert losses[0] > 2.0
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]


def test_trajectory_equals_calling_the_protocol_directly(meta_trained: nn.Module) -> None:
    """Bit for bit what the meta-trainer's own validation loop computes."""
    task, seed, steps = create_task("mlp_digits"), 7, 12
    reference = train_with_learned_optimizer(meta_trained, task, seed, steps, eval_every=steps)

    model = nn.Sequential(nn.Linear(64, 20), nn.Sigmoid(), nn.Linear(20, 10))
    with torch.no_grad():
        for p, init in zip(model.parameters(), task.init_params(seed)):
            p.copy_(init)
    opt = LearnedOptimizerTorch(model.parameters(), meta_trained)
    gen = batch_generator(seed)
    for _ in range(steps):
        x, y = task.sample_batch(gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for p, q in zip(model.parameters(), reference.params):
        assert torch.equal(p, q)


def test_learned_optimizer_is_a_frozen_copy_in_eval_mode(meta_trained: nn.Module) -> None:
    meta_trained.train()
    opt = LearnedOptimizerTorch(_mlp().parameters(), meta_trained)
    meta_trained.eval()
    assert opt.learned_optimizer is not meta_trained
    assert not opt.learned_optimizer.training
    assert all(not w.requires_grad for w in opt.learned_optimizer.parameters())
    assert all(w.requires_grad for w in meta_trained.parameters())  # the caller's module is untouched


def test_no_graph_and_constant_memory_over_many_steps(meta_trained: nn.Module) -> None:
    model = _mlp(hidden=16)
    opt = LearnedOptimizerTorch(model.parameters(), meta_trained)
    batches = _digits_batches(40, size=32)

    def census() -> tuple[int, list[tuple[int, tuple[int, ...], torch.dtype]]]:
        gc.collect()
        # type() rather than isinstance(): the latter trips deprecated lazy module attributes.
        live = sum(1 for obj in gc.get_objects() if issubclass(type(obj), Tensor))
        layout = [(i, tuple(v.shape), v.dtype) for i, s in opt.state_dict()["state"].items() for v in s.values()]
        return live, layout

    _train(model, opt, batches[:10])
    live_before, layout_before = census()
    with torch.enable_grad():  # stepping where autograd is on must still record nothing
        _train(model, opt, batches[10:])
    live_after, layout_after = census()

    assert layout_after == layout_before
    assert live_after == live_before
    for p in model.parameters():
        assert p.is_leaf and p.grad_fn is None
    for state in opt.state.values():
        for value in state.values():
            assert not value.requires_grad and value.grad_fn is None
            assert value._base is None  # its own storage, not a view of a batch tensor


def test_closure_is_evaluated_with_gradients(meta_trained: nn.Module) -> None:
    model = _mlp()
    opt = LearnedOptimizerTorch(model.parameters(), meta_trained)
    (x, y), = _digits_batches(1)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():  # e.g. inside a host's evaluation context
        first = opt.step(closure)
    second = opt.step(closure)
    assert isinstance(first, Tensor) and second.item() < first.item()


# ---------------------------------------------------------------------- state_dict


def test_state_dict_round_trip_continues_identically(meta_trained: nn.Module) -> None:
    batches = _digits_batches(8)
    model = _mlp()
    opt = LearnedOptimizerTorch(model.parameters(), meta_trained)
    _train(model, opt, batches[:4])

    # Through torch.save / torch.load(weights_only=True): only plain tensors and numbers.
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert set(saved["state"][0]) == set(meta_trained.init_state([torch.zeros(1)]))

    resumed_model = copy.deepcopy(model)
    resumed = LearnedOptimizerTorch(resumed_model.parameters(), meta_trained)
    resumed.load_state_dict(saved)

    _train(model, opt, batches[4:])
    _train(resumed_model, resumed, batches[4:])
    _assert_same_params(model, resumed_model)
    _assert_same_state(opt, resumed)


def test_load_keeps_the_recurrent_state_dtype(meta_trained: nn.Module) -> None:
    # torch.optim casts floating state to the parameter's dtype on load; the LSTM state
    # lives in the learned optimizer's dtype and must come back as it was.
    batches = [(x.double(), y) for x, y in _digits_batches(4)]
    model = _mlp().double()
    opt = LearnedOptimizerTorch(model.parameters(), meta_trained)
    _train(model, opt, batches[:2])
    resumed_model = copy.deepcopy(model)
    resumed = LearnedOptimizerTorch(resumed_model.parameters(), meta_trained)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    state = resumed.state[next(resumed_model.parameters())]
    assert state["lstm_h_0"].dtype == torch.float32 and state["exp_avg"].dtype == torch.float64

    _train(model, opt, batches[2:])
    _train(resumed_model, resumed, batches[2:])
    _assert_same_params(model, resumed_model)


def test_state_of_another_learned_optimizer_is_refused(meta_trained: nn.Module) -> None:
    model = _mlp()
    opt = LearnedOptimizerTorch(model.parameters(), meta_trained)
    _train(model, opt, _digits_batches(1))
    other = LearnedOptimizerTorch(model.parameters(), create_optimizer("l2o_dm"))
    with pytest.raises(OptimizerStateError, match="saved with another learned optimizer"):
        other.load_state_dict(opt.state_dict())


# ---------------------------------------------------------------------- param groups


def test_group_options_scale_the_update_and_decay_the_gradient(meta_trained: nn.Module) -> None:
    model = _mlp()
    first, second = model[0], model[2]
    opt = LearnedOptimizerTorch(
        [
            {"params": [first.weight, first.bias], "weight_decay": 0.1},
            {"params": [second.weight, second.bias], "lr": 0.5, "lr_scale": 0.3},  # timm's extra keys pass
        ],
        meta_trained,
    )
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, _digits_batches(1))
    grads = [p.grad for p in model.parameters()]

    # Each group is its own call of the learned optimizer, on that group's coordinates.
    with torch.no_grad():
        decayed = [torch.add(g, p, alpha=0.1) for g, p in zip(grads[:2], before[:2])]
        expected_first, _ = meta_trained.step(before[:2], decayed, meta_trained.init_state(before[:2]))
        proposed, _ = meta_trained.step(before[2:], grads[2:], meta_trained.init_state(before[2:]))
        expected_second = [torch.add(p, new - p, alpha=0.5) for p, new in zip(before[2:], proposed)]
    for p, expected in zip(model.parameters(), [*expected_first, *expected_second]):
        assert torch.equal(p, expected)


def test_lr_zero_freezes_a_group_and_a_scheduler_drives_lr(meta_trained: nn.Module) -> None:
    model = _mlp()
    opt = LearnedOptimizerTorch([{"params": model[0].parameters(), "lr": 0.0},
                                 {"params": model[2].parameters()}], meta_trained)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for batch in _digits_batches(3):
        _train(model, opt, [batch])
        scheduler.step()
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))
    assert opt.param_groups[1]["lr"] == 0.125
    assert int(opt.state[model[0].weight]["step"]) == 3  # the frozen group's state still advances


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1.0", True])
def test_bad_group_options_are_named(meta_trained: nn.Module, bad) -> None:
    model = _mlp()
    with pytest.raises(ConfigError, match=r"param_groups\[1\]: lr must be a finite number >= 0"):
        LearnedOptimizerTorch([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": bad}],
                              meta_trained)
    with pytest.raises(ConfigError, match="the constructor: weight_decay must be a finite number >= 0"):
        LearnedOptimizerTorch(model.parameters(), meta_trained, weight_decay=bad)


# ---------------------------------------------------------------------- skipped params


def test_params_without_grad_keep_their_state(meta_trained: nn.Module) -> None:
    """A skipped parameter's coordinates stay put and its step count does not advance."""
    torch.manual_seed(0)
    model = _mlp(hidden=8)
    head, extra = model[2], nn.Linear(64, 10)  # `extra` is used on some steps only
    params = [*model.parameters(), *extra.parameters()]
    opt = LearnedOptimizerTorch(params, meta_trained)
    batches = _digits_batches(5, size=32)
    uses_extra = [True, False, False, True, True]

    # Reference: each parameter on its own, with its own state, stepped only when it has a gradient.
    reference = [p.detach().clone() for p in params]
    ref_state = [meta_trained.init_state([p]) for p in reference]

    for (x, y), use in zip(batches, uses_extra):
        opt.zero_grad(set_to_none=True)
        logits = model(x) + (extra(x) if use else 0)
        F.cross_entropy(logits, y).backward()
        if not use:
            snapshot = {k: v.clone() for k, v in opt.state[extra.weight].items()}
            weight_before = extra.weight.detach().clone()
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        opt.step()
        if not use:
            assert torch.equal(extra.weight, weight_before)
            for key, value in opt.state[extra.weight].items():
                assert torch.equal(value, snapshot[key]), key
        with torch.no_grad():
            for i, grad in enumerate(grads):
                if grad is not None:
                    (reference[i],), ref_state[i] = meta_trained.step([reference[i]], [grad], ref_state[i])

    assert int(opt.state[head.weight]["step"]) == 5
    assert int(opt.state[extra.weight]["step"]) == 3
    for p, expected in zip(params, reference):
        # Batch shape may change the blocking of the LSTM's matmuls: allow rounding.
        torch.testing.assert_close(p.detach(), expected)


def test_params_with_different_step_counts_run_as_separate_batches(
    meta_trained: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _mlp(hidden=8)
    opt = LearnedOptimizerTorch(model.parameters(), meta_trained)
    calls: list[int] = []
    real_step = opt.learned_optimizer.step
    monkeypatch.setattr(opt.learned_optimizer, "step",
                        lambda params, grads, state: calls.append(len(params)) or real_step(params, grads, state))
    (x, y), = _digits_batches(1, size=16)
    _train(model, opt, [(x, y)])
    assert calls == [4]  # one call for the whole group
    model[0].weight.grad = None
    model[0].bias.grad = None
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert calls == [4, 2, 2, 2]  # steps 1 and 2 no longer share a call


def test_sparse_gradients_are_refused(meta_trained: nn.Module) -> None:
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = LearnedOptimizerTorch(embedding.parameters(), meta_trained)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(FlatL2OError, match="sparse gradient.*sparse=False"):
        opt.step()


# ---------------------------------------------------------------------- construction


def test_built_from_a_weights_file(tmp_path: Path, meta_trained: nn.Module) -> None:
    path = save_learned_optimizer(tmp_path / "rnnprop.safetensors", meta_trained, name="rnnprop")
    batches = _digits_batches(3)
    a, b = _mlp(), _mlp()
    _train(a, LearnedOptimizerTorch(a.parameters(), weights=path), batches)
    _train(b, LearnedOptimizerTorch(b.parameters(), "rnnprop", weights=str(path)), batches)
    reference = _mlp()
    _train(reference, LearnedOptimizerTorch(reference.parameters(), meta_trained), batches)
    _assert_same_params(a, reference)
    _assert_same_params(b, reference)

    with pytest.raises(ConfigError, match=r"optimizer='l2o_dm' but the weights file .* holds a 'rnnprop'"):
        LearnedOptimizerTorch(a.parameters(), "l2o_dm", weights=path)
    with pytest.raises(ConfigError, match="not both"):
        LearnedOptimizerTorch(a.parameters(), meta_trained, weights=path)
    with pytest.raises(ConfigError, match="records the options"):
        LearnedOptimizerTorch(a.parameters(), weights=path, options={"hidden_size": 8})


def test_construction_errors_say_what_to_pass() -> None:
    params = _mlp().parameters()
    with pytest.raises(ConfigError, match="needs a learned optimizer: weights="):
        LearnedOptimizerTorch(params)
    with pytest.raises(ConfigError, match="must be an nn.Module, a registered name or None"):
        LearnedOptimizerTorch(params, 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="has no init_state"):
        LearnedOptimizerTorch(params, nn.Linear(2, 2))
    with pytest.raises(UnknownComponentError, match="did you mean 'rnnprop'"):
        LearnedOptimizerTorch(params, "rnnpop", plugin_manager=get_plugin_manager(entry_points=False))


def test_a_name_without_weights_warns_that_it_is_untrained() -> None:
    with pytest.warns(UntrainedOptimizerWarning, match="initial random weights"):
        opt = LearnedOptimizerTorch(_mlp().parameters(), "l2o_dm", options={"hidden_size": 4},
                                    plugin_manager=get_plugin_manager(entry_points=False))
    assert opt.learned_optimizer.hidden_size == 4


# ---------------------------------------------------------------------- not coordinatewise


class _GlobalRMS(nn.Module):
    """Pools over all coordinates: θ ← θ - η g / √(EMA of the mean g²), one EMA per call."""

    def __init__(self) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(0.01).log())

    def init_state(self, params):
        return {"step": torch.zeros((), dtype=torch.int64), "mean_sq": torch.zeros(1)}

    def step(self, params, grads, state):
        flat = torch.cat([g.reshape(-1) for g in grads])
        mean_sq = 0.9 * state["mean_sq"] + 0.1 * flat.pow(2).mean()
        scale = self.log_lr.exp() / (mean_sq.sqrt() + 1e-8)
        return [p - scale * g for p, g in zip(params, grads)], {"step": state["step"] + 1, "mean_sq": mean_sq}


class _GlobalRMSPlugin:
    @hookimpl
    def register_optimizers(self, register) -> None:
        register(OptimizerInfo(name="global_rms", factory=_GlobalRMS, coordinatewise=False))


def test_a_pooling_optimizer_steps_each_group_as_one_unit() -> None:
    pm = get_plugin_manager(entry_points=False, plugins=[("global", _GlobalRMSPlugin())])
    learned = _GlobalRMS()
    model = _mlp(hidden=8)
    opt = LearnedOptimizerTorch(model.parameters(), learned, plugin_manager=pm)
    assert opt.coordinatewise is False  # from the registration of the module's class

    params = [p.detach().clone() for p in model.parameters()]
    state = learned.init_state(params)
    batches = _digits_batches(4, size=16)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if step == 2:
            model[0].bias.grad = None  # skipped: fed zeros, values kept
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
        opt.step()
        with torch.no_grad():
            new, state = learned.step(params, grads, state)
        params = [old if step == 2 and i == 1 else n for i, (old, n) in enumerate(zip(params, new))]

    for p, expected in zip(model.parameters(), params):
        assert torch.equal(p, expected)
    first, *rest = model.parameters()
    assert set(opt.state[first]) == {"step", "mean_sq"} and int(opt.state[first]["step"]) == 4
    assert all(not opt.state.get(p) for p in rest)

    resumed_model = copy.deepcopy(model)
    resumed = LearnedOptimizerTorch(resumed_model.parameters(), learned, plugin_manager=pm)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, batches[:2])
    _train(resumed_model, resumed, batches[:2])
    _assert_same_params(model, resumed_model)


def test_an_unregistered_pooling_optimizer_needs_coordinatewise_false() -> None:
    pm = get_plugin_manager(entry_points=False)
    model = _mlp(hidden=8)
    opt = LearnedOptimizerTorch(model.parameters(), _GlobalRMS(), plugin_manager=pm)
    with pytest.raises(OptimizerStateError, match=r"state\['mean_sq'\] of _GlobalRMS is \(1,\).*coordinatewise=False"):
        _train(model, opt, _digits_batches(1))
    opt = LearnedOptimizerTorch(model.parameters(), _GlobalRMS(), coordinatewise=False, plugin_manager=pm)
    _train(model, opt, _digits_batches(1))

    rnnprop = create_optimizer("rnnprop")
    coordinatewise_state = LearnedOptimizerTorch(model.parameters(), rnnprop)
    _train(model, coordinatewise_state, _digits_batches(1))
    with pytest.raises(OptimizerStateError, match="saved with another learned optimizer"):
        opt.load_state_dict(coordinatewise_state.state_dict())
    whole_groups = LearnedOptimizerTorch(model.parameters(), rnnprop, coordinatewise=False)
    with pytest.raises(OptimizerStateError, match="keeps a group's state on its first parameter"):
        whole_groups.load_state_dict(coordinatewise_state.state_dict())


def test_registered_l2o_scale_matches_direct_calls() -> None:
    pm = get_plugin_manager(entry_points=False)
    if "l2o_scale" not in pm.components.optimizers:
        pytest.skip("l2o_scale is not registered in this build")
    torch.manual_seed(0)
    learned = pm.components.optimizers.get("l2o_scale").create().eval()
    model = _mlp(hidden=8)
    opt = LearnedOptimizerTorch(model.parameters(), learned, plugin_manager=pm)
    assert opt.coordinatewise is False
    params = [p.detach().clone() for p in model.parameters()]
    state = learned.init_state(params)
    for x, y in _digits_batches(3, size=16):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        with torch.no_grad():
            params, state = learned.step(params, grads, state)
    for p, expected in zip(model.parameters(), params):
        assert torch.equal(p, expected)


# ---------------------------------------------------------------------- identity of the state


def test_state_dict_records_the_learned_optimizer_and_refuses_other_weights(
        tmp_path: Path, meta_trained: nn.Module) -> None:
    path = save_learned_optimizer(tmp_path / "rnnprop.safetensors", meta_trained, name="rnnprop")
    model = _mlp()
    opt = LearnedOptimizerTorch(model.parameters(), weights=path)
    _train(model, opt, _digits_batches(2))
    saved = copy.deepcopy(opt.state_dict())
    identity = saved[IDENTITY_KEY]
    assert identity["optimizer"] == "rnnprop" and identity["weights_file"] == str(path)
    assert identity["class"] == "flat_l2o_plugin.optimizers.rnnprop.RNNProp"
    assert identity["options"]["hidden_size"] == meta_trained.hidden_size
    assert len(identity["weights_sha256"]) == 64

    # The same weights, as a module (name and options unknown): accepted.
    same = LearnedOptimizerTorch(_mlp().parameters(), meta_trained)
    assert same.learned_identity["optimizer"] is None
    assert same.learned_identity["weights_sha256"] == identity["weights_sha256"]
    same.load_state_dict(copy.deepcopy(saved))

    # One weight nudged: refused, naming both, and nothing changes.
    nudged = copy.deepcopy(meta_trained)
    with torch.no_grad():
        next(nudged.parameters()).view(-1)[0] += 1e-6
    other_model = _mlp()
    other = LearnedOptimizerTorch(other_model.parameters(), nudged)
    _train(other_model, other, _digits_batches(1))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(OptimizerStateError, match=r"saved with another learned optimizer \('rnnprop', weights "
                                                  r"sha256 \w{12} from .*rnnprop.safetensors\).*weights_sha256"):
        other.load_state_dict(copy.deepcopy(saved))
    _assert_same_state_dict(other.state_dict(), before)

    # Deleting the identity loads the state anyway (checked by keys and sizes only).
    del saved[IDENTITY_KEY]
    other.load_state_dict(saved)
    with pytest.raises(OptimizerStateError, match="not the identity"):
        other.load_state_dict({**opt.state_dict(), IDENTITY_KEY: "rnnprop"})


def _assert_same_state_dict(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"] and a[IDENTITY_KEY] == b[IDENTITY_KEY]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        assert a["state"][index].keys() == b["state"][index].keys()
        assert all(torch.equal(a["state"][index][k], b["state"][index][k]) for k in a["state"][index])


def test_state_without_identity_from_another_optimizer_is_refused_before_anything_changes(
        meta_trained: nn.Module) -> None:
    model = _mlp()
    adam = torch.optim.Adam(model.parameters())
    _train(model, adam, _digits_batches(1))
    opt = LearnedOptimizerTorch(model.parameters(), meta_trained)
    _train(model, opt, _digits_batches(1))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(OptimizerStateError, match="has keys \\['exp_avg', 'exp_avg_sq', 'step'\\].*saved with "
                                                  "another learned optimizer"):
        opt.load_state_dict(adam.state_dict())
    _assert_same_state_dict(opt.state_dict(), before)


# ---------------------------------------------------------------------- other optimizers' keys


def test_other_optimizers_keys_in_the_state_are_kept_apart(meta_trained: nn.Module) -> None:
    batches = _digits_batches(6)
    model, plain_model = _mlp(), _mlp()
    opt = LearnedOptimizerTorch(model.parameters(), meta_trained)
    plain = LearnedOptimizerTorch(plain_model.parameters(), meta_trained)
    _train(model, opt, batches[:2])
    _train(plain_model, plain, batches[:2])
    # As timm's Lookahead does: a tensor of another optimizer in each parameter's state.
    for p in model.parameters():
        opt.state[p]["slow_weights"] = p.detach().clone()
    marks = [opt.state[p]["slow_weights"] for p in model.parameters()]
    _train(model, opt, batches[2:4])
    _train(plain_model, plain, batches[2:4])
    _assert_same_params(model, plain_model)
    assert all(opt.state[p]["slow_weights"] is mark for p, mark in zip(model.parameters(), marks))

    resumed_model = copy.deepcopy(model)
    resumed = LearnedOptimizerTorch(resumed_model.parameters(), meta_trained)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(torch.equal(resumed.state[q]["slow_weights"], opt.state[p]["slow_weights"])
               for p, q in zip(model.parameters(), resumed_model.parameters()))
    _train(resumed_model, resumed, batches[4:])
    _train(plain_model, plain, batches[4:])
    _assert_same_params(resumed_model, plain_model)


def test_a_parameter_with_only_other_keys_gets_fresh_learned_state(meta_trained: nn.Module) -> None:
    model = _mlp()
    opt = LearnedOptimizerTorch(model.parameters(), meta_trained)
    first = next(model.parameters())
    opt.state[first]["slow_weights"] = first.detach().clone()  # before the learned optimizer's first step
    _train(model, opt, _digits_batches(1))
    assert set(opt.state[first]) == set(meta_trained.init_state([torch.zeros(1)])) | {"slow_weights"}
    assert int(opt.state[first]["step"]) == 1


# ---------------------------------------------------------------------- refused and warned


def test_complex_parameters_are_refused(meta_trained: nn.Module) -> None:
    z = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ConfigError, match=r"param_groups\[0\] parameter 1 is complex \(torch.complex64, "
                                          r"shape \(3,\)\).*view_as_complex"):
        LearnedOptimizerTorch([nn.Parameter(torch.zeros(2)), z], meta_trained)
    opt = LearnedOptimizerTorch([nn.Parameter(torch.zeros(2))], meta_trained)
    with pytest.raises(ConfigError, match=r"param_groups\[1\] parameter 0 is complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1  # the refused group is not left behind
    with pytest.raises(ConfigError, match=r"param_groups\[1\]: lr must be a finite number"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_an_lr_that_is_a_learning_rate_warns_with_the_rule(meta_trained: nn.Module) -> None:
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    with pytest.warns(StepMultiplierWarning) as caught:
        opt = LearnedOptimizerTorch([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], meta_trained,
                                    lr=0.003125)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "param_groups[0] lr=0.003125" in message and "param_groups[1]" not in message and LR_RULE in message
    with pytest.warns(StepMultiplierWarning, match=r"param_groups\[2\] lr=0.001"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 1e-3})

    with warnings.catch_warnings():
        warnings.simplefilter("error", StepMultiplierWarning)
        for lr in (0.0, 0.01, 0.1, 1.0, 3.0):  # 0 freezes a group on purpose
            opt = LearnedOptimizerTorch([nn.Parameter(torch.zeros(2))], meta_trained, lr=lr)
        # A schedule that anneals lr towards 0 is not a mistake: steps never warn.
        opt.param_groups[0]["lr"] = 1e-4
        opt.param_groups[0]["params"][0].grad = torch.ones(2)
        opt.step()
