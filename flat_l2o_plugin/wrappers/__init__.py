"""Retrofit wrappers: flatness-aware meta-training for learned optimizers we did not write.

* :class:`FlatnessAware` (registered as ``flatness_aware``) adds the activated
  regularizers to any learned optimizer's meta-training.
* :class:`ForeignAdapter` (registered as ``foreign``) turns a user's gradient-to-update
  module into a learned optimizer, its recurrent state passed as one argument, several,
  or kept in the module's attributes.
* :class:`SAMGradient` (registered as ``sam_gradient``) feeds any learned optimizer
  the gradient at the SAM-perturbed point, in meta-training and at test time.
* :func:`wrap` nests registered wrappers from configuration, first entry innermost.

Every wrapper is transparent as a module: ``state_dict()`` keys are the wrapped model's.
"""

from __future__ import annotations

from .flatness import FlatnessAware
from .foreign import ForeignAdapter
from .sam_gradient import SAMGradient
from .stack import LearnedOptimizerWrapper, TransparentWrapper, gradient_oracle, host_step, unwrap, wrap

__all__ = ["FlatnessAware", "ForeignAdapter", "LearnedOptimizerWrapper", "SAMGradient", "TransparentWrapper",
           "gradient_oracle", "host_step", "unwrap", "wrap"]
