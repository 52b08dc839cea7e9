"""PEFT helpers: wrap a model for LoRA or full fine-tuning, read and write its trainable state per task.

Checkpoints of LoRA runs are ordinary PEFT adapter folders (adapter_config.json +
adapter_model.safetensors), loadable with ``PeftModel.from_pretrained``; full fine-tuning saves the
model with ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from retain.config import ModelConfig
from retain.errors import RetainError

ADAPTER_ORDER = "adapters.json"


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
        # LoRA deltas are summed in adapter order: keep it, so a resumed run sums them identically.
        with open(os.path.join(path, ADAPTER_ORDER), "w", encoding="utf-8") as handle:
            json.dump({"adapters": list(model.peft_config), "active": list(model.active_adapters)}, handle)
    else:
        model.save_pretrained(path)


def load_trainable(model: nn.Module, path: str) -> None:
    """Load what `save_trainable` wrote back into the model (in place).

    For PEFT models the checkpoint decides which adapters exist: adapters it holds that the model lacks
    are created from their saved config, and adapters the model has beyond it are deleted, so loading
    the checkpoint of task k restores exactly the adapters that existed after task k.
    """
    model = unwrap(model)
    if isinstance(model, PeftModel):
        saved = {"default": path} if os.path.isfile(os.path.join(path, "adapter_config.json")) else {}
        for entry in sorted(os.listdir(path)) if os.path.isdir(path) else []:
            if os.path.isfile(os.path.join(path, entry, "adapter_config.json")):
                saved[entry] = os.path.join(path, entry)
        if not saved:
            raise RetainError(f"checkpoint {path} holds no PEFT adapter (adapter_config.json is missing)")
        order_file = os.path.join(path, ADAPTER_ORDER)
        recorded = {"adapters": list(saved), "active": None}
        if os.path.isfile(order_file):
            with open(order_file, encoding="utf-8") as handle:
                recorded = json.load(handle)
        saved = {name: saved[name] for name in recorded["adapters"] if name in saved}
        for name in [n for n in model.peft_config if n not in saved]:
            model.delete_adapter(name)
        active = recorded["active"] or list(model.active_adapters)
        for name, folder in saved.items():
            if name not in model.peft_config:
                model.add_adapter(name, LoraConfig.from_pretrained(folder))
            set_peft_model_state_dict(
                model, load_file(os.path.join(folder, "adapter_model.safetensors")), adapter_name=name
            )
        keep = [n for n in active if n in model.peft_config] or [next(iter(model.peft_config))]
        model.base_model.set_adapter(keep)
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


# --- several adapters (O-LoRA, LCIA, ConPET, ...): built on PEFT's multi-adapter API -----------------


def peft_model(model: nn.Module) -> PeftModel:
    """The PeftModel inside `model`; a clear error for full fine-tuning."""
    inner = unwrap(model)
    if not isinstance(inner, PeftModel):
        raise RetainError("this method needs LoRA adapters; set model.finetuning_type: lora")
    return inner


def adapter_names(model: nn.Module) -> list[str]:
    """The LoRA adapters of the model (empty for full fine-tuning)."""
    inner = unwrap(model)
    return list(inner.peft_config) if isinstance(inner, PeftModel) else []


def add_adapter(model: nn.Module, name: str, init_from: str | None = None) -> None:
    """Add a LoRA adapter with the same settings as 'default'; optionally start from another's weights."""
    inner = peft_model(model)
    inner.add_adapter(name, inner.peft_config["default"])
    if init_from is not None:
        copy_adapter(model, init_from, name)


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The parameters of one adapter, keyed by their full parameter names."""
    marker = f".{name}."
    return {n: p for n, p in unwrap(model).named_parameters() if marker in n and "lora_" in n}


def copy_adapter(model: nn.Module, source: str, target: str) -> None:
    """Copy adapter `source`'s weights into adapter `target` (same shapes)."""
    src = adapter_state(model, source)
    dst = adapter_state(model, target)
    with torch.no_grad():
        for name, param in dst.items():
            param.copy_(src[name.replace(f".{target}.", f".{source}.")])


def activate_adapters(model: nn.Module, active: list[str], trainable: list[str]) -> None:
    """Make `active` adapters take part in the forward and only `trainable` ones receive gradients."""
    inner = peft_model(model)
    inner.base_model.set_adapter(active)
    for name in inner.peft_config:
        for param in adapter_state(model, name).values():
            param.requires_grad_(name in trainable)


@contextmanager
def base_model(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its LoRA adapters disabled and in eval mode; trainability and mode restored after."""
    inner = unwrap(model)
    flags = {n: p.requires_grad for n, p in inner.named_parameters()}
    was_training = inner.training
    inner.eval()
    try:
        if isinstance(inner, PeftModel):
            active = list(inner.active_adapters)
            try:
                with inner.disable_adapter():
                    yield inner
            finally:
                inner.base_model.set_adapter(active)
        else:
            yield inner
    finally:
        for name, param in inner.named_parameters():
            param.requires_grad_(flags[name])
        inner.train(was_training)
