"""The package's own plugin: the regularizers, learned optimizers and tasks we ship.

It is registered through our own entry point (``builtin``) and uses nothing but the
public contract, exactly as a third-party plugin would.
"""

from __future__ import annotations

from typing import Callable

from .hookspecs import hookimpl
from .optimizers import L2ODM, RNNProp
from .registry import OptimizerInfo, RegularizerInfo, TaskInfo
from .regularizers import HessianTopEigenvalue, HessianTrace, LocalEntropy, Sharpness
from .tasks import ConvTask, MLPTask

REGULARIZERS = (
    RegularizerInfo(
        name="hessian_top_eigenvalue", factory=HessianTopEigenvalue, needs_hvp=True, stochastic=True,
        description="Top eigenvalue of the mini-batch Hessian (warm-started power iteration).",
    ),
    RegularizerInfo(
        name="hessian_trace", factory=HessianTrace, needs_hvp=True, stochastic=True,
        description="Trace of the mini-batch Hessian (Hutchinson, batched probes).",
    ),
    RegularizerInfo(
        name="local_entropy", factory=LocalEntropy, stochastic=True,
        description="Negative local entropy -F(θ;γ) of Entropy-SGD (smoothing or Langevin).",
    ),
    RegularizerInfo(
        name="sharpness", factory=Sharpness,
        description="SAM sharpness f(θ+ρ·ĝ) - f(θ) along the normalized gradient.",
    ),
)

OPTIMIZERS = (
    OptimizerInfo(name="rnnprop", factory=RNNProp,
                  description="RNNProp (Lv et al. 2017): LSTM on Adam-normalized gradients."),
    OptimizerInfo(name="l2o_dm", factory=L2ODM,
                  description="L2O-DM (Andrychowicz et al. 2016): coordinatewise LSTM, log/sign inputs."),
)

TASKS = (
    TaskInfo(name="mlp_digits", factory=MLPTask,
             defaults={"dataset": "digits", "hidden_sizes": (20,), "activation": "sigmoid", "batch_size": 128},
             description="MLP 64-20-10, sigmoid, on scikit-learn digits (batch 128)."),
    TaskInfo(name="conv_digits", factory=ConvTask,
             defaults={"dataset": "digits", "channels": (8, 16), "activation": "relu", "batch_size": 128},
             description="Conv net 8-16 channels, ReLU, on 8x8 digits (batch 128)."),
)

COMPONENT_NAMES = frozenset(info.name for info in (*REGULARIZERS, *OPTIMIZERS, *TASKS))


@hookimpl
def register_regularizers(register: Callable[[RegularizerInfo], None]) -> None:
    for info in REGULARIZERS:
        register(info)


@hookimpl
def register_optimizers(register: Callable[[OptimizerInfo], None]) -> None:
    for info in OPTIMIZERS:
        register(info)


@hookimpl
def register_tasks(register: Callable[[TaskInfo], None]) -> None:
    for info in TASKS:
        register(info)
