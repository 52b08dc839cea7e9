"""PEFT helpers: wrap a model for LoRA or full fine-tuning, read and write its trainable state per task.

Checkpoints of LoRA runs are ordinary PEFT adapter folders (adapter_config.json +
adapter_model.safetensors), loadable with ``PeftModel.from_pretrained``; full fine-tuning saves the
model with ``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from retain.config import ModelConfig, parse_lora_layers
from retain.errors import RetainError
from retain.models.vision import is_image_text_model, language_linear_names, vlm_parts

ADAPTER_ORDER = "adapters.json"
# Base-model weights a LoRA run trains beside its adapters (an image-text model's projector or vision
# tower), saved next to the adapters; absent for text models.
BASE_WEIGHTS = "trainable_base.safetensors"

logger = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def apply_finetuning(
    model: nn.Module, config: ModelConfig, gradient_checkpointing: bool = False
) -> nn.Module:
    """LoRA through PEFT (rank, alpha, dropout, targets, DoRA, rsLoRA) or full fine-tuning (every parameter
    trainable); with `model.adapter_name_or_path` the LoRA starts from that saved adapter.

    Image-text models (retain.models.vision): LoRA goes on the language model's linear layers only and
    `lora_layers` counts its decoder layers; the vision tower is trained only without
    `freeze_vision_tower` and the projector only with `train_projector` (their own weights, not LoRA).
    LoRA weights are float32 whatever the base weights' dtype (PEFT's autocast_adapter_dtype).
    `gradient_checkpointing` (train.gradient_checkpointing) recomputes activations in the backward pass.
    """
    check_adapter(config)
    if is_image_text_model(model):
        model = _apply_finetuning_image_text(model, config)
    elif config.finetuning_type == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        model = _apply_lora_text(model, config)
    if config.finetuning_type == "full":
        half = {p.dtype for p in model.parameters()} - {torch.float32}
        if half:
            logger.warning(
                "full fine-tuning updates the %s weights in place (no float32 master copy): small updates "
                "round away; model.dtype: float32 with train.bf16 autocast trains in full precision",
                str(next(iter(half)))[6:],
            )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


_FULL_WITH_ADAPTER = (
    "config: model.adapter_name_or_path starts from a LoRA adapter, which needs finetuning_type: lora (to "
    "fine-tune fully, merge the adapter into the model with PEFT's merge_and_unload and load that folder)"
)


def _apply_lora_text(model: nn.Module, config: ModelConfig) -> nn.Module:
    target = config.lora_target.strip()
    layers = lora_layer_indices(model, config.lora_layers)
    targets: str | list[str]
    if target not in ("all", "all-linear"):
        targets = [t.strip() for t in target.split(",") if t.strip()]
    elif layers is None:
        targets = "all-linear"
    else:  # PEFT takes layers_to_transform with a list of names only
        targets = linear_module_names(model)
    try:
        return _wrap_lora(model, _lora_config(config, targets, layers), config)
    except ValueError as exc:
        raise RetainError(
            f"config: model.lora_target '{config.lora_target}' with model.lora_layers "
            f"'{config.lora_layers}' does not fit this model: {exc}"
        ) from None


def _lora_config(
    config: ModelConfig, targets: str | list[str], layers: list[int] | None = None
) -> LoraConfig:
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        task_type="CAUSAL_LM",
    )


def _wrap_lora(model: nn.Module, lora: LoraConfig, config: ModelConfig) -> PeftModel:
    """The model with its `default` LoRA adapter: a new one from `lora`, or the one saved in
    `model.adapter_name_or_path` (whose own settings win over `lora`'s)."""
    if not config.adapter_name_or_path:
        return get_peft_model(model, lora)
    path = config.adapter_name_or_path
    saved = read_adapter_config(path)
    differ = _lora_differences(model, saved, lora)
    if differ:
        logger.warning("model.adapter_name_or_path %s: using the adapter's own %s", path, "; ".join(differ))
    saved.lora_dropout = config.lora_dropout  # a training setting, not part of what the adapter learnt
    try:
        return PeftModel.from_pretrained(model, path, adapter_name="default", is_trainable=True, config=saved)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RetainError(
            f"config: model.adapter_name_or_path {path} does not fit model {config.name_or_path} ({first}); "
            f"was it trained on another base model (its adapter_config.json says "
            f"{saved.base_model_name_or_path or 'nothing'})?"
        ) from None


def _lora_differences(model: nn.Module, saved: LoraConfig, wanted: LoraConfig) -> list[str]:
    """Where a saved adapter's LoRA settings differ from the config's: `key saved (model.field gives x)`."""

    def targets(value):
        if value == "all-linear":  # PEFT saves it expanded, as full module names
            return sorted(linear_module_names(model))
        if isinstance(value, (set, list, tuple)):  # by leaf name; layers_to_transform says which layers
            return sorted({name.rsplit(".", 1)[-1] for name in value})
        return value

    fields = {
        "r": "lora_rank",
        "lora_alpha": "lora_alpha",
        "target_modules": "lora_target",
        "layers_to_transform": "lora_layers",
        "use_dora": "use_dora",
        "use_rslora": "use_rslora",
    }
    out = []
    for key, field_name in fields.items():
        mine, theirs = getattr(wanted, key), getattr(saved, key)
        if key == "target_modules":
            mine, theirs = targets(mine), targets(theirs)
        if mine != theirs:
            out.append(f"{key} {theirs} (model.{field_name} gives {mine})")
    return out


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_adapter_config(path: str) -> LoraConfig:
    """The LoRA config of a saved PEFT adapter folder, with a clear error for anything else."""
    where = f"config: model.adapter_name_or_path {path}"
    if not os.path.isdir(path):
        raise RetainError(f"{where} is not a folder; point it at a PEFT adapter folder (adapter_config.json)")
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise RetainError(
            f"{where} holds no adapter_config.json: it is not a PEFT adapter folder (a retain run saves its "
            "adapters in tasks/<k>-<task>/adapter/)"
        )
    if not any(os.path.isfile(os.path.join(path, name)) for name in ADAPTER_WEIGHTS):
        raise RetainError(f"{where} has adapter_config.json but no weights ({' or '.join(ADAPTER_WEIGHTS)})")
    try:
        config = PeftConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise RetainError(f"{where}: cannot read adapter_config.json ({exc})") from None
    if not isinstance(config, LoraConfig):
        raise RetainError(f"{where} is a {config.peft_type} adapter; retain starts from LoRA adapters only")
    return config


def check_adapter(config: ModelConfig) -> None:
    """What starting from `model.adapter_name_or_path` would refuse, checked without loading (the plan)."""
    if not config.adapter_name_or_path:
        return
    if config.finetuning_type == "full":
        raise RetainError(_FULL_WITH_ADAPTER)
    read_adapter_config(config.adapter_name_or_path)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (non-reentrant torch checkpointing: same gradients, less memory, one more forward per layer)."""
    inner = unwrap(model)
    base = inner.get_base_model() if isinstance(inner, PeftModel) else inner
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise RetainError(
            f"train.gradient_checkpointing: {type(base).__name__} does not support it; set it to false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also makes the embeddings' output require grad, which only reentrant checkpointing needs:
    # it would carry the backward pass below the lowest LoRA layer (model.lora_layers last:N) for nothing.
    try:
        base.disable_input_require_grads()
    except AttributeError:  # older transformers: no hook was registered
        pass


def _apply_finetuning_image_text(model: nn.Module, config: ModelConfig) -> nn.Module:
    parts = vlm_parts(model)
    if config.finetuning_type == "lora":
        layers = lora_layer_indices(model, config.lora_layers)
        targets = language_linear_names(model, parts, layers)
        target = config.lora_target.strip()
        if target not in ("all", "all-linear"):
            names = {t.strip() for t in target.split(",") if t.strip()}
            targets = [name for name in targets if name.rsplit(".", 1)[-1] in names]
        if not targets:
            raise RetainError(
                f"config: model.lora_target '{config.lora_target}' with model.lora_layers "
                f"'{config.lora_layers}' names no linear layer of this model's language model"
            )
        # full module names: the vision tower and projector never match
        model = _wrap_lora(model, _lora_config(config, targets), config)  # freezes the base model
        params = dict(unwrap(model).get_base_model().named_parameters())
    else:
        params = dict(model.named_parameters())
        for param in params.values():
            param.requires_grad_(True)
    # The projector lies inside the vision tower in Qwen2-VL: set the tower first, then the projector.
    train = {"vision_tower": not config.freeze_vision_tower, "projector": config.train_projector}
    for part, trainable in train.items():
        for name, param in params.items():
            if parts.owns(name, part):
                param.requires_grad_(trainable)
    return model


def linear_module_names(model: nn.Module) -> list[str]:
    """The names of the linear layers `all-linear` means: every nn.Linear but the output layer."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not output
        }
    )


def lora_layer_indices(model: nn.Module, spec: str) -> list[int] | None:
    """The decoder layers `model.lora_layers` names on this model (None: all of them); for an image-text
    model, the language model's."""
    config = getattr(model, "config", None)
    if is_image_text_model(model):  # the language model's layers
        config = config.get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    return select_layers(spec, count if isinstance(count, int) else None)


def select_layers(spec: str, count: int | None) -> list[int] | None:
    """`model.lora_layers` resolved for a model of `count` decoder layers (None: all of them)."""
    selection = parse_lora_layers(spec)
    if selection is None:
        return None
    if count is None:
        raise RetainError(
            f"config: model.lora_layers '{spec}' needs a model whose config has num_hidden_layers; use all"
        )
    indices = list(range(count - selection, count)) if isinstance(selection, int) else selection
    if min(indices) < 0 or max(indices) >= count:
        raise RetainError(
            f"config: model.lora_layers '{spec}' names layers this model lacks: "
            f"it has {count} (0 to {count - 1})"
        )
    return indices


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
        base = _trainable_base(model)
        if base:
            save_file({n: p.detach().contiguous() for n, p in base.items()}, os.path.join(path, BASE_WEIGHTS))
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
        _load_trainable_base(model, path)
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


def _trainable_base(model: PeftModel) -> dict[str, nn.Parameter]:
    """The trainable parameters of a PEFT model that belong to no adapter (the projector of an image-text
    model with model.train_projector), by their names in the PeftModel."""
    return {
        name: p
        for name, p in model.named_parameters()
        if p.requires_grad and "lora_" not in name and "modules_to_save" not in name
    }


def _load_trainable_base(model: PeftModel, path: str) -> None:
    base = _trainable_base(model)
    file = os.path.join(path, BASE_WEIGHTS)
    if not os.path.isfile(file):
        if base:
            raise RetainError(
                f"checkpoint {path} has no {BASE_WEIGHTS}, but the model trains base weights beside its "
                f"adapters ({next(iter(base))}, ...); was it written with other model settings?"
            )
        return
    saved = load_file(file)
    params = dict(model.named_parameters())
    if set(saved) - set(params):
        raise RetainError(f"checkpoint {path}: {BASE_WEIGHTS} does not match the model ({sorted(saved)[:3]})")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


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
