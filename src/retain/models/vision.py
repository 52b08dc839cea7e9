"""Image-text (vision-language) models: recognising them, loading them with their processor, and finding
their parts.

A vision-language model (LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics3 / SmolVLM, ...) is a vision tower that
encodes the image, a multimodal projector that maps its features into the language model's embedding
space, and a language model (decoder layers + LM head) that reads them in place of the image tokens.
`vlm_parts` names the three by their module paths, so fine-tuning can put LoRA on the language model
only and freeze or train the other two (retain.models.adapters).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from retain.errors import RetainError

# The keys image processors add to a batch beside the text ones; the forward passes them to the model.
# LLaVA: pixel_values; LLaVA-NeXT: + image_sizes; Qwen2-VL: + image_grid_thw and mm_token_type_ids;
# Idefics3 / SmolVLM: + pixel_attention_mask. mm_token_type_ids is per token (1 on image tokens, like
# input_ids: collate pads it with 0); the others are per image.
IMAGE_INPUT_KEYS = (
    "pixel_values",
    "mm_token_type_ids",
    "image_sizes",
    "image_grid_thw",
    "pixel_attention_mask",
    "image_attention_mask",
    "aspect_ratio_ids",
    "aspect_ratio_mask",
)

# Module attribute names of each part across the families (the first that exists wins).
_LANGUAGE_MODEL = ("language_model", "text_model")
_VISION_TOWER = ("vision_tower", "visual", "vision_model")
# Qwen2-VL keeps its projector (the patch merger) inside the vision tower.
_PROJECTOR = ("multi_modal_projector", "connector", "mm_projector", "merger")


def image_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The image inputs of a batch (empty for a text batch)."""
    return {key: batch[key] for key in IMAGE_INPUT_KEYS if batch.get(key) is not None}


def _image_text_types() -> tuple[set[str], set[str]]:
    """(model types, architectures) transformers loads with AutoModelForImageTextToText."""
    return set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES), set(
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()
    )


def _config_dict(path_or_config: Any) -> dict | None:
    if isinstance(path_or_config, nn.Module):
        path_or_config = getattr(path_or_config, "config", None)
    if path_or_config is None:
        return None
    if isinstance(path_or_config, dict):
        return path_or_config
    if isinstance(path_or_config, (str, os.PathLike)):
        file = os.fspath(path_or_config)
        if os.path.isdir(file):
            file = os.path.join(file, "config.json")
        try:
            with open(file, encoding="utf-8") as handle:
                loaded = json.load(handle)
        except (OSError, ValueError):
            return None
        return loaded if isinstance(loaded, dict) else None
    if hasattr(path_or_config, "to_dict"):  # a transformers config
        return path_or_config.to_dict()
    return None


def is_image_text_model(path_or_config: Any) -> bool:
    """Whether a model folder (or its config.json, a config dict or object, or a model) is an image-text
    model: its model type or architecture is one transformers' AutoModelForImageTextToText loads, or,
    for a type transformers does not know, its config has a `vision_config`."""
    config = _config_dict(path_or_config)
    if not config:
        return False
    types, architectures = _image_text_types()
    if config.get("model_type") in types or set(config.get("architectures") or []) & architectures:
        return True
    if config.get("model_type") in CONFIG_MAPPING:  # a known type that is not image-text (CLIP, SigLIP)
        return False
    return bool(config.get("vision_config"))


def text_layer_count(path_or_config: Any) -> int | None:
    """The number of the language model's decoder layers (text_config first, then the top level)."""
    config = _config_dict(path_or_config) or {}
    text = config.get("text_config") or {}
    count = text.get("num_hidden_layers", config.get("num_hidden_layers"))
    return count if isinstance(count, int) else None


def load_processor(path: str) -> Any:
    """The processor (image processor + tokenizer) of a local image-text model folder, offline."""
    hint = (
        "an image-text model folder needs its processor files beside the weights (tokenizer, "
        "preprocessor_config.json or processor_config.json); copy the whole model folder there"
    )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RetainError(f"model directory {path} has no config.json; is it a Hugging Face model folder?")
    processor = _from_pretrained(AutoProcessor, path, "processor", hint)
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise RetainError(f"model directory {path} has no image processor; {hint}")
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def load_image_text_model(path: str, **options: Any) -> tuple[nn.Module, Any]:
    """(model, processor) from a local image-text model folder, offline (load_model checks the folder's
    weights first); `options` go to from_pretrained (dtype, default float32; attn_implementation; ...)."""
    processor = load_processor(path)
    options = {"dtype": torch.float32, **options}
    model = _from_pretrained(AutoModelForImageTextToText, path, "model", **options)
    return model, processor


def _from_pretrained(loader, path: str, what: str, hint: str = "", **kwargs):
    """`loader.from_pretrained(path)` offline, a broken or incomplete folder reported as a user error
    (as retain.models.loading does for text models)."""
    try:
        return loader.from_pretrained(path, local_files_only=True, **kwargs)
    except ImportError as exc:
        # transformers builds every part the processor declares: Qwen2-VL's includes a video processor,
        # which needs torchvision even for image data.
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__).strip()
        raise RetainError(
            f"model directory {path}: its {what} needs a package that is not installed ({first}); install "
            "it (pip install torchvision for the Qwen2-VL family's video processor)"
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = f"model directory {path}: cannot load its {what} ({first})"
        raise RetainError(f"{message}; {hint}" if hint else message) from None


@dataclass(frozen=True)
class VLMParts:
    """Module paths (as in `model.named_modules()`) of an image-text model's parts."""

    language_model: str
    vision_tower: str
    projector: str  # inside the vision tower for Qwen2-VL (visual.merger)
    layers: str  # the language model's decoder layers (an nn.ModuleList)

    def owns(self, name: str, part: str) -> bool:
        """Whether the module or parameter `name` lies in `part` (language_model, vision_tower, projector)."""
        prefix = getattr(self, part)
        return name == prefix or name.startswith(prefix + ".")


def _find(modules: dict[str, nn.Module], attributes: tuple[str, ...]) -> str | None:
    """The shallowest module whose own attribute name is one of `attributes` (first listed wins)."""
    for attribute in attributes:
        found = [name for name in modules if name.rsplit(".", 1)[-1] == attribute]
        if found:
            return min(found, key=lambda n: n.count("."))
    return None


def vlm_parts(model: nn.Module) -> VLMParts:
    """Where the language model, its decoder layers, the vision tower and the projector sit in `model`
    (an unwrapped transformers image-text model)."""
    modules = dict(model.named_modules())
    language = _find(modules, _LANGUAGE_MODEL)
    vision = _find(modules, _VISION_TOWER)
    if language is None or vision is None:
        raise RetainError(
            f"cannot find the language model and vision tower of {type(model).__name__} "
            f"(looked for modules named {', '.join(_LANGUAGE_MODEL + _VISION_TOWER)})"
        )
    projector = _find(modules, _PROJECTOR)
    if projector is None:
        raise RetainError(
            f"cannot find the multimodal projector of {type(model).__name__} "
            f"(looked for modules named {', '.join(_PROJECTOR)})"
        )
    lists = [n for n, m in modules.items() if n.startswith(language + ".") and isinstance(m, nn.ModuleList)]
    layers = f"{language}.layers" if f"{language}.layers" in lists else next(iter(lists), None)
    if layers is None:
        raise RetainError(f"cannot find the decoder layers of {type(model).__name__}'s language model")
    return VLMParts(language_model=language, vision_tower=vision, projector=projector, layers=layers)


def language_linear_names(model: nn.Module, parts: VLMParts, layers: list[int] | None = None) -> list[str]:
    """Full names of the language model's nn.Linear modules (those of `layers` only, when given)."""
    prefixes = None if layers is None else tuple(f"{parts.layers}.{i}." for i in layers)
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and parts.owns(name, "language_model")
        and not parts.owns(name, "vision_tower")
        and not parts.owns(name, "projector")
        and (prefixes is None or name.startswith(prefixes))
    )


def part_parameters(model: nn.Module, parts: VLMParts, part: str) -> dict[str, nn.Parameter]:
    """Name -> parameter of one part (language_model, vision_tower, projector) of the unwrapped model."""
    return {name: p for name, p in model.named_parameters() if parts.owns(name, part)}
