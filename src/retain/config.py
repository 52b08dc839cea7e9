"""The run's configuration: one tree of typed dataclasses, read from YAML, validated with clear errors.

The same tree is the YAML schema, the target of `key=value` overrides on the command line and the
source of the docs. LLaMA-Factory's names for settings are accepted where it has one
(`model_name_or_path`, `lora_rank`, `cutoff_len`, `learning_rate`, ...), at the top level or in
their section.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from retain import config_compat as compat
from retain.config_compat import FLAT_ALIASES
from retain.errors import RetainError, did_you_mean

logger = logging.getLogger(__name__)


# transformers' SchedulerType values (tests/test_config.py checks that the two lists agree); kept here
# so that reading a config does not import transformers.
SchedulerName = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
]
SEED_LIMIT = 2**32  # numpy's seeds are below 2**32; a task's seed is seed + task index
# The trackers train.report_to can name (transformers' integrations of the same names).
TRACKERS = ("tensorboard", "wandb", "mlflow")
# `stream.eval_only: builtin` (or this spec): the built-in general set, which retain.data.general expands.
BUILTIN_GENERAL = "general:builtin"
# The answer styles `stream.answer_styles` can rewrite training answers into (retain/data/answer_styles.py
# implements each one; tests/data/test_answer_styles.py checks that the two lists agree).
ANSWER_STYLES = ("yes_no", "multiple_choice", "sentence")


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default="smollm2-135m",
        metadata={
            "help": "built-in name (smollm2-135m, tiny-random) or a local Hugging Face model directory"
        },
    )
    finetuning_type: Literal["lora", "full"] = field(default="lora", metadata={"help": "lora or full"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input, in [0, 1)"})
    lora_target: str = field(
        default="all-linear",
        metadata={"help": "modules that get LoRA: all-linear or comma-separated names (q_proj,v_proj)"},
    )
    lora_layers: str = field(
        default="all",
        metadata={
            "help": "decoder layers that get LoRA: all, last:N (the top N; the backward pass then stops "
            "below them) or indices such as 0,1,2 (PEFT's layers_to_transform)"
        },
    )
    freeze_vision_tower: bool = field(
        default=True,
        metadata={"help": "image-text models: keep the vision tower's weights fixed (false: train them)"},
    )
    train_projector: bool = field(
        default=False, metadata={"help": "image-text models: train the multimodal projector's own weights"}
    )
    template: str = field(
        default="auto",
        metadata={"help": "chat template: auto uses the model's own; LLaMA-Factory names are accepted"},
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="float32",
        metadata={
            "help": "dtype the weights load in: float32, bfloat16, float16, or auto (bfloat16 where the "
            "hardware supports it, else float32); methods' own state (EMA copies, Fisher) stays float32"
        },
    )
    attn_implementation: str = field(
        default="",
        metadata={"help": "attention kernel: eager, sdpa, flash_attention_2 (empty: transformers' default)"},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "run the model's own Python code from its folder or cache entry (opt-in)"},
    )
    adapter_name_or_path: str = field(
        default="",
        metadata={"help": "a LoRA adapter folder the stream starts from (trained further on task 1)"},
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA (PEFT use_dora)"})
    use_rslora: bool = field(
        default=False, metadata={"help": "rank-stabilised LoRA scaling alpha/sqrt(r) (PEFT use_rslora)"}
    )


@dataclass
class TaskConfig:
    name: str = field(default="", metadata={"help": "task name used in reports"})
    train: str = field(default="", metadata={"help": "dataset_info name, file path, or synthetic:<name>"})
    test: str = field(default="", metadata={"help": "test dataset (defaults to the train spec's test split)"})
    scorer: str = field(default="", metadata={"help": "exact, normalized, contains, choice, rouge_l"})
    train_size: int | None = field(default=None, metadata={"help": "use the first N training examples"})
    test_size: int | None = field(default=None, metadata={"help": "use the first N test examples"})


@dataclass
class StreamConfig:
    dataset_dir: str = field(default="", metadata={"help": "folder holding dataset_info.json"})
    image_dir: str = field(
        default="",
        metadata={
            "help": "folder relative image paths resolve against "
            "(default: the data's own folder; for CoIN, instead of its cl_dataset/)"
        },
    )
    train_size: int | None = field(default=None, metadata={"help": "default training examples per task"})
    test_size: int | None = field(default=None, metadata={"help": "default test examples per task"})
    system: str = field(
        default="",
        metadata={"help": "system prompt for examples without one (empty: the template's default)"},
    )
    tasks: list[TaskConfig] = field(
        default_factory=list,
        metadata={"help": "the tasks in training order; with a benchmark, the names of the tasks to run"},
    )
    eval_only: list[TaskConfig] = field(
        default_factory=list,
        metadata={
            "help": "tasks scored in every row but never trained (general ability), each a task spec as in "
            "tasks (its data is the test set); builtin: the built-in general set"
        },
    )
    benchmark: str = field(
        default="", metadata={"help": "a benchmark (retain benchmarks lists them) instead of a task list"}
    )
    benchmark_order: str = field(default="", metadata={"help": "the benchmark's task order (default: first)"})
    benchmark_dir: str = field(
        default="", metadata={"help": "folder holding the benchmark's files (default: $RETAIN_BENCHMARK_DIR)"}
    )
    max_tasks: int | None = field(default=None, metadata={"help": "run only the first N tasks of the order"})
    allow_missing: bool = field(
        default=False, metadata={"help": "drop benchmark tasks whose files are missing, with a warning"}
    )
    hygiene: bool = field(
        default=True,
        metadata={"help": "check data for dev == test, test in train, duplicates, labels outside the set"},
    )
    # None rather than {} when off: a run directory written before this setting existed resumes (its
    # config.yaml lacks the key, which compares equal to None only).
    answer_styles: dict[str, float] | None = field(
        default=None,
        metadata={
            "help": "answer-style diversification (SEFE's ASD): the fraction of each task's training "
            "examples rewritten into each style, e.g. {multiple_choice: 0.1, yes_no: 0.05, sentence: 0.05}; "
            "styles: " + ", ".join(ANSWER_STYLES) + "; test data is never rewritten (unset: off)"
        },
    )


@dataclass
class MethodConfig:
    name: str = field(default="sequential", metadata={"help": "continual-learning method (retain methods)"})
    params: dict[str, Any] = field(default_factory=dict, metadata={"help": "the method's own settings"})


@dataclass
class TrainConfig:
    learning_rate: float = field(
        default=2e-4, metadata={"help": "peak learning rate of each task's schedule"}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs per task (when max_steps is -1)"})
    max_steps: int = field(
        default=-1,
        metadata={"help": "optimizer steps per task (> 0), or -1 to train num_train_epochs epochs"},
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "examples per micro-batch per process"}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "examples per optimizer step over all processes, kept whatever the process count "
            "(per-device micro-batches and accumulation are derived); unset: per device x processes "
            "x accumulation"
        },
    )
    cutoff_len: int = field(default=256, metadata={"help": "maximum tokens per training example"})
    lr_scheduler_type: SchedulerName = field(
        default="constant", metadata={"help": "a transformers SchedulerType: constant, linear, cosine, ..."}
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "fraction of the steps spent warming up, in [0, 1)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (>= 0)"})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "gradient clipping norm (>= 0; 0 turns clipping off)"}
    )
    bf16: Literal["auto", "true", "false"] = field(
        default="auto", metadata={"help": "auto (on where the CPU/GPU supports it), true, false"}
    )
    logging_steps: int = field(default=10, metadata={"help": "optimizer steps between loss log lines"})
    warmup_steps: int = field(
        default=0, metadata={"help": "optimizer steps spent warming up (overrides warmup_ratio when > 0)"}
    )
    optim: str = field(
        default="adamw_torch",
        metadata={"help": "a transformers optimizer name (adamw_torch, sgd, adafactor, ...)"},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in the backward pass: less memory, ~30% slower"},
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "experiment trackers: none, or tensorboard, wandb, mlflow (comma-separated for several); "
            "one tracker run per stream"
        },
    )
    deepspeed: str | None = field(
        default=None,
        metadata={
            "help": "a DeepSpeed JSON config (ZeRO stage 0-3, offload): train under DeepSpeed, as "
            "LLaMA-Factory's deepspeed key (an alternative to accelerate launch --config_file)"
        },
    )
    fsdp: str = field(
        default="",
        metadata={
            "help": 'FSDP in TrainingArguments\' syntax, e.g. "full_shard auto_wrap" (add offload for CPU '
            "offload); empty: off"
        },
    )
    fsdp_config: str | None = field(
        default=None,
        metadata={"help": "a JSON or YAML file of TrainingArguments' fsdp_config (with train.fsdp)"},
    )


@dataclass
class EvalConfig:
    max_new_tokens: int = field(default=32, metadata={"help": "longest generated answer, in tokens"})
    batch_size: int = field(default=32, metadata={"help": "prompts per generation (or ranking) batch"})
    before_training: bool = field(
        default=True, metadata={"help": "evaluate the untrained model (row 0, FWT)"}
    )
    mode: Literal["generate", "rank"] = field(
        default="generate",
        metadata={
            "help": "generate: greedy answers, scored by the task's scorer; rank: for tasks with a label "
            "set, pick the label with the highest log-likelihood (one forward pass, no generation)"
        },
    )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = field(
        default="runs/{config}/{method}",
        metadata={
            "help": "the run directory; {config} (the config file's name), {method} and {seed} are "
            "filled in, so each method of one config gets its own run"
        },
    )
    seed: int = field(
        default=42, metadata={"help": "seed of data order, subsets, held-out splits and methods"}
    )


SECTION_ALIASES = {"model": {"model_name_or_path": "name_or_path"}}
# The sections whose keys are checked by name (method holds the method's own settings).
_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "stream": StreamConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert a YAML value to the field's annotated type."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
        origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is typing.Literal:
        return _choice(value, typing.get_args(hint), where)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if origin is list:
        if isinstance(value, str) and where.endswith("eval_only"):
            value = [value]  # `eval_only: builtin` is shorthand for a list of one task spec
        if not isinstance(value, list):
            raise RetainError(f"config: {where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RetainError(f"config: {where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RetainError(f"config: {where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RetainError(f"config: {where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RetainError(f"config: {where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise RetainError(f"config: {where} must be a string, got {value!r}")
        if isinstance(value, bool):
            return str(value).lower()
        return str(value)
    return value


def _choice(value: Any, choices: tuple, where: str) -> Any:
    """`value` if it is one of a Literal's `choices` (YAML's true/false count as "true"/"false")."""
    candidate = str(value).lower() if isinstance(value, bool) else value
    if candidate in choices:
        return candidate
    names = [str(c) for c in choices]
    raise RetainError(
        f"config: {where} must be one of {', '.join(names)}, got {value!r}{did_you_mean(str(value), names)}"
    )


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, converting and checking each value against its annotation."""
    if cls is TaskConfig and isinstance(data, str):
        data = {"train": data}  # `- synthetic:parity` is shorthand for `- {train: synthetic:parity}`
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RetainError(f"config: {where or 'the file'} must be a mapping of settings, got {data!r}")
    names = _field_names(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        key = SECTION_ALIASES.get(where, {}).get(key, key)
        if key not in names:
            prefix = f"{where}." if where else ""
            raise RetainError(
                f"config: unknown key '{prefix}{key}'{did_you_mean(key, names)}; "
                f"known keys{' in ' + where if where else ''}: {', '.join(names)}"
            )
        sub = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(value, hints[key], sub)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RetainError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _normalise_tree(raw: dict) -> tuple[dict, compat.Translation]:
    """Map LLaMA-Factory / EasyCL / flat names into their sections and method settings into method.params."""
    found = compat.translate(raw)
    tree: dict[str, Any] = {}
    for key, value in found.entries.items():
        if key == "method" and isinstance(value, str):
            value = {"name": value}  # `method: ewc` is shorthand for `method: {name: ewc}`
        if "." in key:
            _set_dotted(tree, key, value)
        elif isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = _merge(tree[key], value)
        else:
            tree[key] = value
    method = tree.get("method")
    if isinstance(method, dict):
        params = dict(method.get("params") or {})
        params.update({k: v for k, v in method.items() if k not in ("name", "params")})
        # No name here (an override like method.dema=false) keeps the name given elsewhere.
        tree["method"] = {"params": params, **({"name": method["name"]} if "name" in method else {})}
    return tree, found


def _unknown_keys(tree: dict) -> list[tuple[str, str]]:
    """(short, full) messages for each key no section knows, with suggestions from every known name."""
    problems = []
    top = _field_names(RunConfig)
    for key, value in tree.items():
        if key not in top:
            hint = compat.suggest(str(key), [*top, *compat.known_keys()])
            short = f"unknown key '{key}'{hint}"
            known = f"; known keys: {', '.join(top)} (and the flat names `retain config` lists)"
            problems.append((short, short + known))
        elif key in _SECTIONS and isinstance(value, dict):
            names = _field_names(_SECTIONS[key])
            for sub in value:
                if SECTION_ALIASES.get(key, {}).get(sub, sub) not in names:
                    short = f"unknown key '{key}.{sub}'{compat.suggest(str(sub), names)}"
                    problems.append((short, f"{short}; known keys in {key}: {', '.join(names)}"))
    return problems


def _refuse(found: compat.Translation, tree: dict) -> None:
    """Raise one error naming every refused and every unknown key, if any."""
    unknown = _unknown_keys(tree)
    if len(unknown) == 1 and not found.refused:
        raise RetainError(f"config: {unknown[0][1]}")
    problems = found.refused + [short for short, _ in unknown]
    if problems:
        raise compat.problems_error(problems)


def _apply_test_sets(config: RunConfig, found: compat.Translation, source: str) -> None:
    """`dataset:` tasks get their `<name>_test` entries; say which fall back to a held-out split."""
    if not found.dataset_tasks:
        return
    missing, path = compat.resolve_test_sets(
        config.stream.tasks, found.dataset_tasks, config.stream.dataset_dir
    )
    if missing:
        logger.warning(
            "%s: no test set for %s (no eval_dataset, no <name>_test entry in %s): each holds out part "
            "of its training data as its test set",
            source,
            ", ".join(missing),
            path,
        )


def _log_translation(found: compat.Translation, source: str) -> None:
    for note in dict.fromkeys(found.notes):
        logger.info("%s: %s", source, note)
    if found.ignored:
        logger.info(
            "%s: accepted, changing nothing for retain: %s (docs/llamafactory_easycl.md says why)",
            source,
            ", ".join(dict.fromkeys(found.ignored)),
        )


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ['train.learning_rate=1e-4', 'method.name=replay'] into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise RetainError(f"override '{item}' is not key=value (example: train.learning_rate=1e-4)")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise RetainError(f"override '{item}': value is not valid YAML ({exc})") from None
        key = FLAT_ALIASES.get(key, key)
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str) -> dict:
    """Read a YAML mapping; missing file or bad YAML -> RetainError naming the file and position."""
    if not os.path.isfile(path):
        raise RetainError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RetainError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RetainError(f"{path}: the config must be a mapping of settings, got {type(data).__name__}")
    return data


def config_from_dict(
    raw: dict, source: str = "config", overrides: list[str] | None = None, name: str = "run"
) -> RunConfig:
    """Build and validate a RunConfig from a raw mapping plus dotted overrides; `name` fills `{config}`.

    Every refused or unknown key (LLaMA-Factory's and EasyCL's included) is named in one error. A
    `sweep:` section is `retain sweep`'s (engine/sweep.py); a single run ignores it.
    """
    raw = {key: value for key, value in raw.items() if key != "sweep"}
    tree, found = _normalise_tree(raw)
    if overrides:
        extra, more = _normalise_tree(parse_overrides(overrides))
        found.extend(more)
        new_name = extra.get("method", {}).get("name")
        if new_name and new_name != tree.get("method", {}).get("name"):
            # Another method on the command line: the file's settings belong to the old one.
            tree["method"] = {"name": new_name, "params": {}}
        tree = _merge(tree, extra)
    _refuse(found, tree)
    config = build_dataclass(RunConfig, tree, "")
    _apply_test_sets(config, found, source)
    _log_translation(found, source)
    validate(config)
    config.output_dir = fill_output_dir(config, name)
    return config


def method_label(method: MethodConfig) -> str:
    """The method as a folder name: `lwf`, or `lwf+ewc` for a combination (`plus`)."""
    plus = method.params.get("plus") or []
    entries = plus if isinstance(plus, list) else [plus]
    names = [e.get("name", "") if isinstance(e, dict) else str(e) for e in entries]
    return "+".join([method.name, *[n for n in names if n]])


def fill_output_dir(config: RunConfig, name: str) -> str:
    """output_dir with `{config}`, `{method}` and `{seed}` filled in."""
    values = {"config": name, "method": method_label(config.method), "seed": str(config.seed)}
    try:
        return config.output_dir.format(**values)
    except (KeyError, IndexError, ValueError):
        raise RetainError(
            f"config: output_dir '{config.output_dir}' has a placeholder retain does not know; "
            "use {config}, {method} or {seed} (or double the braces for a literal one)"
        ) from None


def load_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config file, apply `key=value` overrides and validate the result.

    Relative paths (model, dataset_dir, image_dir, benchmark_dir, task files, output_dir) resolve against
    the current directory, as in LLaMA-Factory; a folder that exists only beside the config is reported.
    """
    name = os.path.splitext(os.path.basename(path))[0] or "run"
    config = config_from_dict(read_yaml(path), source=path, overrides=overrides, name=name)
    base = os.path.dirname(os.path.abspath(path))
    for key in ("dataset_dir", "image_dir", "benchmark_dir"):
        folder = getattr(config.stream, key)
        if folder and not os.path.isabs(folder) and not os.path.isdir(folder):
            beside = os.path.join(base, folder)
            if os.path.isdir(beside) and os.path.abspath(beside) != os.path.abspath(folder):
                raise RetainError(
                    f"{path}: stream.{key} '{folder}' does not exist from the current directory "
                    f"{os.getcwd()} (relative paths resolve from where retain runs, not from the "
                    f"config's folder); write {os.path.relpath(beside)} or an absolute path"
                )
    return config


def _positive(value: float | None, where: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise RetainError(f"config: {where} must be a positive number, got {value!r}")


def _not_negative(value: float, where: str, meaning: str = "") -> None:
    if value < 0:
        raise RetainError(f"config: {where} must be 0 or more{meaning}, got {value!r}")


def _fraction(value: float, where: str, meaning: str) -> None:
    """`value` in [0, 1)."""
    if not 0 <= value < 1:
        raise RetainError(f"config: {where} must be at least 0 and below 1 ({meaning}), got {value!r}")


def parse_lora_layers(spec: str) -> int | list[int] | None:
    """`model.lora_layers`: None for all layers, an int N for the top N layers, or a list of indices."""
    text = spec.strip().replace(" ", "")
    if text in ("", "all"):
        return None
    hint = "use all, last:N (the top N layers) or layer indices such as 0,1,2"
    if text.startswith("last:"):
        count = text[len("last:") :]
        if not count.isdigit() or int(count) <= 0:
            raise RetainError(f"config: model.lora_layers '{spec}': N in last:N must be a positive integer")
        return int(count)
    parts = text.split(",")
    if not all(part.isdigit() for part in parts):
        raise RetainError(f"config: model.lora_layers '{spec}' is not understood; {hint}")
    return sorted({int(part) for part in parts})


def _answer_styles(stream: StreamConfig) -> None:
    """`stream.answer_styles`: known style names, each a fraction in [0, 1], together at most 1."""
    example = "e.g. {multiple_choice: 0.1, yes_no: 0.05, sentence: 0.05}"
    if stream.answer_styles is None:
        return
    for name, value in stream.answer_styles.items():
        where = f"stream.answer_styles.{name}"
        if name not in ANSWER_STYLES:
            raise RetainError(
                f"config: unknown answer style '{name}' in stream.answer_styles"
                f"{did_you_mean(str(name), list(ANSWER_STYLES))}; styles: {', '.join(ANSWER_STYLES)}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise RetainError(
                f"config: {where} must be the fraction of training examples given that style, a number "
                f"from 0 to 1 ({example}), got {value!r}"
            )
        stream.answer_styles[name] = float(value)
    total = sum(stream.answer_styles.values())
    if total > 1 + 1e-9:
        raise RetainError(
            f"config: the fractions of stream.answer_styles add up to {total:g}; they share one task's "
            f"training examples, so together they must be at most 1 ({example})"
        )


def report_to(train: TrainConfig) -> list[str]:
    """`train.report_to` as a list of tracker names (empty for none); unknown names are refused."""
    names = [n.strip().lower() for n in str(train.report_to).split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    for name in names:
        if name not in TRACKERS:
            raise RetainError(
                f"config: train.report_to '{name}' is not a tracker retain knows"
                f"{did_you_mean(name, list(TRACKERS))}; "
                f"use none or one or more of {', '.join(TRACKERS)} (comma-separated)"
            )
    return names


FSDP_WORDS = (
    "full_shard",
    "shard_grad_op",
    "hybrid_shard",
    "hybrid_shard_zero2",
    "no_shard",
    "offload",
    "auto_wrap",
)


def fsdp_words(fsdp: str) -> list[str]:
    """`train.fsdp` ("full_shard auto_wrap", TrainingArguments' syntax) as its words; unknown words are
    refused (TrainingArguments would refuse them only when the first task starts)."""
    words = fsdp.split()
    for word in words:
        if word not in FSDP_WORDS:
            raise RetainError(
                f"config: train.fsdp word '{word}' is not one of TrainingArguments' fsdp options"
                f"{did_you_mean(word, FSDP_WORDS)}; use {', '.join(FSDP_WORDS)} (space-separated, e.g. "
                '"full_shard auto_wrap")'
            )
    return words


def _strategy_settings(train: TrainConfig) -> None:
    """train.deepspeed, train.fsdp, train.fsdp_config: one strategy, and files that exist (their contents
    are read by retain.runtime.resolve_strategy and the Trainer)."""
    words = fsdp_words(train.fsdp)
    if train.deepspeed and words:
        raise RetainError("config: set train.deepspeed or train.fsdp, not both (one strategy per run)")
    if train.fsdp_config and not words:
        raise RetainError(
            'config: train.fsdp_config is set but train.fsdp is empty; set train.fsdp (e.g. "full_shard '
            'auto_wrap") or remove fsdp_config'
        )
    for key in ("deepspeed", "fsdp_config"):
        path = getattr(train, key)
        if path and not os.path.isfile(path):
            raise RetainError(
                f"config: train.{key} file {path} does not exist (relative paths resolve from the current "
                f"directory {os.getcwd()})"
            )


def validate(config: RunConfig) -> None:
    """Check the values that can be checked without loading data or models."""
    _positive(config.model.lora_rank, "model.lora_rank", allow_none=False)
    _positive(config.model.lora_alpha, "model.lora_alpha", allow_none=False)
    _fraction(config.model.lora_dropout, "model.lora_dropout", "the probability of dropping an input")
    if config.model.finetuning_type == "lora" and not config.model.lora_target.strip(" ,"):
        raise RetainError("config: model.lora_target is empty; use all-linear or names such as q_proj,v_proj")
    parse_lora_layers(config.model.lora_layers)
    if not 0 <= config.seed < SEED_LIMIT:
        raise RetainError(f"config: seed must be an integer from 0 to {SEED_LIMIT - 1}, got {config.seed!r}")
    _positive(config.train.learning_rate, "train.learning_rate", allow_none=False)
    _fraction(config.train.warmup_ratio, "train.warmup_ratio", "the fraction of the steps spent warming up")
    _not_negative(config.train.weight_decay, "train.weight_decay")
    _not_negative(config.train.max_grad_norm, "train.max_grad_norm", " (0 turns gradient clipping off)")
    _positive(config.train.logging_steps, "train.logging_steps", allow_none=False)
    _not_negative(config.train.warmup_steps, "train.warmup_steps")
    report_to(config.train)
    _strategy_settings(config.train)
    if config.train.max_steps == 0 or config.train.max_steps < -1:
        raise RetainError(
            f"config: train.max_steps must be a positive number of optimizer steps, or -1 to train "
            f"train.num_train_epochs epochs, got {config.train.max_steps!r}"
        )
    _positive(config.train.per_device_train_batch_size, "train.per_device_train_batch_size", False)
    _positive(config.train.gradient_accumulation_steps, "train.gradient_accumulation_steps", False)
    _positive(config.train.global_batch_size, "train.global_batch_size")
    if config.train.global_batch_size is not None and config.train.gradient_accumulation_steps != 1:
        raise RetainError(
            "config: set train.global_batch_size or train.gradient_accumulation_steps, not both "
            "(with global_batch_size the accumulation is derived from it)"
        )
    _positive(config.train.cutoff_len, "train.cutoff_len", allow_none=False)
    _positive(config.eval.max_new_tokens, "eval.max_new_tokens", allow_none=False)
    _positive(config.eval.batch_size, "eval.batch_size", allow_none=False)
    if config.train.max_steps <= 0:
        _positive(config.train.num_train_epochs, "train.num_train_epochs", allow_none=False)
    _positive(config.stream.train_size, "stream.train_size")
    _positive(config.stream.test_size, "stream.test_size")
    if config.model.template not in ("auto", "default", ""):
        logger.info(
            "template '%s': retain renders prompts with the model's own chat template", config.model.template
        )
    _positive(config.stream.max_tasks, "stream.max_tasks")
    _answer_styles(config.stream)
    if not config.stream.tasks and not config.stream.benchmark:
        raise RetainError(
            "config: stream.tasks is empty; list at least one task (see examples/quickstart.yaml) or name a "
            "benchmark (retain benchmarks lists them)"
        )
    seen = set()
    for i, task in enumerate(config.stream.tasks):
        where = f"stream.tasks[{i}]"
        if not task.train:
            raise RetainError(f"config: {where}.train is missing (a dataset name, file or synthetic:<name>)")
        if not task.name:
            task.name = task.train.split(":")[-1].split("/")[-1].rsplit(".", 1)[0]
        if task.name in seen:
            raise RetainError(f"config: {where}.name '{task.name}' is used twice; task names must be unique")
        seen.add(task.name)
        _positive(task.train_size, f"{where}.train_size")
        _positive(task.test_size, f"{where}.test_size")
        task.train_size = task.train_size or config.stream.train_size
        task.test_size = task.test_size or config.stream.test_size
    _eval_only(config.stream, seen)


def _eval_only(stream: StreamConfig, stream_names: set[str]) -> None:
    """`stream.eval_only`: each entry names its data once (train or test: it is only ever tested), no
    training size, and a name of its own (the stream's task names are taken); `builtin` stands for the
    built-in general set (retain.data.general), at most once."""
    seen: set[str] = set()
    for i, task in enumerate(stream.eval_only):
        where = f"stream.eval_only[{i}]"
        if task.train and task.test:
            raise RetainError(
                f"config: {where} gives both train ({task.train}) and test ({task.test}); an eval-only task "
                "is never trained, so give its data once (as test, or as the task spec itself)"
            )
        task.test, task.train = task.test or task.train, ""
        if task.test in ("builtin", BUILTIN_GENERAL):
            task.test = BUILTIN_GENERAL
            if any(t.test == BUILTIN_GENERAL for t in stream.eval_only[:i]):
                raise RetainError(f"config: {where}: the built-in general set (builtin) is listed twice")
        if not task.test:
            raise RetainError(
                f"config: {where} names no data; give a dataset name, a file, synthetic:<name>, "
                "benchmark:<benchmark>/<task> or builtin"
            )
        if task.train_size is not None:
            raise RetainError(
                f"config: {where}.train_size: an eval-only task is never trained; remove it "
                "(test_size caps its test examples)"
            )
        if not task.name:
            task.name = task.test.split(":")[-1].split("/")[-1].rsplit(".", 1)[0]
        if task.name in stream_names:
            raise RetainError(
                f"config: {where}.name '{task.name}' is also a task of the stream; an eval-only task is "
                "never trained, so it needs a name of its own (set name:)"
            )
        if task.name in seen:
            raise RetainError(f"config: {where}.name '{task.name}' is used twice; task names must be unique")
        seen.add(task.name)
        _positive(task.test_size, f"{where}.test_size")
        task.test_size = task.test_size or stream.test_size


def config_to_dict(config: RunConfig) -> dict:
    """The resolved config as plain data (what config.yaml in the run directory holds)."""
    return dataclasses.asdict(config)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# `retain config SECTION`: the sections, each with its dataclass and where its keys live.
REFERENCE_SECTIONS: dict[str, tuple[type, str]] = {
    "run": (RunConfig, ""),
    "model": (ModelConfig, "model."),
    "stream": (StreamConfig, "stream."),
    "task": (TaskConfig, "stream.tasks[]."),
    "method": (MethodConfig, "method."),
    "train": (TrainConfig, "train."),
    "eval": (EvalConfig, "eval."),
}


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " | ".join(map(str, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return str(hint).replace("typing.", "") if origin else getattr(hint, "__name__", str(hint))


def _default_text(spec: dataclasses.Field) -> str:
    if spec.default is not dataclasses.MISSING:
        return repr(spec.default)
    value = spec.default_factory()  # type: ignore[misc]
    return repr(value) if not dataclasses.is_dataclass(value) else "(section)"


def config_reference(section: str = "") -> str:
    """Every setting of `section` (all when empty): its key, type, default, help and flat names."""
    if section and section not in REFERENCE_SECTIONS:
        names = list(REFERENCE_SECTIONS)
        raise RetainError(
            f"retain config: no section '{section}'{compat.suggest(section, names)}; "
            f"sections: {', '.join(names)}"
        )
    lines = []
    for name, (cls, prefix) in REFERENCE_SECTIONS.items():
        if section and name != section:
            continue
        lines.append(f"[{name}]")
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[spec.name]) or spec.name in ("tasks", "eval_only"):
                continue  # a section of its own
            key = f"{prefix}{spec.name}"
            lines.append(f"{key}: {_type_name(hints[spec.name])} = {_default_text(spec)}")
            lines.append(f"    {spec.metadata.get('help', '')}".rstrip())
            flat = compat.aliases_of(key)
            if flat:
                lines.append(f"    also at the top level as: {', '.join(flat)}")
        if name == "stream":
            lines.append("stream.tasks: list of tasks, each a dataset spec or a mapping (see [task])")
            lines.append("    also at the top level as: tasks; LLaMA-Factory/EasyCL: dataset: a,b,c")
            lines.append("stream.eval_only: list of tasks scored in every row but never trained (see [task];")
            lines.append("    each one's data is its test set), or builtin for the built-in general set")
        if name == "method":
            lines.append("    the method's own settings go beside name (retain methods lists them)")
            lines.append("    EasyCL: use_<method>: true and its settings (docs/llamafactory_easycl.md)")
        lines.append("")
    if not section:
        lines.append("LLaMA-Factory and EasyCL keys: docs/llamafactory_easycl.md")
    return "\n".join(lines).rstrip() + "\n"
