"""The learned-optimizer zoo: coordinatewise models following ``LearnedOptimizer``."""

from __future__ import annotations

from .l2o_dm import L2ODM, log_sign_preprocess
from .rnnprop import RNNProp, adam_features

__all__ = ["L2ODM", "RNNProp", "adam_features", "log_sign_preprocess"]
