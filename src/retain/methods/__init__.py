"""Continual-learning methods, one file each; importing this package registers them."""

from retain.methods import ewc, lwf, multitask, replay, sequential  # noqa: F401
from retain.methods.base import ContinualMethod, MethodContext, StepOutputs
from retain.methods.registry import available, create_method, register

__all__ = ["ContinualMethod", "MethodContext", "StepOutputs", "available", "create_method", "register"]
