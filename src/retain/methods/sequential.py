"""Sequential fine-tuning: one adapter (or the full model) trained on through the stream.

The lower bound of continual learning: nothing protects earlier tasks, so it shows how much a plain
fine-tune forgets. Update rule: theta <- theta - lr * grad L_t(theta) on task t's data only.
"""

from __future__ import annotations

from retain.methods.base import ContinualMethod
from retain.methods.registry import register


@register("sequential")
class Sequential(ContinualMethod):
    """Plain fine-tuning on each task in turn (the lower bound)."""
