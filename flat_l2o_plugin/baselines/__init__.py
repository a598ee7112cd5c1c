"""Hand-designed flatness-seeking optimizers, the baselines a learned optimizer must beat.

Both are ``torch.optim.Optimizer`` subclasses that re-evaluate the loss inside ``step``
(``uses_closure = True``): :class:`SAM` (and ASAM) and :class:`EntropySGD`. No maintained
package provides them for current torch. The study refers to them as ``"sam"`` and
``"entropy_sgd"`` (see :func:`flat_l2o_plugin.training.experiment.baseline_class`).
"""

from __future__ import annotations

from .entropy_sgd import EntropySGD
from .sam import SAM

__all__ = ["SAM", "EntropySGD"]
