"""A plugin that cannot be imported: its dependency is missing."""

from __future__ import annotations

raise ImportError("broken_plugin needs the package 'flat_l2o_missing_dependency'")
