"""Shared machinery of the mixture-of-LoRA-experts methods (moelora, clmoe): routers, gating, statistics.

A rank-r PEFT LoRA adapter is read as E experts of rank r/E: expert i owns rows [i*r/E, (i+1)*r/E) of
lora_A and the same columns of lora_B, so scaling the rank-r activation A·dropout(x) by the gates,
each repeated r/E times, gives exactly the mixture of CoIN's MoE-LoRA:
    B diag(g(x) ⊗ 1_{r/E}) A x = sum_i g_i(x) B_i A_i x,    g(x) = softmax(W_g x) per token.
A router Linear(d_in, E, bias=False) is registered on every LoRA layer (a trainable submodule, so the
optimizer sees it); a forward pre-hook on the LoRA layer computes g from the layer input, and a forward
pre-hook on lora_B applies it. The cost is one rank-r LoRA plus the router (one GEMM per factor rather
than E small ones), built on PEFT's public objects with nothing vendored. The adapter stays an ordinary
PEFT adapter; the routers travel in the method state.

This module registers no method: `MoEMethod` is the common base of the registered ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from retain.data.formats import Example
from retain.errors import RetainError
from retain.methods.base import MethodContext
from retain.methods.common.routing import prompt_batches
from retain.models.adapters import peft_model

if TYPE_CHECKING:
    pass

ADAPTER = "default"


class LoRAExperts:
    """Turns every LoRA layer of a PeftModel's adapter into a token-routed mixture of E rank-r/E experts.

    Keeps, in memory only, per-layer usage statistics of the tokens seen in training mode (padding
    excluded): `counts[l, i]` how often expert i was among a token's `stats_top_k` largest gates, and
    `mass[l, i]` the summed gate of expert i.
    """

    def __init__(
        self,
        model: nn.Module,
        num_experts: int,
        top_k: int = 0,
        stats_top_k: int = 1,
        balance: bool = False,
        adapter: str = ADAPTER,
    ) -> None:
        inner = peft_model(model)
        config = inner.peft_config[adapter]
        if getattr(config, "use_dora", False) or getattr(config, "rank_pattern", None):
            raise RetainError("mixture-of-LoRA-experts methods need plain LoRA (no DoRA, no rank_pattern)")
        if config.r % num_experts != 0:
            raise RetainError(
                f"model.lora_rank {config.r} is not divisible by method.num_experts {num_experts}; "
                "each expert gets rank lora_rank / num_experts"
            )
        self.num_experts, self.top_k, self.stats_top_k = num_experts, top_k, min(stats_top_k, num_experts)
        self.chunk = config.r // num_experts
        self.balance = balance
        self.adapter = adapter
        self.names: list[str] = []
        self.layers: list[LoraLayer] = []
        self.routers: list[nn.Linear] = []
        for name, module in inner.named_modules():
            if (
                isinstance(module, LoraLayer)
                and adapter in module.lora_A
                and isinstance(module.lora_A[adapter], nn.Linear)
            ):
                weight = module.lora_A[adapter].weight
                router = nn.Linear(
                    module.in_features, num_experts, bias=False, device=weight.device, dtype=weight.dtype
                )
                module.add_module("moe_router", router)
                self.names.append(name)
                self.layers.append(module)
                self.routers.append(router)
        if not self.layers:
            raise RetainError(
                "mixture-of-LoRA-experts: the model has no LoRA linear layer to split into experts"
            )
        self.mask: torch.Tensor | None = None
        self.gates: list[torch.Tensor | None] = [None] * len(self.layers)
        self.task_gates: torch.Tensor | None = None  # (L, E) task-level gates blended in (CL-MoE)
        self.beta = 1.0  # weight of the instance-level gates when task_gates are set
        self.aux: list[torch.Tensor] = []
        self.profile: list[torch.Tensor] | None = None  # per-row mean gates while recording routes
        # On the model's device: accumulating them never waits for the accelerator. Exact counts (int64);
        # the gate mass in float64 where the device has it.
        device = self.routers[0].weight.device
        self.counts = torch.zeros(len(self.layers), num_experts, device=device, dtype=torch.int64)
        wide = torch.float32 if device.type == "mps" else torch.float64
        self.mass = torch.zeros(len(self.layers), num_experts, device=device, dtype=wide)
        inner.base_model.model.register_forward_pre_hook(self._catch_mask, with_kwargs=True)
        for index, module in enumerate(self.layers):
            module.register_forward_pre_hook(self._router_hook(index))
            module.lora_B[adapter].register_forward_pre_hook(self._gate_hook(index))
        self.ensure_trainable()

    # --- hooks -----------------------------------------------------------------------------------------

    def _catch_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask = kwargs.get("attention_mask")

    def _token_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) float mask of the non-padding tokens of a layer input (all ones when unknown)."""
        mask = self.mask
        if mask is None or x.dim() != 3 or mask.dim() != 2 or mask.shape[0] != x.shape[0]:
            return x.new_ones(x.shape[:-1], dtype=torch.float32)
        # During cached decoding the mask spans past + new tokens; the input holds only the new ones.
        return mask[:, -x.shape[1] :].to(device=x.device, dtype=torch.float32)

    def route(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates, router probabilities), each (..., E), of layer `index` for input x.

        gates = softmax(W_g x), keeping only the top-k renormalised when top_k > 0, then blended with the
        task-level gates when those are set."""
        router = self.routers[index]
        probs = torch.softmax(router(x.to(router.weight.dtype)).float(), dim=-1)
        gates = probs
        if 0 < self.top_k < self.num_experts:
            values, ids = probs.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(probs).scatter(-1, ids, values / values.sum(-1, keepdim=True))
        if self.task_gates is not None:
            gates = self.beta * gates + (1.0 - self.beta) * self.task_gates[index].to(gates.device)
        return gates, probs

    def _router_hook(self, index: int) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            gates, probs = self.route(index, x)
            self.gates[index] = gates
            if module.training or self.profile is not None:
                self._observe(index, x, gates, probs, module.training)

        return hook

    def _gate_hook(self, index: int) -> Callable[[nn.Module, tuple], tuple]:
        def hook(module: nn.Module, args: tuple) -> tuple:
            hidden = args[0]
            scale = self.gates[index].to(hidden.dtype).repeat_interleave(self.chunk, dim=-1)
            return (hidden * scale, *args[1:])

        return hook

    def _observe(
        self, index: int, x: torch.Tensor, gates: torch.Tensor, probs: torch.Tensor, train: bool
    ) -> None:
        mask = self._token_mask(x)
        if train:
            with torch.no_grad():
                ids = gates.topk(self.stats_top_k, dim=-1).indices
                weights = mask.unsqueeze(-1).expand_as(ids).to(torch.int64)
                self.counts[index].index_add_(0, ids.reshape(-1), weights.reshape(-1).to(self.counts.device))
                mass = (gates.detach() * mask.unsqueeze(-1)).reshape(-1, self.num_experts).sum(0)
                self.mass[index] += mass.to(self.mass.device, self.mass.dtype)
            if self.balance:
                self.aux.append(balance_loss(probs, mask))
        if self.profile is not None:
            row = (gates.float() * mask.unsqueeze(-1)).sum(-2) / mask.sum(-1, keepdim=True).clamp(min=1.0)
            self.profile[index] = row.detach()

    # --- state ----------------------------------------------------------------------------------------

    def ensure_trainable(self) -> None:
        for router in self.routers:
            router.weight.requires_grad_(True)

    def router_state(self) -> dict[str, torch.Tensor]:
        return {
            name: r.weight.detach().cpu().clone() for name, r in zip(self.names, self.routers, strict=True)
        }

    def load_router_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.names):
            raise RetainError("method state: the saved routers do not match the model's LoRA layers")
        with torch.no_grad():
            for name, router in zip(self.names, self.routers, strict=True):
                router.weight.copy_(state[name])

    def reset_statistics(self) -> None:
        self.counts.zero_()
        self.mass.zero_()

    def pop_balance_loss(self) -> torch.Tensor | None:
        """Mean of the balancing terms of the forwards since the last call (None if there were none)."""
        if not self.aux:
            return None
        total = torch.stack(self.aux).mean()
        self.aux = []
        return total

    def set_task_gates(self, gates: torch.Tensor | None, beta: float = 1.0) -> None:
        """Blend beta * instance gates + (1 - beta) * `gates[l]` in every layer l (None: instance only)."""
        self.task_gates, self.beta = gates, beta

    # --- experts --------------------------------------------------------------------------------------

    def expert_slices(self, index: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of expert `expert` of layer `index`: its rows of lora_A and its columns of lora_B."""
        module = self.layers[index]
        rows = slice(expert * self.chunk, (expert + 1) * self.chunk)
        return module.lora_A[self.adapter].weight[rows], module.lora_B[self.adapter].weight[:, rows]

    def expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A detached copy of every layer's (lora_A, lora_B) weights."""
        return [
            (m.lora_A[self.adapter].weight.detach().clone(), m.lora_B[self.adapter].weight.detach().clone())
            for m in self.layers
        ]

    @torch.no_grad()
    def instance_profiles(
        self, ctx: MethodContext, examples: Sequence[Example], batch_size: int = 16
    ) -> torch.Tensor:
        """(N, L, E): each example's mean gates over its prompt tokens, per layer (one prompt forward)."""
        model = ctx.model
        was_training = model.training
        model.eval()
        rows = []
        try:
            for batch in prompt_batches(ctx, examples, batch_size):
                self.profile = [None] * len(self.layers)
                model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"],
                    logits_to_keep=1,
                    use_cache=False,
                )
                rows.append(torch.stack(self.profile, dim=1).cpu())
        finally:
            self.profile = None
            model.train(was_training)
        if not rows:
            return torch.zeros(0, len(self.layers), self.num_experts)
        return torch.cat(rows)

    def reduced_counts(self) -> torch.Tensor:
        """The usage counts (int64, on the CPU), summed over all processes when torch.distributed runs:
        every rank then picks the same top experts and merges identically."""
        counts = self.counts.detach().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return counts.cpu()


def balance_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balancing E * sum_i f_i P_i over the non-padding tokens (1 when uniform).

    f_i: fraction of tokens whose largest gate is expert i; P_i: mean router probability of expert i.
    """
    experts = probs.shape[-1]
    flat = probs.reshape(-1, experts)
    weights = mask.reshape(-1, 1)
    total = weights.sum().clamp(min=1.0)
    fraction = (F.one_hot(flat.argmax(-1), experts).float() * weights).sum(0) / total
    mean_prob = (flat * weights).sum(0) / total
    return experts * (fraction * mean_prob).sum()
