"""MIGU: MagnItude-based Gradient Updating (Du et al., "Unlocking Continual Learning Abilities in Language
Models", EMNLP Findings 2024; github wenyudu/MIGU).

During each optimizer step, forward hooks record for every linear layer l the mean magnitude of each
output row j over the (non-padding) tokens of all micro-batches, L1-normalised over the rows:
s_l[j] = mean_tokens |o_l[:, j]| / sum_j' mean_tokens |o_l[:, j']|.
Before the update, only the rows with the largest s_l keep their gradient:
grad W_l[j, :] <- 1[j in top-k(s_l)] * grad W_l[j, :], with k = n - ceil((1 - ratio)(n - 1)), n = d_out,
which is the number of rows at or above torch.quantile(s_l, 1 - ratio), the reference's threshold
(its scripts use ini_threshold = 0.7, so 30% of the rows learn). Biases are not masked. As in the
reference, task 1 is plain fine-tuning and the masking starts with task 2 (`skip_first_task`).

Full fine-tuning: the hooks sit on every nn.Linear with a trainable weight (the LM head included, as in
the reference; a tied LM head's mask then also applies to the embedding rows it shares).
LoRA: the reference's LoRA path is unfinished (its backward calls a helper with the wrong arguments). Here
the rows of each trainable lora_B (its output side, [d_out, r]) are masked by the output magnitudes of
the LoRA-wrapped layer as a whole (base output plus the adapter's delta), which is the reference's
intended "activation_combined" variant; lora_A (whose rows are the r rank directions) is not masked.

The magnitudes are summed over the micro-batches of one optimizer step and, with several processes,
all-reduced (sums and token counts) before the masks are chosen, so every rank masks the same rows.
Padding positions are left out (a pre-hook on the model reads the forward's attention mask); the
reference sums over every position, padding included. Dividing by the token count and by the L1 norm does
not change the ranking within a layer; it makes the logged statistics comparable across steps.
Hooks are attached in before_task and removed in after_task; they record only in training mode with
gradients enabled, so evaluation, generation and no-grad teacher forwards leave no trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from torch import nn

from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem
from retain.methods.common.sharding import (
    DEEPSPEED_GRADIENTS,
    full_gradient,
    is_sharded,
    set_full_gradient,
)
from retain.methods.registry import register
from retain.models.adapters import unwrap


@dataclass
class MIGUConfig:
    ratio: float = field(
        default=0.3,
        metadata={
            "help": "fraction of each linear layer's output rows that keep their gradient (the largest "
            "output magnitudes); the reference scripts keep 0.3 (ini_threshold=0.7)"
        },
    )
    skip_first_task: bool = field(
        default=True, metadata={"help": "train task 1 without masking, as the reference does"}
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise RetainError(f"config: migu ratio must be in (0, 1], got {self.ratio}")


def kept_rows(n: int, ratio: float) -> int:
    """How many of n rows keep their gradient: those at or above the (1 - ratio) quantile of n values."""
    return n - math.ceil((1.0 - ratio) * (n - 1) - 1e-9)


def mask_rows(weight: nn.Parameter, keep: torch.Tensor) -> None:
    """Zero the gradient rows of `weight` where `keep` is False. In place on a whole gradient; a sharded
    one (FSDP2: rows split over ranks) is gathered, masked and put back as each rank's shard."""
    if weight.grad is None:
        return
    if not is_sharded(weight):
        weight.grad.masked_fill_(~keep.to(weight.grad.device).unsqueeze(-1), 0.0)
        return
    grad = full_gradient(weight)
    set_full_gradient(weight, grad.masked_fill(~keep.to(grad.device).unsqueeze(-1), 0.0))


class _Target:
    """One hooked layer: the weights whose rows it masks and its running |output| sums (+ token count)."""

    def __init__(self, name: str, module: nn.Module, weights: list[nn.Parameter]) -> None:
        self.name, self.module, self.weights = name, module, weights
        self.rows = weights[0].shape[0]
        # Per-row sums of |output| then the token count, created on the output's device at the first record
        # (the Trainer moves the model to its device after before_task).
        self.acc: torch.Tensor | None = None

    def take(self) -> torch.Tensor:
        """The accumulated sums (zeros if nothing was recorded), resetting them."""
        acc = self.acc if self.acc is not None else torch.zeros(self.rows + 1, device=self.weights[0].device)
        self.acc = None
        return acc


def maskable_layers(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Parameter]]]:
    """(name, module to hook, weights whose rows follow its output): every LoRA layer with its trainable
    lora_B weights when the model has LoRA layers, else every nn.Linear with a trainable weight."""
    lora = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if lora:
        layers = [
            (
                n,
                m,
                [b.weight for b in m.lora_B.values() if isinstance(b, nn.Linear) and b.weight.requires_grad],
            )
            for n, m in lora
        ]
    else:
        layers = [
            (n, m, [m.weight])
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad
        ]
    return [(n, m, weights) for n, m, weights in layers if weights]


@register("migu", config=MIGUConfig)
class MIGU(ContinualMethod):
    """MIGU: only the output rows of each linear layer with the largest activation magnitudes are updated."""

    config: MIGUConfig
    # FSDP: the masks gather and write back each sharded gradient (mask_rows); checked against one process
    # in tests/engine/test_method_state_equivalence.py.
    refused_strategies = {"deepspeed": DEEPSPEED_GRADIENTS}

    def __init__(self, config: MIGUConfig | None = None) -> None:
        super().__init__(config or MIGUConfig())
        self.targets: list[_Target] = []
        self.handles: list[Any] = []
        self.attention: torch.Tensor | None = None  # the attention mask of the model's latest forward

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        # One |output| sum per row of each masked matrix, plus a token count (an upper bound: every
        # trainable block matrix counted, lora_A's rows included).
        return [
            StateItem("output magnitude sums (during each step)", sum(r + 1 for r, _ in sizes.block_matrices))
        ]

    # --- hooks -------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, required: bool = True) -> None:
        """Hook every linear layer whose output rows can be masked (see the module docstring)."""
        self.detach()
        inner = unwrap(model)
        for name, module, weights in maskable_layers(inner):
            target = _Target(name, module, weights)
            self.targets.append(target)
            self.handles.append(module.register_forward_hook(self._recorder(target)))
        if not self.targets:
            if not required:
                return
            raise RetainError("migu: the model has no trainable linear layer to mask")
        self.handles.append(inner.register_forward_pre_hook(self._remember_mask, with_kwargs=True))

    def detach(self) -> None:
        """Remove every hook and drop the accumulators."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.targets, self.attention = [], [], None

    def _remember_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.attention = kwargs.get("attention_mask")

    def _recorder(self, target: _Target):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            out = output.detach().abs()
            mask = self.attention
            if (
                mask is not None
                and out.dim() == 3
                and out.shape[0] == mask.shape[0]
                and out.shape[1] <= mask.shape[1]
            ):
                # The LM head sees only the final positions (logits_to_keep): the mask's last columns.
                weights = mask[:, mask.shape[1] - out.shape[1] :].to(out.dtype)
                out = out * weights.unsqueeze(-1)
                count = weights.sum(dtype=torch.float32)
            else:
                count = out.numel() // out.shape[-1]
            if target.acc is None:
                target.acc = torch.zeros(target.rows + 1, device=out.device)
            target.acc[:-1] += out.reshape(-1, out.shape[-1]).sum(dim=0, dtype=torch.float32)
            target.acc[-1] += count

        return record

    # --- method hooks ------------------------------------------------------------------------------------

    def before_task(self, ctx: MethodContext, task) -> None:
        self.detach()
        if ctx.task_index > 1 or not self.config.skip_first_task:
            self.attach(ctx.model, required=False)

    def training_data(self, ctx: MethodContext, task, data: list) -> list:
        # Attached again once every component of a combination has run its before_task: only then are the
        # trainable adapters final (ConPET, ABSCL and I-LoRA make theirs trainable in their before_task).
        if ctx.task_index > 1 or not self.config.skip_first_task:
            self.attach(ctx.model)
        return data

    def before_optimizer_step(self, ctx: MethodContext, model: nn.Module) -> None:
        if not self.targets:
            return
        sums = torch.cat([t.take() for t in self.targets])
        if ctx.world_size > 1 and dist.is_initialized():
            dist.all_reduce(sums)
        kept = total = 0
        mass = []
        with torch.no_grad():
            for target, acc in zip(self.targets, sums.split([t.rows + 1 for t in self.targets]), strict=True):
                magnitude = acc[:-1] / acc[-1].clamp(min=1.0)
                share = magnitude / magnitude.sum().clamp(min=torch.finfo(magnitude.dtype).tiny)
                k = kept_rows(len(share), self.config.ratio)
                keep = torch.zeros_like(share, dtype=torch.bool)
                keep[share.topk(k).indices] = True
                keep |= acc[-1] <= 0  # a layer that saw no token this step has nothing to rank it by
                for weight in target.weights:
                    mask_rows(weight, keep)
                kept, total = kept + k, total + len(share)
                mass.append((share * keep).sum())
        if total:
            ctx.log("migu/kept_rows", kept / total)
            ctx.log("migu/kept_magnitude_share", torch.stack(mass).mean())

    def after_task(self, ctx: MethodContext, task, data: list) -> None:
        self.detach()
