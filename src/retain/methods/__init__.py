"""Continual-learning methods, one file each; importing this package registers every one of them."""

import importlib
import pkgutil

from retain.methods.base import ContinualMethod, MethodContext, StepOutputs
from retain.methods.registry import available, create_method, register

# Every module in this folder is a method (or its shared helpers): importing it runs its @register.
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ContinualMethod", "MethodContext", "StepOutputs", "available", "create_method", "register"]
