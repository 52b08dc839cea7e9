"""LLaMA-Factory and EasyCL configs read as they are: every key of theirs maps onto a retain setting, is
accepted because it changes nothing here, or is refused with its reason.

Five tables hold the mapping, one entry per key: `ALIASES` (flat names -> retain settings), `IGNORED`
(accepted, change nothing), `REFUSED` (would change results, unsupported), `SWITCHES` (EasyCL's
`use_<method>: true`) and `METHOD_PARAMS` (EasyCL's method settings -> the method's params).
`translate` applies them to the top level of a raw config; `mapping_table_markdown` writes them as the
doc docs/llamafactory_easycl.md (tests/test_config_compat.py checks that the doc is current).

`dataset: a,b,c` is the stream, in order (EasyCL's reading; LLaMA-Factory mixes the datasets into one
training set, which a continual stream never does); `resolve_test_sets` picks each task's `<name>_test`
entry of dataset_info.json as its test set. This module reads that JSON file itself: the config layer
must not import retain.data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from retain.errors import RetainError, did_you_mean

DATASET_INFO = "dataset_info.json"
LLAMAFACTORY_DATASET_DIR = "data"  # LLaMA-Factory's default dataset_dir
SUGGEST_CUTOFF = 0.7  # difflib ratio; at 0.5, `use_dora` and `deepspeed` both "look like" `seed`
LLAMAFACTORY = "LLaMA-Factory"
EASYCL = "EasyCL"


class Refuse(Exception):
    """Raised by a value conversion: this value would change results and retain cannot honour it."""


IGNORE = object()  # a conversion's result for a value that changes nothing (e.g. fp16: false)


@dataclass(frozen=True)
class Alias:
    """A key with a retain equivalent: its value (converted when `convert` is set) goes to `target`."""

    key: str
    target: str
    source: str = LLAMAFACTORY
    note: str = ""
    convert: Callable[[Any], Any] | None = None
    # Log `note` when the key is used (the mapping is not one to one and the user should know).
    tell: bool = False


@dataclass(frozen=True)
class Ignored:
    """A key that changes nothing for retain; `keep` (when set) says which values, others are refused."""

    key: str
    reason: str
    source: str = LLAMAFACTORY
    keep: Callable[[Any], bool] | None = None
    refusal: str = ""


@dataclass(frozen=True)
class Refused:
    """A key that would change results and has no retain equivalent."""

    key: str
    reason: str
    source: str = LLAMAFACTORY


@dataclass(frozen=True)
class Switch:
    """EasyCL's `use_<x>: true`: run retain's method `method`."""

    key: str
    method: str
    note: str = ""


@dataclass(frozen=True)
class MethodParam:
    """An EasyCL method setting: -> `method.<param>` of retain's `method`, or refused (`param` empty).

    `easycl_default` is EasyCL's default, applied when a switch selects the method and the file leaves the
    key out, so the file means what it meant under EasyCL (retain's own defaults can differ).
    """

    key: str
    method: str
    param: str = ""
    easycl_default: Any = None
    note: str = ""
    convert: Callable[[Any], dict[str, Any]] | None = None

    def params(self, value: Any) -> dict[str, Any]:
        return self.convert(value) if self.convert else {self.param: value}


def _is_true(value: Any) -> bool:
    return value is True


def _is_false(value: Any) -> bool:
    return value in (False, None)


def _fp16(value: Any) -> Any:
    return "auto" if value is True else IGNORE


def _not(value: Any) -> Any:
    if not isinstance(value, bool):
        raise Refuse(f"must be true or false, got {value!r}")
    return not value


_FLASH_ATTN = {"auto": "", "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}


def _flash_attn(value: Any) -> str:
    text = str(value).lower()
    if text not in _FLASH_ATTN:
        raise Refuse(
            f"{value!r} has no transformers equivalent retain can load (fa3 needs kernels transformers "
            f"does not ship); use one of {', '.join(_FLASH_ATTN)}"
        )
    return _FLASH_ATTN[text]


def _names(value: Any) -> str:
    """A list or a comma-separated string, as a comma-separated string."""
    return ",".join(map(str, value)) if isinstance(value, list) else value


def _lwf_alpha(value: Any) -> dict[str, Any]:
    # EasyCL: (1 - a) * CE + a * KD; retain: CE + a' * KD. Same direction with a' = a / (1 - a); the
    # remaining factor (1 - a) only scales the loss, which Adam's update ignores.
    alpha = float(value)
    if not 0 <= alpha < 1:
        raise Refuse(f"must be in [0, 1) (EasyCL mixes (1 - a) * CE + a * KD), got {value!r}")
    return {"lwf_alpha": alpha / (1 - alpha)}


def _fsdp(value: Any) -> str:
    """TrainingArguments' fsdp: a space-separated string, or a list of its options."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value or "")


def _file_path(value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise Refuse("give the path of a JSON or YAML file (an inline mapping is not read)")
    return value


def _replay_ratio(value: Any) -> dict[str, Any]:
    # EasyCL keeps replay_ratio of each earlier task's data; memory_size 0 makes retain use memory_ratio.
    return {"memory_ratio": float(value), "memory_size": 0}


# Flat names -> retain settings. LLaMA-Factory's names (and HF TrainingArguments'), EasyCL's evaluation
# `batch_size`, and retain's own flat shorthands.
ALIASES: list[Alias] = [
    Alias("model_name_or_path", "model.name_or_path"),
    Alias("adapter_name_or_path", "model.adapter_name_or_path"),
    Alias("trust_remote_code", "model.trust_remote_code"),
    Alias("finetuning_type", "model.finetuning_type", note="lora or full (freeze, oft: not supported)"),
    Alias("lora_rank", "model.lora_rank"),
    Alias(
        "lora_alpha",
        "model.lora_alpha",
        note="LLaMA-Factory's default is 2 x lora_rank, retain's 16 (the same at rank 8)",
    ),
    Alias("lora_dropout", "model.lora_dropout"),
    Alias("lora_target", "model.lora_target", note="all means all-linear", convert=_names),
    Alias("lora_layers", "model.lora_layers", source="retain"),
    Alias("use_dora", "model.use_dora"),
    Alias("use_rslora", "model.use_rslora"),
    Alias("template", "model.template", note="retain renders prompts with the model's own chat template"),
    Alias(
        "flash_attn",
        "model.attn_implementation",
        note=", ".join(f"{k} -> {v or 'default'}" for k, v in _FLASH_ATTN.items()),
        convert=_flash_attn,
    ),
    Alias("freeze_vision_tower", "model.freeze_vision_tower"),
    Alias(
        "freeze_multi_modal_projector",
        "model.train_projector",
        note="negated: false trains the projector",
        convert=_not,
    ),
    Alias("cutoff_len", "train.cutoff_len"),
    Alias("per_device_train_batch_size", "train.per_device_train_batch_size"),
    Alias("gradient_accumulation_steps", "train.gradient_accumulation_steps"),
    Alias("global_batch_size", "train.global_batch_size", source="retain"),
    Alias("learning_rate", "train.learning_rate"),
    Alias("num_train_epochs", "train.num_train_epochs", note="per task"),
    Alias("max_steps", "train.max_steps", note="per task"),
    Alias("lr_scheduler_type", "train.lr_scheduler_type", note="restarts at every task"),
    Alias("warmup_ratio", "train.warmup_ratio"),
    Alias("warmup_steps", "train.warmup_steps"),
    Alias("weight_decay", "train.weight_decay"),
    Alias("max_grad_norm", "train.max_grad_norm"),
    Alias("logging_steps", "train.logging_steps"),
    Alias("optim", "train.optim"),
    Alias("gradient_checkpointing", "train.gradient_checkpointing", note="HF TrainingArguments' name"),
    Alias(
        "disable_gradient_checkpointing",
        "train.gradient_checkpointing",
        note="negated (LLaMA-Factory checkpoints by default, retain does not: same results, more memory)",
        convert=_not,
    ),
    Alias(
        "bf16",
        "train.bf16",
        note="bf16 autocast; the weights load in model.dtype (LLaMA-Factory: the checkpoint's dtype; "
        "set model.dtype: auto for the same memory)",
    ),
    Alias(
        "fp16",
        "train.bf16",
        note="true -> auto: retain does not train under fp16 autocast (it needs loss scaling); it uses bf16 "
        "where the hardware has it, else fp32; false changes nothing",
        convert=_fp16,
        tell=True,
    ),
    Alias(
        "deepspeed",
        "train.deepspeed",
        note="a DeepSpeed JSON config; the method must support its ZeRO stage (docs/compatibility.md)",
    ),
    Alias("fsdp", "train.fsdp", note="TrainingArguments' fsdp options (a list is joined)", convert=_fsdp),
    Alias("fsdp_config", "train.fsdp_config", note="a file path (not an inline mapping)", convert=_file_path),
    Alias("report_to", "train.report_to", note="none, tensorboard, wandb, mlflow", convert=_names),
    Alias("per_device_eval_batch_size", "eval.batch_size", note="generation batch of the evaluation"),
    Alias("batch_size", "eval.batch_size", source=EASYCL, note="EasyCL's evaluation config"),
    Alias("max_new_tokens", "eval.max_new_tokens"),
    Alias("max_samples", "stream.train_size", note="training examples per task (a seeded random subset)"),
    Alias("dataset_dir", "stream.dataset_dir", note="LLaMA-Factory's default data applies with dataset:"),
    Alias("default_system", "stream.system"),
    Alias("image_dir", "stream.image_dir", source="retain"),
    Alias("tasks", "stream.tasks", source="retain"),
    Alias("train_size", "stream.train_size", source="retain"),
    Alias("test_size", "stream.test_size", source="retain"),
    Alias("benchmark", "stream.benchmark", source="retain"),
    Alias("benchmark_order", "stream.benchmark_order", source="retain"),
    Alias("benchmark_dir", "stream.benchmark_dir", source="retain"),
    Alias("max_tasks", "stream.max_tasks", source="retain"),
    Alias("allow_missing", "stream.allow_missing", source="retain"),
]

_SAVING = "retain saves each task's adapter (or model) at the end of the task in the run directory"
_EVALUATION = "retain scores every task's test set after each task; there is no validation loss"
_WORKFLOW = "EasyCL's workflow sets it per task; retain passes earlier tasks' models and data itself"
_PATHS = "a storage path; retain keeps the method's state in the run directory"
_SPEED = "speed and memory only"

IGNORED: list[Ignored] = [
    Ignored(
        "stage",
        "sft is what retain trains",
        keep=lambda v: v == "sft",
        refusal="retain trains supervised fine-tuning (stage: sft) only; pt, rm, ppo, dpo, kto: unsupported",
    ),
    Ignored(
        "do_train",
        "retain run always trains",
        keep=_is_true,
        refusal="retain run always trains; to score a finished run's checkpoints use retain eval RUN_DIR",
    ),
    Ignored("do_eval", _EVALUATION),
    Ignored("do_predict", "retain generates and scores each task's test set after each task"),
    Ignored("predict_with_generate", "retain generates the answers it scores"),
    Ignored("eval_strategy", _EVALUATION),
    Ignored("evaluation_strategy", _EVALUATION),
    Ignored("eval_steps", _EVALUATION),
    Ignored("overwrite_cache", "retain caches no tokenized data"),
    Ignored("tokenized_path", "retain caches no tokenized data"),
    Ignored(
        "overwrite_output_dir",
        "retain resumes an unfinished run in its output_dir and refuses a different config there; "
        "delete the folder to start over",
    ),
    Ignored("preprocessing_num_workers", _SPEED),
    Ignored("dataloader_num_workers", _SPEED),
    Ignored("ddp_timeout", "process-group timeout"),
    Ignored("save_steps", _SAVING),
    Ignored("save_strategy", _SAVING),
    Ignored("save_total_limit", _SAVING),
    Ignored("save_only_model", _SAVING),
    Ignored("plot_loss", "retain writes the losses to train_log.json (and to report_to trackers)"),
    Ignored(
        "resume_from_checkpoint",
        "null: nothing to resume",
        keep=_is_false,
        refusal="retain resumes by running the same command again (it continues after the last completed "
        "task); remove the key",
    ),
    Ignored("use_fast_tokenizer", "the tokenizer's own choice"),
    Ignored("low_cpu_mem_usage", _SPEED),
    Ignored("enable_liger_kernel", _SPEED + "; retain uses transformers' kernels"),
    Ignored("use_reentrant_gc", _SPEED),
    Ignored("cache_dir", "retain reads the local Hugging Face cache (offline)"),
    Ignored("mix_strategy", "the datasets are a stream, trained one after another, never mixed"),
    Ignored("interleave_probs", "the datasets are a stream, trained one after another, never mixed"),
    Ignored(
        "streaming",
        "false: retain reads datasets whole",
        keep=_is_false,
        refusal="streaming datasets are not supported",
    ),
    Ignored("packing", "false: one example per row", keep=_is_false, refusal="packing is not supported"),
    Ignored("neat_packing", "false: one example per row", keep=_is_false, refusal="packing is not supported"),
    Ignored("do_sample", "false: retain decodes greedily", keep=_is_false, refusal="retain decodes greedily"),
    Ignored("infer_backend", "retain generates with transformers"),
    Ignored(
        "save_dir", "EasyCL's evaluation output; retain writes results.json in the run directory", EASYCL
    ),
    Ignored("cl_tuning_type", "EasyCL's evaluation: lora or full_model; retain knows from the run", EASYCL),
    Ignored(
        "eval_mode",
        "single: one model per row, as retain evaluates",
        EASYCL,
        keep=lambda v: v == "single",
        refusal="multi_adapter evaluation belongs to the methods that route (conpet, abscl): select one",
    ),
    Ignored("calculate_cl_metrics", "retain always computes the CL metrics", EASYCL),
    Ignored("previous_task_model", _WORKFLOW, EASYCL),
    Ignored("previous_task_data", _WORKFLOW, EASYCL),
    Ignored("previous_task_dataset", _WORKFLOW, EASYCL),
    Ignored("current_task_id", _WORKFLOW, EASYCL),
    Ignored("prev_task_id", _WORKFLOW, EASYCL),
    Ignored("adapters_save_path", _PATHS, EASYCL),
    Ignored("olora_history_path", _PATHS, EASYCL),
    Ignored("abscl_stats_path", _PATHS, EASYCL),
    Ignored("pseudo_samples_dir", _PATHS, EASYCL),
    Ignored("lamol_samples_dir", _PATHS, EASYCL),
    Ignored("ema_adapter_path", _PATHS, EASYCL),
    Ignored(
        "save_ema_adapter",
        "retain keeps I-LoRA's EMA adapter (the one it scores) in every checkpoint",
        EASYCL,
    ),
    Ignored("cl_buffer_size", "declared by EasyCL but read by none of its methods", EASYCL),
    Ignored("selective_update", "declared by EasyCL's I-LoRA but not used by its loss", EASYCL),
    Ignored("min_update_threshold", "declared by EasyCL's I-LoRA but not used by its loss", EASYCL),
    Ignored(
        "lamol_show_gen",
        "false: no prefix on generated samples",
        EASYCL,
        keep=_is_false,
        refusal="retain does not prefix LAMOL's generated samples with 'This is a generated sample.'",
    ),
]

_NOT_YET = "not supported"
REFUSED: list[Refused] = [
    Refused(
        "val_size",
        "LLaMA-Factory splits val_size off the training data for a validation loss; retain has none and "
        "scores each task's test set instead (eval_dataset:, <name>_test entries, or a held-out part of "
        "the training data when neither exists); remove the key",
    ),
    Refused("pissa_init", "PiSSA initialisation is " + _NOT_YET),
    Refused("pissa_iter", "PiSSA initialisation is " + _NOT_YET),
    Refused("pissa_convert", "PiSSA initialisation is " + _NOT_YET),
    Refused("loraplus_lr_ratio", "LoRA+ learning rates are " + _NOT_YET),
    Refused("use_unsloth", "Unsloth kernels are " + _NOT_YET),
    Refused("use_galore", "GaLore is " + _NOT_YET),
    Refused("use_badam", "BAdam is " + _NOT_YET),
    Refused("use_apollo", "APOLLO is " + _NOT_YET),
    Refused("use_llama_pro", "LLaMA Pro block expansion is " + _NOT_YET),
    Refused("pure_bf16", "pure bf16 training (no fp32 master weights) is " + _NOT_YET + "; use model.dtype"),
    Refused("upcast_layernorm", _NOT_YET),
    Refused("additional_target", "training extra modules next to LoRA is " + _NOT_YET),
    Refused("create_new_adapter", "retain continues the adapter of adapter_name_or_path"),
    Refused("rope_scaling", "RoPE scaling is " + _NOT_YET),
    Refused("neftune_noise_alpha", "NEFTune noise is " + _NOT_YET),
    Refused("image_max_pixels", "retain uses the processor's own image size"),
    Refused("image_min_pixels", "retain uses the processor's own image size"),
    Refused("video_max_pixels", "video inputs are " + _NOT_YET),
    Refused("train_mm_proj_only", "use model.train_projector and freeze_vision_tower"),
    Refused("temperature", "retain decodes greedily"),
    Refused("top_p", "retain decodes greedily"),
    Refused("n_shot", "retain evaluates zero-shot", EASYCL),
    Refused(
        "cl_tasks",
        "an EasyCL evaluation config: retain run trains and evaluates in one go; give the task list as "
        "dataset: in the training config",
        EASYCL,
    ),
    Refused(
        "replay_task_list",
        "retain replays every earlier task; EasyCL's workflow fills it the same way, so remove the key",
        EASYCL,
    ),
    Refused("maxsamples_list", "use method.memory_size (examples kept per task)", EASYCL),
]

# Families of keys, by prefix (`galore_*`): refused with the family's reason.
REFUSED_PREFIXES: list[Refused] = [
    Refused("galore_", "GaLore is " + _NOT_YET),
    Refused("badam_", "BAdam is " + _NOT_YET),
    Refused("apollo_", "APOLLO is " + _NOT_YET),
    Refused("pref_", "preference training (DPO, ORPO, SimPO) is " + _NOT_YET + "; retain trains stage: sft"),
    Refused("kto_", "KTO is " + _NOT_YET + "; retain trains stage: sft"),
    Refused("ppo_", "PPO is " + _NOT_YET + "; retain trains stage: sft (GRPO-style RFT: method rft)"),
    Refused("quantization_", "quantized (QLoRA) training is " + _NOT_YET),
    Refused("freeze_", "freeze tuning is " + _NOT_YET + "; use finetuning_type lora or full"),
]

SWITCHES: list[Switch] = [
    Switch("use_ewc", "ewc"),
    Switch("use_lwf", "lwf"),
    Switch("use_replay", "replay"),
    Switch("use_olora", "olora"),
    Switch("use_lamol", "lamol"),
    Switch("use_gem", "gem"),
    Switch(
        "use_moe", "moelora", "retain's MoE-LoRA routes tokens (CoIN); EasyCL's gate reads a task embedding"
    ),
    Switch("use_cl_moe", "clmoe"),
    Switch("use_dynamic_conpet", "conpet", "the task selector trains after each task, not jointly"),
    Switch("use_ssr", "ssr"),
    Switch("use_abscl", "abscl"),
    Switch("use_pseudo_replay", "pseudo_replay"),
    Switch("use_ilora", "ilora"),
]

_NO_TASK_EMBEDDING = (
    "retain's {0} routes each token by its hidden state (CoIN); there is no task embedding; remove the key"
)
_SAME_BASE = "retain generates with the model being trained, its adapters disabled (the same base model)"

METHOD_PARAMS: list[MethodParam] = [
    MethodParam(
        "ewc_lambda", "ewc", "ewc_lambda", 10000, "both penalise lambda/2 * sum F (theta - theta*)^2"
    ),
    MethodParam("ewc_num_samples", "ewc", "fisher_samples", 100),
    MethodParam("lwf_temperature", "lwf", "temperature", 2.0),
    MethodParam(
        "lwf_alpha",
        "lwf",
        "lwf_alpha",
        0.5,
        "EasyCL's a -> a / (1 - a): EasyCL mixes (1 - a) * CE + a * KD, retain adds a' * KD to CE",
        _lwf_alpha,
    ),
    MethodParam(
        "replay_ratio",
        "replay",
        "memory_ratio",
        0.3,
        "-> memory_ratio (the fraction of each earlier task kept; memory_size set to 0); EasyCL replays all "
        "of it each task, retain draws method.replay_ratio (default 0.2) of each training set from it",
        _replay_ratio,
    ),
    MethodParam(
        "replay_ratio",
        "ilora",
        note="retain's I-LoRA replays from a buffer of method.buffer_size examples; use that",
    ),
    MethodParam(
        "replay_ratio",
        "abscl",
        note="retain's ABSCL keeps method.memory_size examples per domain; use that",
    ),
    MethodParam("orthogonal_lambda", "olora", "lamda_1", 0.1),
    MethodParam("l2_lambda", "olora", "lamda_2", 0.01),
    MethodParam("gem_memory_strength", "gem", "memory_strength", 0.5),
    MethodParam("expert_num", "moelora", "num_experts", 4),
    MethodParam("expert_num", "clmoe", "num_experts", 4),
    MethodParam("task_embedding_dim", "moelora", note=_NO_TASK_EMBEDDING.format("moelora")),
    MethodParam("task_embedding_dim", "clmoe", note=_NO_TASK_EMBEDDING.format("clmoe")),
    MethodParam("top_k_experts", "clmoe", "task_top_k", 2, "experts per layer of a task's statistics"),
    MethodParam("router_type", "moelora", note="retain's router is a dense softmax gate (method.top_k)"),
    MethodParam(
        "classification_loss_weight",
        "conpet",
        note="retain trains ConPET's task selector on its own after each task (method.selector_steps, "
        "selector_lr), so there is no joint classification loss to weight",
    ),
    MethodParam("num_shots", "ssr", "num_shots", 2),
    MethodParam("n_clusters", "ssr", "n_clusters", 20),
    MethodParam("pseudo_sample_memory", "ssr", "memory_per_task", 200),
    MethodParam("generation_temperature", "ssr", "temperature", 0.9),
    MethodParam("num_shots", "pseudo_replay", "num_shots", 5),
    MethodParam("num_samples_per_task", "pseudo_replay", "memory_per_task", 200),
    MethodParam("generation_temperature", "pseudo_replay", "temperature", 1.0),
    MethodParam("lamol_generation_temperature", "lamol", "temperature", 1.0),
    MethodParam(
        "lamol_num_samples_per_task",
        "lamol",
        note="retain makes method.gen_ratio x |D_t| pseudo samples (LAMOL's gamma), spread over the earlier "
        "tasks; set gen_ratio (and memory_per_task, the cap per task) instead",
    ),
    MethodParam("ema_alpha", "ilora", "ema_alpha", 0.25),
    MethodParam("consistency_weight", "ilora", "consistency_weight", 1.0),
    MethodParam(
        "hidden_state_layers",
        "ilora",
        note="retain's consistency loss averages over every layer (the paper's); no layer subset",
    ),
    MethodParam("abscl_orthogonal_lambda", "abscl", "orthogonal_lambda", 0.1),
    MethodParam("abscl_shared_l2_lambda", "abscl", "shared_l2_lambda", 0.01),
]

# base_model_path: the model SSR / pseudo replay generate with. Only the trained model's own base is possible.
BASE_MODEL_KEY = "base_model_path"
BASE_MODEL_METHODS = {"ssr": {}, "pseudo_replay": {"generator": "base"}}
DATASET_KEYS = ("dataset", "eval_dataset")

_ALIAS = {a.key: a for a in ALIASES}
_IGNORED = {i.key: i for i in IGNORED}
_REFUSED = {r.key: r for r in REFUSED}
_SWITCH = {s.key: s for s in SWITCHES}
_PARAMS: dict[str, list[MethodParam]] = {}
for _entry in METHOD_PARAMS:
    _PARAMS.setdefault(_entry.key, []).append(_entry)

# Flat names that map one to one (used for `key=value` overrides on the command line too).
FLAT_ALIASES: dict[str, str] = {a.key: a.target for a in ALIASES if a.convert is None}


def known_keys() -> list[str]:
    """Every key this module knows at the top level of a config."""
    return sorted({*_ALIAS, *_IGNORED, *_REFUSED, *_SWITCH, *_PARAMS, BASE_MODEL_KEY, *DATASET_KEYS})


def suggest(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean: a, b?)' for close choices only, or ''."""
    return did_you_mean(word, choices, n=n, cutoff=SUGGEST_CUTOFF)


def aliases_of(target: str) -> list[str]:
    """The flat names that set retain setting `target` (e.g. train.learning_rate -> [learning_rate]); a
    name whose value is converted carries its note."""
    return [f"{a.key} ({a.note})" if a.convert else a.key for a in ALIASES if a.target == target]


@dataclass
class Translation:
    """A raw config's top level, with every foreign key mapped, accepted or refused."""

    entries: dict[str, Any] = field(default_factory=dict)  # dotted retain settings and untouched keys
    ignored: list[str] = field(default_factory=list)  # keys accepted that change nothing
    refused: list[str] = field(default_factory=list)  # "key: reason" for each refused key
    notes: list[str] = field(default_factory=list)  # mappings the user should hear about
    dataset_tasks: list[str] = field(default_factory=list)  # tasks of `dataset:` without an eval_dataset

    def extend(self, other: Translation) -> None:
        self.ignored += other.ignored
        self.refused += other.refused
        self.notes += other.notes
        self.dataset_tasks += other.dataset_tasks


def _split_names(value: Any, key: str, found: Translation) -> list[str] | None:
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",") if n.strip()]
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        names = [n.strip() for n in value]
    else:
        names = []
    if not names:
        found.refused.append(f"{key}: expected dataset names, comma-separated (a,b,c), got {value!r}")
        return None
    return names


def _method_section_name(raw: dict) -> str:
    method = raw.get("method")
    if isinstance(method, str):
        return method
    if isinstance(method, dict) and isinstance(method.get("name"), str):
        return method["name"]
    return ""


def _select_method(raw: dict, found: Translation) -> tuple[str, bool]:
    """The method the config selects, and whether an EasyCL switch selected it."""
    on = []
    for key, switch in _SWITCH.items():
        if key not in raw:
            continue
        if raw[key] is True:
            on.append(switch)
        elif raw[key] in (False, None):
            found.ignored.append(key)
        else:
            found.refused.append(f"{key}: must be true or false, got {raw[key]!r}")
    named = _method_section_name(raw)
    if len(on) > 1:
        keys = ", ".join(s.key for s in on)
        found.refused.append(
            f"{keys}: EasyCL runs one method per task; retain combines methods explicitly, e.g. "
            f"method: {{name: {on[0].method}, plus: [{', '.join(s.method for s in on[1:])}]}}"
        )
        return named, False
    if on:
        if named and named != on[0].method:
            found.refused.append(f"{on[0].key}: selects {on[0].method} but method.name is {named}; keep one")
            return named, False
        if on[0].note:
            found.notes.append(f"{on[0].key}: runs retain's {on[0].method} ({on[0].note})")
        return on[0].method, True
    return named, False


def _method_params(raw: dict, method: str, by_switch: bool, found: Translation) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if by_switch:  # EasyCL's defaults first: the file's own values override them below
        for entry in METHOD_PARAMS:
            if entry.method == method and entry.param and entry.key not in raw:
                params.update(entry.params(entry.easycl_default))
    for key, entries in _PARAMS.items():
        if key not in raw:
            continue
        entry = next((e for e in entries if e.method == method), None)
        if entry is None:
            found.ignored.append(key)  # another method's setting: EasyCL ignores it too
        elif not entry.param:
            found.refused.append(f"{key}: {entry.note}")
        else:
            try:
                params.update(entry.params(raw[key]))
            except (Refuse, TypeError, ValueError) as exc:
                found.refused.append(f"{key}: {exc}")
    if BASE_MODEL_KEY in raw:
        base, model = raw[BASE_MODEL_KEY], raw.get("model_name_or_path")
        if method not in BASE_MODEL_METHODS:
            found.ignored.append(BASE_MODEL_KEY)
        elif base != model:
            found.refused.append(
                f"{BASE_MODEL_KEY}: {_SAME_BASE}; it must equal model_name_or_path ({model})"
            )
        else:
            params.update(BASE_MODEL_METHODS[method])
    return params


def _datasets(raw: dict, found: Translation) -> None:
    """`dataset: a,b,c` (+ `eval_dataset`) -> stream.tasks, test sets named or looked up later."""
    if "dataset" not in raw:
        if "eval_dataset" in raw:
            found.refused.append("eval_dataset: only with dataset: (the test set of each of its datasets)")
        return
    names = _split_names(raw["dataset"], "dataset", found)
    if names is None:
        return
    stream = raw.get("stream")
    if "tasks" in raw or (isinstance(stream, dict) and "tasks" in stream):
        found.refused.append("dataset: stream.tasks also lists the tasks; keep one of the two")
        return
    tests: list[str] = [""] * len(names)
    if "eval_dataset" in raw:
        given = _split_names(raw["eval_dataset"], "eval_dataset", found)
        if given is None:
            return
        if len(given) != len(names):
            found.refused.append(
                f"eval_dataset: {len(given)} test set(s) for {len(names)} dataset(s); give one per dataset, "
                "in the same order"
            )
            return
        tests = given
    found.entries["stream.tasks"] = [
        {"name": n, "train": n, "test": t} for n, t in zip(names, tests, strict=True)
    ]
    found.dataset_tasks += [n for n, t in zip(names, tests, strict=True) if not t]
    has_dir = "dataset_dir" in raw or (isinstance(stream, dict) and "dataset_dir" in stream)
    if not has_dir:
        found.entries["stream.dataset_dir"] = LLAMAFACTORY_DATASET_DIR


def _alias(alias: Alias, value: Any, found: Translation) -> None:
    if alias.convert is not None:
        try:
            value = alias.convert(value)
        except Refuse as exc:
            found.refused.append(f"{alias.key}: {exc}")
            return
        if value is IGNORE:
            found.ignored.append(alias.key)
            return
    if alias.tell:
        found.notes.append(f"{alias.key}: {alias.note}")
    found.entries[alias.target] = value


def translate(raw: dict) -> Translation:
    """Map the top-level keys of `raw` that LLaMA-Factory, EasyCL or retain's flat names use.

    Keys no table knows pass through unchanged in `entries` (retain's own sections, or unknown keys that
    the config reader reports with suggestions).
    """
    found = Translation()
    method, by_switch = _select_method(raw, found)
    params = _method_params(raw, method, by_switch, found)
    if by_switch:
        found.entries["method.name"] = method
    for name, value in params.items():
        found.entries[f"method.params.{name}"] = value
    _datasets(raw, found)
    for key, value in raw.items():
        if key in _SWITCH or key in _PARAMS or key in DATASET_KEYS or key == BASE_MODEL_KEY:
            continue  # handled above
        if key in _ALIAS:
            _alias(_ALIAS[key], value, found)
        elif key in _IGNORED:
            entry = _IGNORED[key]
            if entry.keep is None or entry.keep(value):
                found.ignored.append(key)
            else:
                found.refused.append(f"{key}: {entry.refusal} (got {value!r})")
        elif key in _REFUSED:
            found.refused.append(f"{key}: {_REFUSED[key].reason}")
        elif family := next((r for r in REFUSED_PREFIXES if str(key).startswith(r.key)), None):
            found.refused.append(f"{key}: {family.reason}")
        else:
            found.entries[key] = value
    return found


def resolve_test_sets(tasks: list[Any], names: list[str], dataset_dir: str) -> tuple[list[str], str]:
    """Give each task of `dataset:` in `names` (no test set yet) its `<name>_test` dataset_info entry.

    Returns the names that have none (they fall back to a held-out part of their training data) and the
    dataset_info.json path looked at.
    """
    path = os.path.join(dataset_dir or ".", DATASET_INFO)
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except (OSError, ValueError):
        info = {}  # the data loader reports a missing or broken file with its own clear message
    entries = info if isinstance(info, dict) else {}
    missing = []
    for task in tasks:
        if task.train not in names or task.test:
            continue
        if f"{task.train}_test" in entries:
            task.test = f"{task.train}_test"
        else:
            missing.append(task.name)
    return missing, path


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("<", "\\<").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def mapping_table_markdown() -> str:
    """docs/llamafactory_easycl.md: every table of this module as markdown."""
    lines = [
        "# LLaMA-Factory and EasyCL configs in retain",
        "",
        "<!-- Generated by retain.config_compat.mapping_table_markdown(); edit the tables in "
        "src/retain/config_compat.py, then regenerate:",
        "python -c 'from retain.config_compat import mapping_table_markdown as m; "
        'open("docs/llamafactory_easycl.md", "w").write(m())\' -->',
        "",
        "`retain run file.yaml` reads LLaMA-Factory and EasyCL training configs as they are. "
        "Each key maps onto a retain setting, is accepted because it changes nothing here (listed in one "
        "log line), or is refused: every refused or unknown key is named in one error, with its reason. "
        "`retain config [SECTION]` lists retain's own settings with these names beside them.",
        "",
        "## The task list",
        "",
        "- `dataset: a,b,c` is the stream, trained in that order (EasyCL's reading; LLaMA-Factory would mix "
        "the datasets into one training set, which a continual stream never does).",
        "- Each task's test set: the matching name of `eval_dataset: x,y,z` (one per dataset, same order); "
        "otherwise the `<name>_test` entry of `dataset_dir`'s dataset_info.json (EasyCL's convention); "
        "otherwise a held-out part of the training data, with one log line naming those tasks.",
        f"- `dataset_dir` defaults to `{LLAMAFACTORY_DATASET_DIR}` (LLaMA-Factory's default) when `dataset:` "
        "is used.",
        "- `max_samples` caps each task's training examples (a seeded random subset; LLaMA-Factory takes "
        "the first N).",
        "",
        "## Settings with a retain equivalent",
        "",
        *_table(
            ["key", "source", "retain setting", "note"],
            [[f"`{a.key}`", a.source, f"`{a.target}`", a.note] for a in ALIASES],
        ),
        "",
        "## EasyCL method switches",
        "",
        "`use_<method>: true` selects retain's method; the method's EasyCL settings the file leaves out take "
        "EasyCL's defaults (retain's own defaults can differ). Settings of a method that is not selected "
        "change nothing, as in EasyCL.",
        "",
        *_table(
            ["key", "retain method", "note"],
            [[f"`{s.key}: true`", f"`{s.method}`", s.note] for s in SWITCHES],
        ),
        "",
        "## EasyCL method settings",
        "",
        *_table(
            ["key", "method", "retain setting", "EasyCL default", "note"],
            [
                [
                    f"`{p.key}`",
                    f"`{p.method}`",
                    f"`method.{p.param}`" if p.param else "refused",
                    "" if p.easycl_default is None else p.easycl_default,
                    p.note,
                ]
                for p in METHOD_PARAMS
            ]
            + [
                [f"`{BASE_MODEL_KEY}`", f"`{m}`", "must equal model_name_or_path", "", _SAME_BASE]
                for m in BASE_MODEL_METHODS
            ],
        ),
        "",
        "## Accepted, changing nothing",
        "",
        *_table(
            ["key", "source", "why", "refused when"],
            [[f"`{i.key}`", i.source, i.reason, i.refusal if i.keep else ""] for i in IGNORED],
        ),
        "",
        "## Refused",
        "",
        *_table(
            ["key", "source", "why"],
            [[f"`{r.key}`", r.source, r.reason] for r in REFUSED]
            + [[f"`{r.key}*`", r.source, r.reason] for r in REFUSED_PREFIXES],
        ),
        "",
    ]
    return "\n".join(lines)


def problems_error(problems: list[str]) -> RetainError:
    """One error naming every refused or unknown key."""
    if len(problems) == 1:
        return RetainError(f"config: {problems[0]}")
    listed = "\n".join(f"  - {p}" for p in problems)
    return RetainError(
        f"config: {len(problems)} keys retain cannot use (fix them all, then run again):\n{listed}"
    )
