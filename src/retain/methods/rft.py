"""RFT: reinforcement fine-tuning with GRPO through the continual stream (Lai et al., 2025, "Reinforcement
Fine-Tuning Naturally Mitigates Forgetting in Continual Post-Training", arXiv 2507.05386), with their
rollout-based instance filtering (RIF-RFT).

GRPO (Shao et al., 2024, DeepSeekMath): for each training prompt q, sample G completions o_1..o_G from
the current policy, reward each with the task's scorer against the reference (plus `format_weight` times a
format reward), and give every token of o_i the group-relative advantage
A_i = (r_i - mean(r)) / (std(r) + 1e-4)   (without the division when scale_rewards is false: Dr. GRPO).
The loss of a micro-batch is
L = -1/N sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i) - beta KL_it ],
rho_it = pi(o_it | q, o_<t) / pi_old(o_it | q, o_<t), KL_it = pi_ref/pi - log(pi_ref/pi) - 1 (the k3
estimator) with pi_ref the model with its LoRA adapters disabled; `loss_type: token` averages over all
tokens of the batch instead of per completion (DAPO). Log-probabilities are of the logits divided by the
sampling temperature, as the samples were drawn. The reference answer is never trained on: there is no
SFT term.

RIF-RFT: before a task trains, each training instance is rolled out `filter_rollouts` times from the model
the task starts from, and instances whose rollouts are all wrong or all right (`filter_rule`; a rollout is
right when its task reward is at least `correct_threshold`) are dropped, so training spends its
generation budget on instances it can learn from. The paper's abstract does not state the exact rule, so
it is configurable; `both` is the one that matches GRPO (such groups have zero advantage). A policy that
rarely solves a task (a small model answering in sentences that an exact scorer rejects) has almost
every group all wrong: `both` then keeps next to nothing (when it keeps nothing, the task trains on all
its instances), and GRPO gets a learning signal only from a format reward; `all_right` keeps the
unsolved instances (examples/rft.yaml).

Deviations, and why:
- GRPO runs inside this method's `loss` hook, not through TRL's GRPOTrainer: the continual loop trains
  every task with its own Trainer (the method hooks, per-task seeding, checkpoints and resume after a
  kill), and GRPOTrainer would replace that Trainer, its data pipeline and its sampler, so it could
  neither resume with the same matrix nor combine with other methods (`method.plus`). The SFT forward the
  loop computes on each batch is kept in the graph with weight 0 (it is only logged as loss/task).
- One policy update per rollout batch (TRL's default num_iterations = 1): pi_old is the current policy,
  so rho = 1 in value and the clip is inactive; the clipped objective is still what is differentiated,
  so its gradient is exactly GRPO's.
- Generation is Hugging Face `generate` (no vLLM). With beta = 0 (the default, as in TRL and the
  paper's finding that the KL is not what prevents forgetting) completions whose group has zero
  advantage are not run through the policy forward: their loss terms are exactly zero, and the
  normaliser still counts them.
- Text-only: the rollout sampler does not pass image inputs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from retain.data.batching import IGNORE_INDEX, left_pad
from retain.data.encode import encode_prompt
from retain.data.formats import Example
from retain.errors import RetainError
from retain.evaluation.generate import eos_token_ids
from retain.methods.base import ContinualMethod, MethodContext
from retain.methods.common.pseudo import sampling_seed
from retain.methods.common.rewards import (
    FilterRule,
    format_reward,
    group_advantages,
    is_learnable,
    task_reward,
)
from retain.methods.registry import register
from retain.models.adapters import base_model, unwrap
from retain.models.forward import StepOutputs, model_inputs

if TYPE_CHECKING:
    from retain.data.streams import Task

logger = logging.getLogger(__name__)

LossType = Literal["grpo", "token"]


@dataclass
class RFTConfig:
    num_generations: int = field(
        default=4, metadata={"help": "G: completions sampled per prompt (the group)"}
    )
    max_completion_tokens: int = field(
        default=0,
        metadata={
            "help": "longest completion in tokens; 0: eval.max_new_tokens, the budget evaluation gives"
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus cut of the rollouts (1: none)"})
    top_k: int = field(default=0, metadata={"help": "top-k cut of the rollouts (0: none)"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the policy ratio"})
    beta: float = field(
        default=0.0,
        metadata={"help": "weight of the KL to the reference (the model with LoRA disabled); 0: no KL"},
    )
    scale_rewards: bool = field(
        default=True, metadata={"help": "divide advantages by the group's reward std (false: Dr. GRPO)"}
    )
    loss_type: LossType = field(
        default="grpo",
        metadata={"help": "grpo: token mean per completion, then mean; token: mean over the batch's tokens"},
    )
    format_weight: float = field(default=0.0, metadata={"help": "weight of the format reward (0: none)"})
    format_pattern: str = field(
        default=r"<think>.*</think>\s*<answer>.*</answer>",
        metadata={"help": "regular expression a whole completion must match to earn the format reward"},
    )
    answer_tag: str = field(
        default="", metadata={"help": "score only the text inside <tag>...</tag> when present (e.g. answer)"}
    )
    filter_rule: FilterRule = field(
        default="both",
        metadata={
            "help": "instances dropped before a task: both, all_wrong, all_right (their rollouts), none"
        },
    )
    filter_rollouts: int = field(
        default=4, metadata={"help": "rollouts per training instance for the filter (0: no filtering)"}
    )
    correct_threshold: float = field(
        default=1.0, metadata={"help": "a rollout counts as right when its task reward is at least this"}
    )
    rollout_batch_size: int = field(default=64, metadata={"help": "sequences per generate call"})

    def __post_init__(self) -> None:
        checks = [
            (self.num_generations >= 2, "num_generations", "2 or more (advantages compare a group)"),
            (self.max_completion_tokens >= 0, "max_completion_tokens", "0 (eval.max_new_tokens) or more"),
            (self.temperature > 0, "temperature", "> 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]"),
            (self.top_k >= 0, "top_k", ">= 0"),
            (self.epsilon > 0, "epsilon", "> 0"),
            (self.beta >= 0, "beta", ">= 0"),
            (self.format_weight >= 0, "format_weight", ">= 0"),
            (self.filter_rollouts >= 0, "filter_rollouts", ">= 0 (0: no filtering)"),
            (
                self.filter_rollouts != 1,
                "filter_rollouts",
                "0 or at least 2 (one rollout is all right or wrong)",
            ),
            (0.0 < self.correct_threshold <= 1.0, "correct_threshold", "in (0, 1]"),
            (self.rollout_batch_size >= 1, "rollout_batch_size", ">= 1"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise RetainError(f"config: method.{name} is {getattr(self, name)!r}; set it {want}")


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 64,
) -> list[list[int]]:
    """Sampled completion token ids of each prompt (from torch's global generator), in the prompts'
    order, each cut after its first end token (kept: the policy learns to stop) or at max_new_tokens."""
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device
    out: list[list[int]] = []
    was_training = model.training
    model.eval()  # no dropout while sampling, as evaluation generates
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids, mask = left_pad(chunk, pad)
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                eos_token_id=eos or None,
                pad_token_id=pad,
                use_cache=True,
            )
            for row in generated[:, ids.shape[1] :].tolist():
                ends = [i for i, token in enumerate(row) if token in eos]
                out.append(row[: ends[0] + 1] if ends else row)
    finally:
        model.train(was_training)
    return out


def completion_logps(
    model: nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities [N, T] of each completion after its prompt (logits / temperature), and
    the mask [N, T] of real completion tokens; completions are right-aligned (left padding)."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    width = max(len(c) for c in completions)
    n = len(prompts)
    ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        seq = prompt + completion
        ids[row, length - len(seq) :] = torch.tensor(seq)
        attention[row, length - len(seq) :] = 1
        targets[row, width - len(completion) :] = torch.tensor(completion)
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "position_ids": (attention.cumsum(1) - 1).clamp(min=0),
    }
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    # The LM head on the completion window only: position j predicts token j + 1.
    logits = model(**model_inputs(batch), logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
    targets = targets.to(device)
    mask = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def grpo_objective(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    loss_type: LossType = "grpo",
    rows: int | None = None,
    tokens: int | None = None,
) -> torch.Tensor:
    """GRPO's clipped surrogate loss (to minimise) for completions with per-token log-probabilities
    `logps` [N, T] under the policy, `old_logps` under the sampling policy, and one advantage each.

    `rows` (grpo) or `tokens` (token) is the normaliser when some zero-advantage completions were left
    out of `logps` (their terms are zero): the count over the whole batch.
    """
    mask = mask.float()
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        delta = ref_logps - logps
        per_token = per_token + beta * (torch.exp(delta) - delta - 1)
    if loss_type == "grpo":
        per_completion = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return per_completion.sum() / (rows or len(per_completion))
    return (per_token * mask).sum() / max(tokens or float(mask.sum()), 1.0)


def _key(example: Example) -> str:
    return json.dumps([example.system, example.messages], sort_keys=True)


def _scorers(ctx: MethodContext, task: Task, examples: list[Example]) -> list[str]:
    """The scorer of each example: its own task's. Another component (replay) may have mixed examples of
    earlier tasks into the data, and those are rewarded as their task scores them."""
    owner = {_key(e): t.scorer for t in ctx.tasks for e in t.train}
    return [owner.get(_key(e), task.scorer) for e in examples]


@register("rft", config=RFTConfig)
class RFT(ContinualMethod):
    """RFT: GRPO on the task's verifiable reward, after rollout-based instance filtering (RIF-RFT)."""

    config: RFTConfig
    refused_strategies = {
        "sharded-params": "each process samples rollouts of its own prompts with the unwrapped model, "
        "stopping at its own length; under FSDP / ZeRO-3 every forward needs all processes in step and the "
        "full parameters",
    }
    supports_images = False  # the rollout sampler is text-only

    def __init__(self, config: RFTConfig | None = None) -> None:
        super().__init__(config or RFTConfig())
        # token ids of each training example (as the loop encodes it) -> (example, its prompt ids, scorer)
        self._rows: dict[tuple[int, ...], tuple[Example, list[int], str]] = {}

    def setup(self, ctx: MethodContext) -> None:
        if self.config.beta > 0 and ctx.config.model.finetuning_type != "lora":
            raise RetainError(
                "config: method.beta > 0 needs a reference model, which rft takes as the model with its LoRA "
                "adapters disabled; use model.finetuning_type: lora, or set method.beta: 0"
            )

    def _max_tokens(self, ctx: MethodContext) -> int:
        return self.config.max_completion_tokens or ctx.config.eval.max_new_tokens

    def _texts(self, ctx: MethodContext, completions: list[list[int]]) -> list[str]:
        """The answers completions give, as evaluation reads them: without end tokens, stripped."""
        eos = set(eos_token_ids(unwrap(ctx.model), ctx.tokenizer))
        return [
            ctx.tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True).strip()
            for ids in completions
        ]

    def _rewards(
        self, ctx: MethodContext, example: Example, scorer: str, completions: list[list[int]]
    ) -> list[float]:
        """Task reward (the scorer against the reference) plus format_weight x format reward."""
        rewards = []
        for text in self._texts(ctx, completions):
            reward = task_reward(scorer, text, example, self.config.answer_tag)
            if self.config.format_weight > 0:
                reward += self.config.format_weight * format_reward(text, self.config.format_pattern)
            rewards.append(reward)
        return rewards

    def filter_instances(self, ctx: MethodContext, task: Task, data: list[Example]) -> list[Example]:
        """RIF-RFT: roll every instance out `filter_rollouts` times and keep those `filter_rule` keeps.

        Each process rolls out its share and the decisions are summed, so every process keeps the same
        instances. When nothing would be kept the task trains on all its instances (GRPO then learns
        nothing from the constant groups) and a warning says so.
        """
        k, rule = self.config.filter_rollouts, self.config.filter_rule
        if k == 0 or rule == "none" or not data:
            return data
        share = list(range(ctx.rank, len(data), ctx.world_size))
        prompts = [encode_prompt(ctx.tokenizer, data[i]) for i in share]
        inner = unwrap(ctx.model)
        device = ctx.device
        seed = sampling_seed(ctx, "rft:filter")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # the filter's samples do not move the training's random stream
            completions = sample_completions(
                inner,
                ctx.tokenizer,
                [p for p in prompts for _ in range(k)],
                max_new_tokens=self._max_tokens(ctx),
                temperature=self.config.temperature,
                top_p=self.config.top_p,
                top_k=self.config.top_k,
                batch_size=self.config.rollout_batch_size,
            )
        scorers = _scorers(ctx, task, data)
        keep = torch.zeros(len(data), device=device)
        right = 0
        for j, i in enumerate(share):
            rewards = [
                task_reward(scorers[i], text, data[i], self.config.answer_tag)
                for text in self._texts(ctx, completions[j * k : (j + 1) * k])
            ]
            right += sum(r >= self.config.correct_threshold for r in rewards)
            keep[i] = float(is_learnable(rewards, rule, self.config.correct_threshold))
        if ctx.world_size > 1 and dist.is_initialized():
            dist.all_reduce(keep)
        kept = [e for e, flag in zip(data, keep.tolist(), strict=True) if flag > 0]
        ctx.log("rft/kept_fraction", len(kept) / len(data))
        ctx.log("rft/filter_right_fraction", right / max(len(share) * k, 1))
        logger.info(
            "rft: %d of %d instances of task %s kept by the %s filter", len(kept), len(data), task.name, rule
        )
        if not kept:
            logger.warning(
                "rft: every instance of task %s has rollouts that are all %s, so the filter would keep none; "
                "training on all of them (their groups have zero advantage, so GRPO learns little)",
                task.name,
                "right or all wrong" if rule == "both" else rule.removeprefix("all_"),
            )
            return data
        return kept

    def training_data(self, ctx: MethodContext, task: Task, data: list[Example]) -> list[Example]:
        kept = self.filter_instances(ctx, task, data)
        self._rows = {}
        scorers = _scorers(ctx, task, kept)
        for example, feature, scorer in zip(kept, ctx.encode(kept), scorers, strict=True):
            self._rows[tuple(feature["input_ids"])] = (example, encode_prompt(ctx.tokenizer, example), scorer)
        return kept

    def _lookup(self, batch: dict) -> list[tuple[Example, list[int], str]]:
        found = []
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True):
            key = tuple(t for t, m in zip(ids, mask, strict=True) if m)
            if key not in self._rows:
                raise RetainError(
                    "rft: a training batch holds an example that rft's training_data did not see; list rft "
                    "after the methods that add training data in method.plus"
                )
            found.append(self._rows[key])
        return found

    def loss(self, ctx: MethodContext, model: nn.Module, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        cfg, g = self.config, self.config.num_generations
        rows = self._lookup(batch)
        inner = unwrap(model)
        prompts = [prompt for _, prompt, _ in rows for _ in range(g)]
        completions = sample_completions(
            inner,
            ctx.tokenizer,
            prompts,
            max_new_tokens=self._max_tokens(ctx),
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            batch_size=cfg.rollout_batch_size,
        )
        rewards = torch.tensor(
            [
                self._rewards(ctx, example, scorer, completions[i * g : (i + 1) * g])
                for i, (example, _, scorer) in enumerate(rows)
            ]
        )
        advantages = group_advantages(rewards, cfg.scale_rewards).flatten()
        lengths = [len(c) for c in completions]
        ctx.log("rft/reward", rewards.mean())
        ctx.log("rft/reward_std", rewards.std(dim=1).mean())
        ctx.log("rft/zero_std_groups", (rewards.std(dim=1) == 0).float().mean())
        ctx.log("rft/completion_tokens", sum(lengths) / len(lengths))
        # With no KL a zero-advantage completion contributes exactly nothing: skip its forward.
        chosen = list(range(len(completions))) if cfg.beta > 0 else advantages.nonzero().flatten().tolist()
        zero = outputs.loss * 0.0  # keeps the loop's forward in the graph (every parameter used, for DDP)
        if not chosen:
            return zero
        pad = ctx.tokenizer.pad_token_id
        sub_prompts = [prompts[i] for i in chosen]
        sub_completions = [completions[i] for i in chosen]
        logps, mask = completion_logps(inner, sub_prompts, sub_completions, pad, cfg.temperature)
        ref = None
        if cfg.beta > 0:
            with torch.no_grad(), base_model(model) as reference:
                ref, _ = completion_logps(reference, sub_prompts, sub_completions, pad, cfg.temperature)
        objective = grpo_objective(
            logps,
            logps.detach(),  # one update per rollout batch: the sampling policy is the current one
            advantages[chosen].to(logps.device),
            mask,
            epsilon=cfg.epsilon,
            beta=cfg.beta,
            ref_logps=ref,
            loss_type=cfg.loss_type,
            rows=len(completions),
            tokens=sum(lengths),
        )
        ctx.log("rft/objective", objective)
        return zero + objective
