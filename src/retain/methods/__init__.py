"""Continual-learning methods, one file each; `registry.available()` imports and registers them all."""

from retain.methods.base import ContinualMethod, MethodContext
from retain.methods.registry import available, create_method, register
from retain.models.forward import StepOutputs

__all__ = ["ContinualMethod", "MethodContext", "StepOutputs", "available", "create_method", "register"]
