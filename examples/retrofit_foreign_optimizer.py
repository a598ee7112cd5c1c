"""Retrofit your own learned optimizer: flatness-aware meta-training without editing it.

``MyLSTMOptimizer`` below is written the way people write an L2O-DM-style optimizer in
PyTorch: an ``nn.LSTM`` over per-coordinate gradient features and a linear head. Its
code stays as it is. Two registered wrappers, listed innermost first, make it a learned
optimizer whose meta-training includes a flatness term:

* ``foreign`` says how to feed the module (log/sign gradient features as a length-1
  sequence) and what its hidden state looks like;
* ``flatness_aware`` activates the Hessian-trace regularizer, late in each trajectory.

The reference meta-trainer reaches the wrapper through its facade (``attach``), and the
trained weights are the user's module's own: they load into a bare ``MyLSTMOptimizer``.
Run: ``python examples/retrofit_foreign_optimizer.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from flat_l2o_plugin import FlatL2O, create_task
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer
from flat_l2o_plugin.wrappers import wrap


class MyLSTMOptimizer(nn.Module):
    """The user's optimizer, unchanged: features (1, N, 2) and (h, c) in, update and (h, c) out."""

    def __init__(self, hidden_size: int = 20, num_layers: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, hidden_size, num_layers)
        self.output = nn.Linear(hidden_size, 1)

    def forward(self, grad_features, hidden):
        out, hidden = self.lstm(grad_features, hidden)
        return self.output(out) * 0.1, hidden


def main(meta_steps: int = 40, unroll: int = 5, horizon: int = 20, weight: float = 0.05,
         probes: int = 4, seed: int = 0) -> dict[str, list[float]]:
    """Meta-train ``MyLSTMOptimizer`` on the digits MLP with a Hessian-trace term.

    Returns:
        Per meta-step ``meta_loss`` and ``hessian_trace`` (the term's mean over the
        unroll, 0 while its schedule is off).
    """
    torch.manual_seed(seed)
    user_model = MyLSTMOptimizer()
    optimizer = wrap(user_model, [
        {"name": "foreign", "inputs": ["log_sign"], "p": 10.0, "input_layout": "1NF",
         "hidden": [["zeros", 2, "N", 20], ["zeros", 2, "N", 20]]},          # (h, c): (layers, N, H)
        {"name": "flatness_aware", "horizon": horizon,
         "regularizers": {"hessian_trace": {"weight": weight, "probes": probes, "start_fraction": 0.5}}},
    ])
    host = FlatL2O()
    optimizer.attach(host)  # MetaTrainer asks its facade for flatness terms at every iterate

    task = create_task("mlp_digits", batch_size=64)
    # Meta-training init seeds are >= 1000, apart from evaluation and validation seeds.
    trainer = MetaTrainer(optimizer, lambda g: (task, 1000 + int(torch.randint(0, 10**6, (1,), generator=g))),
                          flat=host, config=MetaTrainConfig(meta_steps=meta_steps, unroll=unroll,
                                                            horizon=horizon, val_every=0, seed=seed))
    result = trainer.train()

    # The checkpoint is the user's own format: a bare module loads it.
    restored = MyLSTMOptimizer()
    restored.load_state_dict(optimizer.state_dict())
    return {"meta_loss": [h["meta_loss"] for h in result.history],
            "hessian_trace": [h.get("term/hessian_trace", 0.0) for h in result.history]}


if __name__ == "__main__":
    logs = main()
    losses, traces = logs["meta_loss"], logs["hessian_trace"]
    print(f"meta-loss: first {losses[0]:.3f}, last {losses[-1]:.3f}; "
          f"Hessian-trace term, mean over the run: {sum(traces) / len(traces):.4f}")
