"""Update rules: `UPDATE_RULES` maps `attention.update_rule` to its `UpdateRule` class.

Every module of this package is imported here, and defining an `UpdateRule` subclass with a `name`
registers it: a new rule is one new file in this folder (see `add.py` for the smallest) plus a preset
in `conf/attention/`.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import UPDATE_RULES, TokenInputs, UpdateRule

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["UPDATE_RULES", "TokenInputs", "UpdateRule"]
