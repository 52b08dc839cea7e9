"""Continual-learning methods, one file each; `registry.available()` imports and registers them all."""

from retain.methods.base import ContinualMethod, MethodContext, StepOutputs
from retain.methods.registry import available, create_method, register

__all__ = ["ContinualMethod", "MethodContext", "StepOutputs", "available", "create_method", "register"]
