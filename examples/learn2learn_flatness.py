"""learn2learn's meta-descent loop, with a flatness term in its meta-gradient.

learn2learn's ``LearnableOptimizer`` learns a gradient transform online: the model moves
by the transformed gradient, differentiably, and the next loss sends a meta-gradient
into the transform. Wrapping it in ``FlatnessLearnableOptimizer`` and calling
``flat_opt.backward(loss, loss_of_model)`` instead of ``loss.backward()`` adds the
activated regularizers (here the Hessian trace) to that meta-gradient, evaluated at the
model's transformed parameters. The model's own gradient stays ∇f.

The host is configured from its own TOML file (``learn2learn_flatness.toml`` beside
this script): its ``[experiment]`` table is the host's business, and flat-l2o reads
only its ``[tool.flat_l2o]`` table.
Run: ``python examples/learn2learn_flatness.py [CONFIG.toml]``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import learn2learn as l2l
import torch
import torch.nn.functional as F
from torch import nn

from flat_l2o_plugin.config import load_config
from flat_l2o_plugin.integrations.learn2learn import FlatnessLearnableOptimizer
from flat_l2o_plugin.tasks.data import load_dataset

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

CONFIG = Path(__file__).with_suffix(".toml")


def main(config: str | Path = CONFIG, *, overrides: Sequence[str] = (), seed: int = 0) -> dict[str, list[float]]:
    """Train an MLP on digits with a learned Kronecker transform, meta-trained online.

    Args:
        config: The host's TOML file.
        overrides: ``--set``-style overrides of the flat-l2o table, e.g.
            ``["regularizers.hessian_trace.weight=0"]``.
        seed: Seeds the model and the batches.

    Returns:
        Per step ``loss`` and ``hessian_trace`` (the weighted term; 0 at the first step, whose
        parameters the transform did not produce), and the final
        ``val_accuracy`` (a one-element list).
    """
    with open(config, "rb") as f:
        experiment = tomllib.load(f)["experiment"]
    steps, batch_size = experiment["steps"], experiment["batch_size"]
    regularizers = load_config(config, table="tool.flat_l2o", overrides=overrides).regularizers
    torch.manual_seed(seed)
    data = load_dataset("digits")
    x_train, y_train = data.split("train")
    model = nn.Sequential(nn.Linear(x_train.shape[1], 32), nn.Tanh(), nn.Linear(32, 10))

    metaopt = l2l.optim.LearnableOptimizer(model, l2l.optim.KroneckerTransform(l2l.nn.KroneckerLinear),
                                           lr=experiment["transform_lr"])
    flat_opt = FlatnessLearnableOptimizer(metaopt, regularizers)
    meta_optimizer = torch.optim.Adam(flat_opt.parameters(), lr=experiment["meta_lr"])  # the transforms' parameters

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
    logs = main(*sys.argv[1:2])
    print(f"loss: first {logs['loss'][0]:.3f}, last {logs['loss'][-1]:.3f}; "
          f"val accuracy {logs['val_accuracy'][0]:.3f}")
