"""learn2learn's meta-descent loop, with a flatness term in its meta-gradient.

learn2learn's ``LearnableOptimizer`` learns a gradient transform online: the model moves
by the transformed gradient, differentiably, and the next loss sends a meta-gradient
into the transform. Wrapping it in ``FlatnessLearnableOptimizer`` and calling
``flat_opt.backward(loss, loss_of_model)`` instead of ``loss.backward()`` adds the
activated regularizers (here the Hessian trace) to that meta-gradient, evaluated at the
model's transformed parameters. The model's own gradient stays ∇f.
Run: ``python examples/learn2learn_flatness.py``.
"""

from __future__ import annotations

import learn2learn as l2l
import torch
import torch.nn.functional as F
from torch import nn

from flat_l2o_plugin.integrations.learn2learn import FlatnessLearnableOptimizer
from flat_l2o_plugin.tasks.data import load_dataset


def main(steps: int = 200, weight: float = 0.01, probes: int = 4, batch_size: int = 64,
         seed: int = 0) -> dict[str, list[float]]:
    """Train an MLP on digits with a learned Kronecker transform, meta-trained online.

    Returns:
        Per step ``loss`` and ``hessian_trace`` (the weighted term), and the final
        ``val_accuracy`` (a one-element list).
    """
    torch.manual_seed(seed)
    data = load_dataset("digits")
    x_train, y_train = data.split("train")
    model = nn.Sequential(nn.Linear(x_train.shape[1], 32), nn.Tanh(), nn.Linear(32, 10))

    metaopt = l2l.optim.LearnableOptimizer(model, l2l.optim.KroneckerTransform(l2l.nn.KroneckerLinear), lr=0.1)
    flat_opt = FlatnessLearnableOptimizer(metaopt, {"hessian_trace": {"weight": weight, "probes": probes}})
    meta_optimizer = torch.optim.Adam(flat_opt.parameters(), lr=1e-3)  # the transforms' parameters

    batches = torch.Generator().manual_seed(seed)
    logs: dict[str, list[float]] = {"loss": [], "hessian_trace": []}
    for _ in range(steps):
        idx = torch.randperm(x_train.shape[0], generator=batches)[:batch_size]
        x, y = x_train[idx], y_train[idx]

        def loss_of_model(m, x=x, y=y):
            return F.cross_entropy(m(x), y)

        flat_opt.zero_grad()
        meta_optimizer.zero_grad()
        loss = loss_of_model(model)
        terms = flat_opt.backward(loss, loss_of_model)  # instead of loss.backward()
        meta_optimizer.step()  # the transforms learn, from f and the flatness term
        flat_opt.step()        # the model moves by the transformed gradient
        logs["loss"].append(float(loss.detach()))
        logs["hessian_trace"].append(terms.get("hessian_trace", 0.0))

    x_val, y_val = data.split("val")
    with torch.no_grad():
        logs["val_accuracy"] = [float((model(x_val).argmax(-1) == y_val).float().mean())]
    return logs


if __name__ == "__main__":
    logs = main()
    print(f"loss: first {logs['loss'][0]:.3f}, last {logs['loss'][-1]:.3f}; "
          f"val accuracy {logs['val_accuracy'][0]:.3f}")
