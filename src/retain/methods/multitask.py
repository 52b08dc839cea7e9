"""Multitask (joint) training: all tasks' data at once, the usual upper bound of continual learning.

The loop trains once on the union of every task's training set (shuffled together) and evaluates
once, so the accuracy matrix has two rows: before training and after joint training. Metrics that
need a sequence of tasks (BWT, FWT, forgetting) are reported as null.
"""

from __future__ import annotations

from retain.methods.base import ContinualMethod
from retain.methods.registry import register


@register("multitask")
class Multitask(ContinualMethod):
    """Joint training on all tasks at once (the upper bound; one evaluation row)."""

    joint_training = True
