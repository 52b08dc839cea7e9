"""Memory per process before a run, for `retain run --dry-run`: weights, adapter, gradients, optimizer
state and the method's own state under the chosen strategy, so a user knows whether it fits.

Parameters are counted on the meta device (accelerate.init_empty_weights: the model is built from its
config and LoRA applied, no weight is read or allocated). The rules per strategy (ZeRO paper, Rajbhandari
et al., SC 2020, Fig. 1; PyTorch FSDP, Zhao et al., VLDB 2023):
- weights: frozen ones in model.dtype, trainable LoRA weights in fp32 (PEFT keeps adapters fp32), full
  fine-tuning's trainable weights in model.dtype; divided over the processes when parameters are sharded
  (FSDP, ZeRO-3);
- gradients: one per trainable parameter in its dtype (per parameter the method leaves trainable, when it
  freezes some: ContinualMethod.trained_params_estimate); divided when gradients are sharded (FSDP, ZeRO-2/3);
- optimizer state: AdamW keeps 2 moments per trainable parameter (in its dtype), or what a method that brings
  its own optimizer reports (ContinualMethod.optimizer_state_estimate); divided when the
  optimizer is sharded (FSDP, ZeRO-1/2/3); offload moves it to CPU RAM (FSDP's offload moves weights and
  gradients too);
- method state: what the method reports (ContinualMethod.state_estimate), not sharded (methods keep full
  copies on every process).
Activations are not counted: they grow with per_device_train_batch_size x cutoff_len and shrink with
train.gradient_checkpointing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from torch import nn

from retain.config import RunConfig
from retain.methods.base import ContinualMethod, RunSizes, StateItem
from retain.models.adapters import apply_finetuning
from retain.models.loading import BUILT_MODELS, GGUF_MODELS, cache_dir, model_dir, weights_dtype
from retain.models.tiny import tiny_model, tiny_tokenizer
from retain.models.vision import is_image_text_model
from retain.runtime import Strategy

# Optimizer states per trainable parameter (torch / transformers implementations); others: 2 assumed.
OPTIMIZER_STATES = {
    "adamw_torch": 2,
    "adamw_torch_fused": 2,
    "adamw_hf": 2,
    "adam": 2,
    "sgd": 0,
    "adafactor": 0,
}


def _meta_model(config: RunConfig) -> nn.Module | None:
    """The model as the run builds it (LoRA applied), on the meta device; None when only building it
    would tell (a built-in model that is not converted yet)."""
    name = config.model.name_or_path
    if name == "tiny-random":
        build = lambda: tiny_model(tiny_tokenizer())  # noqa: E731
    else:
        if (name in GGUF_MODELS or name in BUILT_MODELS) and not os.path.isfile(
            os.path.join(cache_dir(), "models", name, "config.json")
        ):
            return None
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        path = model_dir(name)
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
        auto = AutoModelForImageTextToText if is_image_text_model(path) else AutoModelForCausalLM
        build = lambda: auto.from_config(model_config, trust_remote_code=config.model.trust_remote_code)  # noqa: E731
    with init_empty_weights():
        model = build()
    # Tied embeddings are one tensor in the real model; built empty they are two until tied, and tying
    # inside init_empty_weights would register a fresh meta copy again.
    model.tie_weights()
    with init_empty_weights():
        return apply_finetuning(model, config.model)


_BLOCK = re.compile(r"\.(layers|h|blocks)\.\d+\.")  # a module inside a numbered transformer block


def _block_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable matrices inside the transformer blocks, with their names: the LoRA factors under LoRA,
    the linear weights under full fine-tuning."""
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and p.ndim == 2 and _BLOCK.search(f".{name}.")
    ]


@dataclass(frozen=True)
class ParameterCounts:
    total: int  # every parameter of the model as trained (adapter included)
    trainable: int
    hidden_size: int
    layers: int
    block_matrices: list[tuple[int, int]]
    block_matrix_names: list[str] = field(default_factory=list)  # the parameters' names, in that order


def count_parameters(config: RunConfig) -> ParameterCounts | None:
    """The model's parameter counts without loading weights (None: the model must be built first)."""
    model = _meta_model(config)
    if model is None:
        return None
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    matrices = _block_matrices(model)
    return ParameterCounts(
        total=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        hidden_size=int(getattr(text, "hidden_size", 0)),
        layers=int(getattr(text, "num_hidden_layers", 0)),
        block_matrices=[(p.shape[0], p.shape[1]) for _, p in matrices],
        block_matrix_names=[name for name, _ in matrices],
    )


@dataclass(frozen=True)
class MemoryLine:
    what: str
    bytes: int
    on_device: bool = True  # False: CPU RAM


@dataclass(frozen=True)
class MemoryEstimate:
    strategy: Strategy
    lines: list[MemoryLine]

    @property
    def device_bytes(self) -> int:
        return sum(line.bytes for line in self.lines if line.on_device)

    @property
    def host_bytes(self) -> int:
        return sum(line.bytes for line in self.lines if not line.on_device)

    def describe(self) -> list[str]:
        """One line per part, then the totals, per process."""
        where = "GPU" if torch.cuda.is_available() else "device"
        out = [f"memory per process under {self.strategy.describe()} (estimate; activations not counted):"]
        for line in self.lines:
            out.append(f"  {line.what}: {human_bytes(line.bytes)}" + ("" if line.on_device else " (CPU RAM)"))
        device, host = human_bytes(self.device_bytes), human_bytes(self.host_bytes)
        out.append(f"  total: {device} on the {where}, {host} in CPU RAM")
        return out


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    value, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{count} B" if unit == "B" else f"{value:.2f} {unit}"


def estimate_memory(
    config: RunConfig,
    strategy: Strategy,
    method: ContinualMethod,
    counts: ParameterCounts,
    train_examples: list[int],
) -> MemoryEstimate:
    """Bytes per process for `strategy` (see the module's rules)."""
    n = strategy.processes
    full = config.model.finetuning_type == "full"
    weight_bytes = torch.finfo(weights_dtype(config.model.dtype)).bits // 8
    trainable_bytes = weight_bytes if full else 4
    frozen = counts.total - counts.trainable

    def shard(numel_bytes: int, sharded: bool) -> int:
        return -(-numel_bytes // n) if sharded else numel_bytes  # ceil: the first shards are the larger

    fsdp_offload = strategy.offload and strategy.name == "fsdp"
    states = OPTIMIZER_STATES.get(config.train.optim, 2)
    sizes = RunSizes(
        total_params=counts.total,
        trainable_params=counts.trainable,
        hidden_size=counts.hidden_size,
        layers=counts.layers,
        train_examples=train_examples,
        cutoff_len=config.train.cutoff_len,
        block_matrices=counts.block_matrices,
        block_matrix_names=counts.block_matrix_names,
    )
    optimizer = method.optimizer_state_estimate(sizes)
    trained = method.trained_params_estimate(sizes)
    trained = counts.trainable if trained is None else trained
    lines = [
        MemoryLine(
            f"weights ({frozen:,} frozen, {str(weights_dtype(config.model.dtype))[6:]})",
            shard(frozen * weight_bytes, strategy.shards_parameters),
            not fsdp_offload,
        ),
        MemoryLine(
            f"{'trainable weights' if full else 'adapter'} ({counts.trainable:,} parameters)",
            shard(counts.trainable * trainable_bytes, strategy.shards_parameters),
            not fsdp_offload,
        ),
        MemoryLine(
            "gradients"
            if trained == counts.trainable
            else f"gradients (at most {trained:,} parameters: what the method leaves trainable)",
            shard(trained * trainable_bytes, strategy.shards_gradients),
            not fsdp_offload,
        ),
        MemoryLine(
            optimizer.what
            if optimizer
            else f"optimizer state ({config.train.optim}: {states} per trainable parameter)",
            shard(
                optimizer.bytes if optimizer else states * counts.trainable * trainable_bytes,
                strategy.shards_optimizer,
            ),
            not strategy.offload,
        ),
    ]
    lines += [_method_line(method, item) for item in method.state_estimate(sizes)]
    return MemoryEstimate(strategy, lines)


def _method_line(method: ContinualMethod, item: StateItem) -> MemoryLine:
    # a combination names each part by its component already
    what = item.what if len(method.components) > 1 else f"{method.name}: {item.what}"
    return MemoryLine(what, item.bytes, item.on_device)
