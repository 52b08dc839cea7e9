"""Verifiable rewards for reinforcement fine-tuning: the task's own scorer, an optional format reward,
group-relative advantages and the per-instance learnability rule of rollout-based instance filtering.

The correctness reward of a completion is what evaluation would give it: the task's scorer
(retain.evaluation.scoring) on the completion against the reference answer, so every built-in task with an
exact answer has a verifiable reward without extra code. The format reward is 1 when the whole completion
matches a regular expression (the R1-style `<think>...</think><answer>...</answer>` by default).
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from retain.data.formats import Example
from retain.evaluation.scoring import needs_source, score

# Which instances rollout-based filtering drops: those whose rollouts are all wrong, all right, either, none.
FilterRule = Literal["both", "all_wrong", "all_right", "none"]


def extract_tagged(text: str, tag: str) -> str:
    """The content of the last `<tag>...</tag>` in `text`, stripped; `text` itself when it has none (or no
    tag is given), so a model that answers plainly is still scored on its answer."""
    if not tag:
        return text
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else text


def format_reward(text: str, pattern: str) -> float:
    """1.0 when the whole (stripped) completion matches `pattern` (dot matches newlines), else 0.0."""
    return float(re.fullmatch(pattern, text.strip(), flags=re.DOTALL) is not None)


def task_reward(scorer: str, completion: str, example: Example, answer_tag: str = "") -> float:
    """The task's score of a completion against the example's reference, in [0, 1], as evaluation scores
    it; with `answer_tag`, only the tagged answer is scored."""
    source = example.prompt_messages[-1]["content"] if needs_source(scorer) else None
    return score(scorer, extract_tagged(completion, answer_tag).strip(), example.reference, source)


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages of a [prompts, G] reward tensor: each reward minus its group's mean, divided by
    the group's (unbiased) standard deviation when `scale` (Dr. GRPO drops the division).

    A group whose rewards are all equal gets advantage 0 everywhere: it carries no learning signal.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, G] with G >= 2, got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def is_learnable(rewards: list[float], rule: FilterRule, threshold: float = 1.0) -> bool:
    """Whether an instance whose rollouts got `rewards` is kept by rollout-based instance filtering.

    A rollout is right when its reward is at least `threshold`. `both` drops instances whose rollouts are
    all right or all wrong (nothing to learn from either: GRPO's advantages would be zero), `all_wrong`
    only those the model cannot solve, `all_right` only those it already solves; `none` keeps all.
    """
    right = sum(r >= threshold for r in rewards)
    all_right, all_wrong = right == len(rewards), right == 0
    if rule == "both":
        return not (all_right or all_wrong)
    if rule == "all_wrong":
        return not all_wrong
    if rule == "all_right":
        return not all_right
    return True
