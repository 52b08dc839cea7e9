"""SEFE's RegLoRA: regularise a new task's LoRA at the weights that were key to earlier tasks (Chen et al.,
ICML 2025, "SEFE: Superficial and Essential Forgetting Eliminator for Multimodal Continual Instruction
Tuning"; github jinpeng0528/SEFE, key_elements_identification.py and modeling_llama.py).

Each task trains a fresh LoRA. After task k its update Delta_k = B_k A_k of every LoRA matrix (the product
without the alpha/r scaling, as the reference) names its key positions, the top `key_fraction` of entries
by |Delta_k|, and M_k = M_{k-1} u TopIdx(|Delta_k|). While task t trains:
L = L_task + lambda * mean over LoRA matrices of mean_{(i,j) in M_{t-1}} |(B_t A_t)_ij|,
so the new update stays near zero where earlier tasks stored what they learned (lambda = 2500, 2%).
The other half of SEFE, answer-style diversification of the training data, is a data setting that any
method can use: `stream.answer_styles` (retain/data/answer_styles.py).

Deviations, each leaving the update rule as stated:
- The reference merges Delta_k into the base weights after each task. Here the earlier tasks' adapters
  stay as frozen, always active adapters, which computes the same W0 + (alpha/r) sum_k Delta_k and keeps
  every checkpoint an ordinary adapter folder (merged base weights would have to be saved whole); with
  model.lora_dropout > 0 the frozen adapters' inputs see dropout while training, which merged weights
  would not.
- M is a set (a position two tasks select counts once); the reference concatenates the index lists, so
  a repeated position weighs twice in its mean.
- The penalty takes only the selected entries of B_t A_t, (B_t[i] . A_t[:, j]) for (i, j) in M, at a cost
  of |M| * r, rather than the full d_out x d_in product the reference forms at every step.
- The key positions are not saved: they are recomputed from the frozen adapters a checkpoint holds, so
  checkpoints carry no index sets (for a 7B model, 2% of every adapted weight per task).
The reference divides by 224 = 32 layers x 7 matrices of LLaVA-7B; here by the number of LoRA matrices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem, earlier_adapters
from retain.methods.registry import register
from retain.models.adapters import activate_adapters, adapter_names, add_adapter, peft_model, unwrap
from retain.models.forward import StepOutputs

if TYPE_CHECKING:
    from retain.data.streams import Task

# Entries of B[rows] * A[:, cols]^T formed at once (fp32): bounds the penalty's memory whatever |M| * r.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class SEFEConfig:
    reg_lambda: float = field(
        default=2500.0,
        metadata={
            "help": "weight of the mean |new LoRA update| at earlier tasks' key positions (SEFE: 2500)"
        },
    )
    key_fraction: float = field(
        default=0.02,
        metadata={
            "help": "fraction of each LoRA matrix's entries, by |B A|, that are a task's key positions "
            "(SEFE: 0.02, the top 2%)"
        },
    )

    def __post_init__(self) -> None:
        if self.reg_lambda < 0:
            raise RetainError(f"config: sefe needs reg_lambda >= 0, got {self.reg_lambda}")
        if not 0 < self.key_fraction <= 1:
            raise RetainError(
                f"config: sefe needs key_fraction in (0, 1] (the share of each LoRA matrix's entries "
                f"regularised, e.g. 0.02), got {self.key_fraction}"
            )


class _SelectedEntries(torch.autograd.Function):
    """(B A)[rows, cols] without forming B A; keeps only B, A and the indices for backward, and forms the
    |M| x r products in chunks."""

    @staticmethod
    def forward(ctx: Any, b: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        out = b.new_empty(rows.numel())
        step = max(1, CHUNK_ELEMENTS // max(1, b.shape[1]))
        for s in range(0, rows.numel(), step):
            r, c = rows[s : s + step], cols[s : s + step]
            out[s : s + step] = (b.index_select(0, r) * a.index_select(1, c).T).sum(-1)
        ctx.save_for_backward(b, a, rows, cols)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        b, a, rows, cols = ctx.saved_tensors
        grad_b, grad_a = torch.zeros_like(b), torch.zeros_like(a)
        step = max(1, CHUNK_ELEMENTS // max(1, b.shape[1]))
        for s in range(0, rows.numel(), step):
            r, c, g = rows[s : s + step], cols[s : s + step], grad[s : s + step, None]
            grad_b.index_add_(0, r, g * a.index_select(1, c).T)  # d(B A)_rc / dB_r = A[:, c]
            grad_a.index_add_(1, c, (g * b.index_select(0, r)).T)  # d(B A)_rc / dA[:, c] = B_r
        return grad_b, grad_a, None, None


def selected_entries(
    b: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """The entries (rows[k], cols[k]) of the product b @ a, differentiable in b and a."""
    return _SelectedEntries.apply(b, a, rows, cols)


def lora_matrices(model: nn.Module, adapter: str) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Module name -> (B, A) weights of `adapter`, for every LoRA layer that holds it."""
    return {
        name: (module.lora_B[adapter].weight, module.lora_A[adapter].weight)
        for name, module in unwrap(model).named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


def key_positions(b: torch.Tensor, a: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat indices (row * d_in + col) of the top `fraction` of entries of |B A|, at least one."""
    with torch.no_grad():
        delta = (b.detach().float() @ a.detach().float()).abs().flatten()
        count = max(1, int(fraction * delta.numel()))
        return torch.topk(delta, count, sorted=False).indices.cpu()


@register("sefe", config=SEFEConfig)
class SEFE(ContinualMethod):
    """SEFE's RegLoRA: a fresh LoRA per task, held near zero at earlier tasks' key weight positions."""

    config: SEFEConfig
    refused_strategies = {
        "sharded-params": "its penalty and key positions read the full LoRA factors B and A of every "
        "adapter; under FSDP / ZeRO-3 a process holds only a shard of each",
    }
    supports_full_finetuning = False
    decides_eval_model = True
    adds_adapters = freezes_adapters = True

    def __init__(self, config: SEFEConfig | None = None) -> None:
        super().__init__(config or SEFEConfig())
        # M: module name -> sorted flat indices of the key positions of the adapters of tasks 1..covered.
        self.keys: dict[str, torch.Tensor] = {}
        self.covered = 0
        # The current task's penalty terms: (new B, new A, rows, cols) per LoRA matrix with key positions.
        self.terms: list[tuple[nn.Parameter, nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        return [earlier_adapters(sizes)]

    @staticmethod
    def adapter_for(index: int) -> str:
        return "default" if index <= 1 else f"task{index}"

    def activate(self, model: nn.Module, index: int) -> None:
        """Every adapter active (the earlier tasks' updates stand merged); only task `index`'s trains."""
        activate_adapters(model, active=adapter_names(model), trainable=[self.adapter_for(index)])

    def extend_keys(self, model: nn.Module, through: int) -> None:
        """Add the key positions of the adapters of tasks covered+1 .. `through` to M."""
        for index in range(self.covered + 1, through + 1):
            name = self.adapter_for(index)
            if name not in adapter_names(model):
                raise RetainError(f"sefe: the adapter of task {index} ('{name}') is missing from the model")
            for module, (b, a) in lora_matrices(model, name).items():
                new = key_positions(b, a, self.config.key_fraction)
                old = self.keys.get(module)
                self.keys[module] = new.sort().values if old is None else torch.cat([old, new]).unique()
        self.covered = max(self.covered, through)

    def before_task(self, ctx: MethodContext, task: Task) -> None:
        new = self.adapter_for(ctx.task_index)
        if new not in peft_model(ctx.model).peft_config:
            add_adapter(ctx.model, new)
        self.activate(ctx.model, ctx.task_index)
        self.extend_keys(ctx.model, ctx.task_index - 1)
        self.terms = []
        for module, (b, a) in lora_matrices(ctx.model, new).items():
            flat = self.keys.get(module)
            if flat is None or not flat.numel():
                continue
            columns = a.shape[1]
            # int32 indices where they fit: half the memory, and index_select/index_add_ take them.
            kind = torch.int32 if b.shape[0] * columns < 2**31 else torch.int64
            rows, cols = (flat // columns).to(b.device, kind), (flat % columns).to(b.device, kind)
            self.terms.append((b, a, rows, cols))

    def regularisation(self) -> torch.Tensor | None:
        """mean over LoRA matrices of mean |(B_t A_t)_ij| over the key positions (None on task 1)."""
        if not self.terms:
            return None
        device = self.terms[0][0].device
        # fp32 and autocast off: the term is small to compute, and its scale is what users tune.
        with torch.autocast(device.type, enabled=False):
            means = [selected_entries(b.float(), a.float(), r, c).abs().mean() for b, a, r, c in self.terms]
        return torch.stack(means).mean()

    def loss(self, ctx: MethodContext, model: nn.Module, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        reg = self.regularisation()
        if reg is None:
            return outputs.loss
        ctx.log("sefe/reg", reg)
        return outputs.loss + self.config.reg_lambda * reg

    def eval_model(self, ctx: MethodContext, task: Task) -> nn.Module:
        self.activate(ctx.model, ctx.task_index)
        return ctx.model

    def restore(self, ctx: MethodContext) -> None:
        # The checkpoint's adapters may differ from those M was built from: rebuild it at the next task.
        self.activate(ctx.model, ctx.task_index)
        self.keys, self.covered, self.terms = {}, 0, []
