"""Any timm model as a functional optimizee, through ``torch.func.functional_call``.

``TimmTask(model="resnet10t")`` builds the architecture once (``pretrained=False``:
nothing is ever downloaded) and evaluates it with the parameters the caller passes,
so an unroll can carry them through a learned optimizer's graph like any other task's.
The parameters are the model's tensors in ``named_parameters()`` order; their names are
``task.param_names``.

Normalization statistics. A functional loss must be a pure function of its parameters
and its batch, yet BatchNorm keeps running statistics that every training-mode forward
updates in place: two calls with the same arguments would then differ, and the state
would leak between trajectories that share the task. We therefore remove the running
statistics from every BatchNorm layer (``track_running_stats=False``, buffers set to
``None``): each layer normalizes with the statistics of the batch it sees, in training
and in evaluation alike, and no buffer is ever written. The module itself stays in
``eval()`` mode, so dropout and stochastic depth are off and the loss is deterministic.
Evaluation therefore uses batch statistics too, over fixed chunks of the split
(``eval_batch_size`` examples, split evenly), so its metrics depend on that chunking,
deterministically. Batches of one example are not supported by BatchNorm models.
Other buffers (position indices, fixed masks) are constants and are left in place.

Third-order derivatives. The meta-gradient of a Hessian-based term (the top eigenvalue,
the trace) with its default HVP products differentiates an HVP once more. torch's
``batch_norm`` refuses that third derivative (a ``RuntimeError`` at the meta-backward),
and ``layer_norm``'s is silently wrong (pytorch/pytorch#175754: the saved statistics are
treated as constants), which corrupts the meta-gradient of ViTs. For BatchNorm and
LayerNorm models pass ``products="finite_difference"`` to the curvature terms (their
meta-gradient then needs second derivatives only; see
:mod:`flat_l2o_plugin.regularizers.finite_difference` for the step) or use first-order
terms (``sharpness``, ``local_entropy``).

Attention. timm's fused attention calls ``scaled_dot_product_attention``, whose CPU
kernels have no double backward, and every curvature regularizer differentiates the
gradient again. Attention layers are therefore switched to timm's explicit
softmax(QKᵀ)V path (``fused_attn = False``), which computes the same function.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .._extras import import_extra
from ..errors import ConfigError
from ..protocols import Params
from .base import ClassificationTask

__all__ = ["TimmTask", "use_batch_statistics"]


def use_batch_statistics(module: nn.Module) -> nn.Module:
    """Make every BatchNorm layer of ``module`` normalize with batch statistics and keep no buffers.

    Returns:
        ``module``, changed in place.
    """
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.track_running_stats = False
            layer.running_mean = None
            layer.running_var = None
            layer.num_batches_tracked = None
    return module


class TimmTask(ClassificationTask):
    """Image classification with a timm architecture, evaluated functionally.

    Args:
        model: A timm model name, e.g. ``"resnet10t"`` or ``"vit_tiny_patch16_224"``.
        model_kwargs: Passed to ``timm.create_model``, e.g. ``{"img_size": 32,
            "patch_size": 8}`` for a ViT at CIFAR size or ``{"depth": 2}`` for a shallower
            one. ``num_classes`` and ``in_chans`` default to the dataset's.
        dataset: An image dataset: ``synthetic_images`` (default), ``digits``, ``mnist``,
            ``cifar10``.
        batch_size: Training mini-batch size (>= 2 for models with BatchNorm).
        dataset_options, train_subset, train_subset_seed: As for
            :class:`~flat_l2o_plugin.tasks.base.ClassificationTask`.
        eval_batch_size: Chunk size of ``evaluate``, which also sets the batch over
            which BatchNorm statistics are taken there.

    Raises:
        ConfigError: Unknown model, ``pretrained`` requested, a non-image dataset, or a
            model that rejects the dataset's image shape (the message says which
            ``model_kwargs`` usually fix it).

    Example:
        >>> task = TimmTask("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 2})
        >>> params = task.init_params(seed=0)
        >>> loss = task.loss(params, task.sample_batch(torch.Generator().manual_seed(0)))
    """

    def __init__(self, model: str = "resnet10t", model_kwargs: Mapping[str, Any] | None = None,
                 dataset: str = "synthetic_images", batch_size: int = 32, *,
                 dataset_options: Mapping[str, Any] | None = None, train_subset: int | None = None,
                 train_subset_seed: int = 0, eval_batch_size: int = 256) -> None:
        timm = import_extra("timm", "timm", "TimmTask")

        if not isinstance(model, str) or not timm.is_model(model):
            close = difflib.get_close_matches(str(model), timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; see timm.list_models()"
            raise ConfigError(f"TimmTask: timm has no model {model!r}{hint}")
        model_kwargs = dict(model_kwargs or {})
        if model_kwargs.pop("pretrained", False):
            raise ConfigError("TimmTask: pretrained weights are never downloaded; remove 'pretrained' from "
                              "model_kwargs (init_params(seed) draws a fresh initialization)")
        super().__init__(dataset, batch_size, dataset_options=dataset_options, train_subset=train_subset,
                         train_subset_seed=train_subset_seed, eval_batch_size=eval_batch_size)
        if self.data.image_shape is None:
            raise ConfigError(
                f"TimmTask: dataset {dataset!r} does not hold images (examples of shape {self.data.input_shape}); "
                f"use an image dataset (synthetic_images, digits, mnist, cifar10)")
        self.image_shape = self.data.image_shape
        self.model, self.model_kwargs = model, model_kwargs
        self._create_kwargs = {"num_classes": self.data.num_classes, "in_chans": self.image_shape[0],
                               **model_kwargs}
        self._module = self.create_module(0)
        self.param_names = [name for name, _ in self._module.named_parameters()]
        self.name = f"timm_{model}_{dataset}"
        self._check_input_shape()

    def create_module(self, seed: int) -> nn.Module:
        """The timm module initialized from ``seed``, normalizing with batch statistics, in eval mode.

        Its parameters equal ``init_params(seed)``. The global random state is left as
        it was: the initialization draws from a forked generator.
        """
        timm = import_extra("timm", "timm", "TimmTask")

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            try:
                module = timm.create_model(self.model, pretrained=False, **self._create_kwargs)
            except TypeError as exc:
                raise ConfigError(f"TimmTask: timm.create_model({self.model!r}) rejects model_kwargs "
                                  f"{self.model_kwargs}: {exc}") from exc
        module = use_batch_statistics(module).eval()
        for layer in module.modules():
            if hasattr(layer, "fused_attn"):
                layer.fused_attn = False  # fused SDPA kernels cannot be differentiated twice
        module.requires_grad_(False)  # its own tensors are placeholders; functional_call swaps in ours
        return module

    def _check_input_shape(self) -> None:
        # A wrong image size shows up here, at construction, rather than mid-run.
        probe = torch.zeros(2, *self.image_shape)
        try:
            with torch.no_grad():
                logits = self._module(probe)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ConfigError(
                f"TimmTask: {self.model!r} rejects images of shape {self.image_shape} from dataset "
                f"{self.dataset!r} ({exc}); pass the image size in model_kwargs (e.g. img_size="
                f"{self.image_shape[1]}, and a patch_size dividing it for a ViT)") from exc
        if tuple(logits.shape) != (2, self.data.num_classes):
            raise ConfigError(f"TimmTask: {self.model!r} returns outputs of shape {tuple(logits.shape[1:])} per "
                              f"image, expected ({self.data.num_classes},) class logits")

    def init_params(self, seed: int) -> list[Tensor]:
        """The parameters of a freshly initialized model, in ``named_parameters()`` order."""
        return [p.detach() for p in self.create_module(seed).parameters()]

    def forward(self, params: Params, x: Tensor) -> Tensor:
        if len(params) != len(self.param_names):
            raise ConfigError(f"{self.name}: expected {len(self.param_names)} parameter tensors (named_parameters() "
                              f"order), got {len(params)}")
        reference = params[0]
        if self._module_device != reference.device:
            self._module.to(reference.device)  # constant buffers must live where the params do
        x = x.to(reference).reshape(-1, *self.image_shape)
        return torch.func.functional_call(self._module, dict(zip(self.param_names, params)), (x,))

    @property
    def _module_device(self) -> torch.device:
        tensor = next(self._module.parameters())
        return tensor.device
