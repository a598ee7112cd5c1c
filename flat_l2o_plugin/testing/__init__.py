"""Reusable conformance checks for plugin authors (and for our own registry).

A plugin's test suite checks its regularizer against the contract in one line::

    from flat_l2o_plugin.testing import check_regularizer

    def test_my_regularizer_conforms():
        check_regularizer("my_regularizer", plugin_manager=isolated_plugin_manager(my_plugin))
"""

from __future__ import annotations

from .isolation import isolated_plugin_manager
from .optimizers import check_learned_optimizer
from .regularizers import check_regularizer

__all__ = ["check_learned_optimizer", "check_regularizer", "isolated_plugin_manager"]
