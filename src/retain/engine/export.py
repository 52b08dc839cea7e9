"""`retain export`: write the model a run evaluated after task k, loadable without retain.

What is written to the output folder:
- a LoRA run: one plain PEFT adapter (adapter_config.json + adapter_model.safetensors, for
  `PeftModel.from_pretrained(base, DIR)`) made of the adapters the method evaluates with
  (`ContinualMethod.export_adapters`): the one adapter as saved, or several (O-LoRA's task adapters, SEFE's)
  concatenated into one adapter of their summed rank. Per layer A = vstack(s_i A_i) and B = hstack(B_i)
  with scaling 1, so B A = sum_i s_i B_i A_i exactly; a plain sum of the factors would not be (the sum of
  rank-r products is not a rank-r product). With `merge`, the adapter is merged into the base weights and
  the full model is written instead (`AutoModelForCausalLM.from_pretrained(DIR)`);
- full fine-tuning: the full model;
- always: the tokenizer (or an image-text model's processor), README.md (a model card: what it is, how to
  load it, the run's scores after task k) and export.json (the same facts, for programs). A model with
  no folder of its own (`tiny-random`) is written to DIR/base as well, so that the adapter has a base.

Methods whose evaluated model is not one model (per-prompt routing, routers: `export_refusal`) are
refused, as are DoRA adapters that would need concatenating and a LoRA run that also trained base
weights (an image-text model's projector) unless `merge` is set.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from retain import __version__
from retain.engine.loop import Experiment
from retain.engine.model_card import model_card
from retain.engine.plan import Plan
from retain.engine.posthoc import open_plan, open_run
from retain.engine.run_dir import RunDir, RunState
from retain.errors import RetainError
from retain.evaluation.generate import eos_token_ids
from retain.io import atomic_directory, write_json_atomic, write_text_atomic
from retain.methods.common.task_vectors import lora_layers, save_adapter, unit_scale_lora_config
from retain.models.adapters import BASE_WEIGHTS, peft_model, unwrap, weights_folder
from retain.models.loading import BUILTIN_NAMES, load_model, resolve_builtin

CARD = "README.md"
RECORD = "export.json"
EXPORTED = "exported"  # the concatenated adapter, while it is built in the run's model
OWN_BASE = "base"  # subfolder holding the base model when it has no folder of its own (tiny-random)


def export_run(run_dir: str, output: str, task: int | None = None, merge: bool = False) -> dict[str, Any]:
    """Write the model `run_dir` evaluated after task `task` (default: the last trained) into `output`;
    returns what export.json records. Everything that can be refused is checked before the model loads."""
    config, folder, state = open_run(run_dir)
    _check_output(output)
    plan = open_plan(config)
    refusal = next((c.export_refusal for c in plan.method.components if c.export_refusal), None)
    if refusal:
        raise RetainError(
            f"{plan.method.name} {refusal}; a single exported model cannot reproduce its scores; "
            f"use retain eval {run_dir}"
        )
    index = _task_index(folder, plan, state, task)
    experiment = Experiment(plan, folder)
    experiment.restore(index)
    ctx = experiment.ctx
    adapters = experiment.method.export_adapters(ctx)
    if adapters and os.path.isfile(_checkpoint_weights(experiment, index, BASE_WEIGHTS)) and not merge:
        raise RetainError(
            f"{folder.path} trained base weights beside its adapters ({BASE_WEIGHTS}: an image-text model's "
            "projector or vision tower), which a PEFT adapter cannot carry; export with --merge"
        )
    output = os.path.abspath(output)
    with atomic_directory(output, prefix=".export-") as tmp:
        record = _write(experiment, adapters, merge, tmp, output)
        record.update(_facts(experiment, folder, state, index))
        write_json_atomic(os.path.join(tmp, RECORD), record)
        write_text_atomic(os.path.join(tmp, CARD), model_card(record))
    return record


def _task_index(folder: RunDir, plan: Plan, state: RunState, task: int | None) -> int:
    if task is None:
        return state.trained
    if not 1 <= task <= state.trained:
        units = plan.train_units[: state.trained]
        trained = ", ".join(f"{k} ({unit.name})" for k, unit in enumerate(units, 1))
        raise RetainError(
            f"--task {task}: {folder.path} has trained task(s) {trained}; choose one of 1 to {state.trained}"
        )
    return task


def _check_output(output: str) -> None:
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise RetainError(
            f"--output {os.path.abspath(output)} exists and is not an empty folder; choose a new folder"
        )


def _facts(experiment: Experiment, folder: RunDir, state: RunState, index: int) -> dict[str, Any]:
    """What the card says about the run: where it is, its method, the task, its scores after the task."""
    config = experiment.config
    tasks = [t.name for t in experiment.plan.tasks]
    row = state.rows.get(str(index))
    return {
        "run_dir": folder.path,
        "method": config.method.name,
        "finetuning_type": config.model.finetuning_type,
        "task": index,
        "task_name": experiment.unit_name(index),
        "tasks_trained": [experiment.unit_name(k) for k in range(1, index + 1)],
        "model_name_or_path": config.model.name_or_path,
        "image_text": experiment.processor is not None,
        "scores": dict(zip(tasks, row, strict=True)) if row else None,
        "eval": {
            "mode": config.eval.mode,
            "max_new_tokens": config.eval.max_new_tokens,
            "bf16_autocast": bool(experiment.ctx.bf16),
        },
        "retain_version": __version__,
    }


def _checkpoint_weights(experiment: Experiment, index: int, name: str) -> str:
    folder = experiment.run_dir.task_dir(index, experiment.unit_name(index))
    return os.path.join(folder, weights_folder(experiment.model), name)


# --- writing ------------------------------------------------------------------------------------------


def _write(experiment: Experiment, adapters: list[str], merge: bool, tmp: str, output: str) -> dict[str, Any]:
    """Write the weights and the tokenizer into `tmp` (renamed to `output` afterwards); returns facts."""
    model, tokenizer = experiment.model, experiment.tokenizer
    eos = eos_token_ids(unwrap(model), tokenizer)
    encoders = experiment.processor or tokenizer
    # A full model needs no base; an adapter names the folder its base model loads from.
    name_or_path = experiment.config.model.name_or_path
    record: dict[str, Any] = {"path": output, "eos_token_ids": eos, "base_model": name_or_path}
    if not adapters:
        _save_model(unwrap(model), tokenizer, eos, tmp)
        encoders.save_pretrained(tmp)
        record.update(kind="model", merged=False, adapters=[], description="the fully fine-tuned model")
        return record
    name, rank, description, others = _one_adapter(model, adapters)
    if merge:
        inner = peft_model(model)
        inner.base_model.set_adapter([name])
        merged = inner.merge_and_unload(adapter_names=[name])
        _save_model(merged, tokenizer, eos, tmp)
        encoders.save_pretrained(tmp)
        record.update(
            kind="model",
            merged=True,
            adapters=adapters,
            rank=rank,
            description=f"{description} merged into the base weights{others}",
        )
        return record
    base = base_reference(name_or_path, output)
    save_adapter(model, name, tmp)
    _name_base(os.path.join(tmp, "adapter_config.json"), base)
    encoders.save_pretrained(tmp)
    if name_or_path == "tiny-random":
        base_model, base_tokenizer, _ = load_model("tiny-random")
        _save_model(base_model, base_tokenizer, eos, os.path.join(tmp, OWN_BASE))
        base_tokenizer.save_pretrained(os.path.join(tmp, OWN_BASE))
    record.update(
        kind="adapter",
        merged=False,
        adapters=adapters,
        rank=rank,
        description=description + others,
        base_model=base,
    )
    return record


def _name_base(config_file: str, base: str) -> None:
    """Set the adapter's base_model_name_or_path (after saving: PEFT checks at save time that it exists,
    and a base written into the output folder exists only once the folder is in place)."""
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    config["base_model_name_or_path"] = base
    write_json_atomic(config_file, config)


def _save_model(model: nn.Module, tokenizer: Any, eos: list[int], path: str) -> None:
    """save_pretrained, with the generation settings retain evaluated with (its stop tokens, its pad)."""
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.eos_token_id = eos if len(eos) > 1 else eos[0]
        generation.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)


def base_reference(name_or_path: str, output: str) -> str:
    """What adapter_config.json names as the base model: a folder transformers can load without retain."""
    if name_or_path == "tiny-random":
        return os.path.join(output, OWN_BASE)
    if name_or_path in BUILTIN_NAMES:
        return resolve_builtin(name_or_path)[0]
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


def _one_adapter(model: nn.Module, adapters: list[str]) -> tuple[str, int, str, str]:
    """(name of the adapter to write, its rank, what it is, which adapters of the run it leaves out): the
    adapter itself when there is one, else the adapters concatenated into EXPORTED."""
    inner = peft_model(model)
    others = [n for n in inner.peft_config if n not in adapters]
    listed = ", ".join(repr(n) for n in others)
    also = f" (the run also holds {listed}, not used in evaluation)" if others else ""
    if len(adapters) == 1:
        rank = inner.peft_config[adapters[0]].r
        return adapters[0], rank, f"the LoRA adapter '{adapters[0]}' (rank {rank})", also
    rank = concatenate_adapters(model, adapters, EXPORTED)
    names = ", ".join(repr(n) for n in adapters)
    return EXPORTED, rank, f"the {len(adapters)} LoRA adapters {names} as one rank-{rank} LoRA", also


@torch.no_grad()
def concatenate_adapters(model: nn.Module, adapters: list[str], name: str) -> int:
    """Add adapter `name` whose Delta W is exactly the sum of `adapters`' on every layer; returns its rank
    (the largest over layers; layers of other ranks are named in its rank_pattern).

    Per layer, A = vstack(s_i A_i) and B = hstack(B_i) over the adapters i on that layer, scaling 1."""
    inner = peft_model(model)
    configs = [inner.peft_config[a] for a in adapters]
    if any(getattr(c, "use_dora", False) for c in configs):
        raise RetainError(
            f"the evaluated adapters {', '.join(adapters)} use DoRA, whose magnitude vectors do not add up "
            "across adapters: they cannot be written as one adapter"
        )
    layers = {a: lora_layers(model, a) for a in adapters}
    modules = sorted({m for per in layers.values() for m in per})
    for adapter, per in layers.items():
        for module_name, layer in per.items():
            if not isinstance(layer, LoraLinear):
                raise RetainError(
                    f"adapter '{adapter}' adapts {module_name}, a {type(layer).__name__} layer: only LoRA on "
                    "linear layers can be concatenated into one adapter"
                )
    ranks = {m: sum(per[m].r[a] for a, per in layers.items() if m in per) for m in modules}
    relative = {m: m.removeprefix("base_model.model.") for m in modules}
    same_targets = all(set(per) == set(modules) for per in layers.values())
    targets: dict[str, Any] = (
        {}
        if same_targets
        else {
            "target_modules": [relative[m] for m in modules],
            "layers_to_transform": None,
            "layers_pattern": None,
        }
    )
    config = unit_scale_lora_config(
        configs[0], {re.escape(relative[m]): r for m, r in ranks.items()}, **targets
    )
    if name in inner.peft_config:
        inner.delete_adapter(name)
    inner.add_adapter(name, config)
    built = lora_layers(model, name)
    if set(built) != set(modules):
        raise RetainError(
            f"internal: the concatenated adapter covers {len(built)} layers, not {len(modules)}"
        )
    for module_name, layer in built.items():
        a_rows, b_columns = [], []
        for adapter, per in layers.items():
            if module_name in per:
                source = per[module_name]
                a_rows.append(source.lora_A[adapter].weight.float() * source.scaling[adapter])
                b_columns.append(source.lora_B[adapter].weight.float())
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        a.copy_(torch.cat(a_rows, dim=0).to(a.dtype))
        b.copy_(torch.cat(b_columns, dim=1).to(b.dtype))
        if layer.scaling[name] != 1.0:
            raise RetainError(f"internal: the concatenated adapter's scaling is {layer.scaling[name]}, not 1")
    for param in (p for n, p in inner.named_parameters() if f".{name}." in n):
        param.requires_grad_(False)
    return max(ranks.values())
