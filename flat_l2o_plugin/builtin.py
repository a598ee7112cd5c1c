"""The package's own plugin: the regularizers, learned optimizers, wrappers, tasks and pre-trained optimizers we ship.

It is registered through our own entry point (``builtin``) and uses nothing but the
public contract, exactly as a third-party plugin would.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Callable

from .hookspecs import hookimpl
from .optimizers import L2ODM, L2OScale, LearnedCorrection, RNNProp
from .registry import OptimizerInfo, PretrainedInfo, RegularizerInfo, TaskInfo, WrapperInfo
from .regularizers import HessianTopEigenvalue, HessianTrace, LocalEntropy, Sharpness
from .tasks import ConvTask, LogisticRegressionTask, MLPTask, QuadraticTask, RosenbrockTask, TimmTask
from .wrappers import FlatnessAware, ForeignAdapter, SAMGradient

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
    # Not coordinatewise: "coordinatewise" means a coordinate's update depends only on that
    # coordinate's own history, and L2O-Scale's tensor and global RNNs share information.
    OptimizerInfo(name="l2o_scale", factory=L2OScale, coordinatewise=False,
                  description="L2O-Scale (Wichrowska et al. 2017): hierarchical parameter/tensor/global GRUs."),
    OptimizerInfo(name="learned_correction", factory=LearnedCorrection,
                  description="Adam or SGD-momentum plus a bounded learned correction; exactly the base at init."),
)

TASKS = (
    TaskInfo(name="mlp_digits", factory=MLPTask,
             defaults={"dataset": "digits", "hidden_sizes": (20,), "activation": "sigmoid", "batch_size": 128},
             description="MLP 64-20-10, sigmoid, on scikit-learn digits (batch 128)."),
    TaskInfo(name="conv_digits", factory=ConvTask,
             defaults={"dataset": "digits", "channels": (8, 16), "activation": "relu", "batch_size": 128},
             description="Conv net 8-16 channels, ReLU, on 8x8 digits (batch 128)."),
    TaskInfo(name="mlp", factory=MLPTask,
             defaults={"dataset": "mnist1d", "hidden_sizes": (32, 32), "activation": "relu", "batch_size": 128},
             description="MLP of any depth/width/activation on any dataset (default MNIST-1D 40-32-32-10, ReLU)."),
    TaskInfo(name="conv", factory=ConvTask,
             defaults={"dataset": "synthetic_images", "channels": (8, 16), "activation": "relu", "batch_size": 128},
             description="Two-layer conv net on images, or 1-D conv on sequences such as mnist1d (default 3x16x16 images)."),
    TaskInfo(name="timm", factory=TimmTask,
             defaults={"model": "resnet10t", "model_kwargs": {}, "dataset": "synthetic_images", "batch_size": 32},
             description="Any timm model by name and kwargs, functional, batch-statistics BN (default resnet10t)."),
    TaskInfo(name="logistic_regression", factory=LogisticRegressionTask,
             defaults={"dataset": "synthetic_linear", "l2": 0.0, "batch_size": 128},
             description="Multinomial logistic regression (default: data from a logistic teacher, 20 features)."),
    TaskInfo(name="quadratic", factory=QuadraticTask,
             defaults={"dim": 20, "condition_number": 100.0, "noise_std": 0.0, "batch_size": 1, "problem_seed": 0},
             description="Random quadratic with exact Hessian spectrum 1..1/κ (default d=20, κ=100)."),
    TaskInfo(name="rosenbrock", factory=RosenbrockTask,
             defaults={"dim": 2, "noise_std": 0.0, "batch_size": 1},
             description="d-dimensional Rosenbrock; noise_std > 0 gives unbiased noisy gradients."),
)

WRAPPERS = (
    WrapperInfo(name="flatness_aware", factory=FlatnessAware,
                description="Adds the activated flatness regularizers to any learned optimizer's meta-training."),
    WrapperInfo(name="foreign", factory=ForeignAdapter,
                description="Adapts a user's gradient-to-update nn.Module (state as arguments or attributes)."),
    WrapperInfo(name="sam_gradient", factory=SAMGradient,
                description="Feeds the wrapped optimizer the gradient at the SAM point θ + ρ·ĝ (train and test)."),
)


@hookimpl
def register_regularizers(register: Callable[[RegularizerInfo], None]) -> None:
    for info in REGULARIZERS:
        register(info)


@hookimpl
def register_optimizers(register: Callable[[OptimizerInfo], None]) -> None:
    for info in OPTIMIZERS:
        register(info)


@hookimpl
def register_wrappers(register: Callable[[WrapperInfo], None]) -> None:
    for info in WRAPPERS:
        register(info)


@hookimpl
def register_tasks(register: Callable[[TaskInfo], None]) -> None:
    for info in TASKS:
        register(info)


def shipped_pretrained() -> tuple[PretrainedInfo, ...]:
    """The pre-trained optimizers in ``flat_l2o_plugin/pretrained/index.json`` (see :mod:`.study.shipping`)."""
    folder = resources.files(__package__).joinpath("pretrained")
    index = folder.joinpath("index.json")
    if not index.is_file():
        return ()
    return tuple(
        PretrainedInfo(name=e["name"], optimizer=e["optimizer"], package=__package__,
                       weights=f"pretrained/{e['weights']}", sha256=e["sha256"], version=e["version"],
                       license=e["license"], options=e["options"], wrappers=tuple(e["wrappers"]),
                       card=f"pretrained/{e['card']}", config=f"pretrained/{e['config']}",
                       description=e["description"])
        for e in json.loads(index.read_text(encoding="utf-8")))


@hookimpl
def register_pretrained(register: Callable[[PretrainedInfo], None]) -> None:
    for info in shipped_pretrained():
        register(info)
