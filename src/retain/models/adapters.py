"""PEFT helpers: wrap a model for LoRA or full fine-tuning, read and write its trainable state per task.

Checkpoints of LoRA runs are ordinary PEFT adapter folders (adapter_config.json +
adapter_model.safetensors), loadable with ``PeftModel.from_pretrained``; full fine-tuning saves the
model with ``save_pretrained``.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from retain.config import ModelConfig
from retain.errors import RetainError


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def apply_finetuning(model: nn.Module, config: ModelConfig) -> nn.Module:
    """LoRA through PEFT (rank, alpha, dropout, targets) or full fine-tuning (every parameter trainable)."""
    if config.finetuning_type == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    target = config.lora_target.strip()
    targets: str | list[str] = (
        "all-linear"
        if target in ("all", "all-linear")
        else [t.strip() for t in target.split(",") if t.strip()]
    )
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise RetainError(
            f"config: model.lora_target '{config.lora_target}' does not fit this model: {exc}"
        ) from None


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for everything the optimizer updates."""
    return {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}


def snapshot_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached fp32 copy of the trainable parameters (teacher weights, EWC anchors)."""
    return {name: p.detach().clone().float() for name, p in trainable_parameters(model).items()}


def weights_folder(model: nn.Module) -> str:
    """Name of a checkpoint's weights folder: 'adapter' (PEFT format) for LoRA, 'model' for full FT."""
    return "adapter" if isinstance(unwrap(model), PeftModel) else "model"


def save_trainable(model: nn.Module, path: str) -> None:
    """Write the model's trainable state into the folder `path` (callers make the write atomic)."""
    model = unwrap(model)
    if isinstance(model, PeftModel):
        model.save_pretrained(path, selected_adapters=list(model.peft_config))
    else:
        model.save_pretrained(path)


def load_trainable(model: nn.Module, path: str) -> None:
    """Load what `save_trainable` wrote back into the model (in place)."""
    model = unwrap(model)
    if isinstance(model, PeftModel):
        for name in model.peft_config:
            folder = path if name == "default" else os.path.join(path, name)
            file = os.path.join(folder, "adapter_model.safetensors")
            if not os.path.isfile(file):
                raise RetainError(f"checkpoint {path} has no adapter '{name}' ({file} is missing)")
            set_peft_model_state_dict(model, load_file(file), adapter_name=name)
        return
    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise RetainError(f"checkpoint {path} has no model.safetensors")
    missing, unexpected = model.load_state_dict(load_file(file), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [m for m in missing if m not in tied and "lm_head" not in m]:
        raise RetainError(
            f"checkpoint {path} does not match the model (missing {missing[:3]}, extra {unexpected[:3]})"
        )
