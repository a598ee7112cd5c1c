"""The learned-optimizer zoo: coordinatewise models following ``LearnedOptimizer``."""

from __future__ import annotations

from .correction import LearnedCorrection
from .l2o_dm import L2ODM, log_sign_preprocess
from .l2o_scale import L2OScale
from .rnnprop import RNNProp, adam_features

__all__ = ["L2ODM", "L2OScale", "LearnedCorrection", "RNNProp", "adam_features", "log_sign_preprocess"]
