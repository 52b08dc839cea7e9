"""Shared builders for tests: tiny configs, a method context around a tiny LoRA model."""

from __future__ import annotations

from retain.config import config_from_dict
from retain.data.streams import build_stream
from retain.methods.base import ContinualMethod, MethodContext
from retain.models.adapters import apply_finetuning
from retain.models.tiny import tiny_model, tiny_tokenizer


def tiny_config(tmp_path, method: str = "sequential", params: dict | None = None, **sections) -> dict:
    """A 2-task stream on the tiny random model that trains in about a second."""
    raw = {
        "model": {"name_or_path": "tiny-random", "lora_rank": 4, "lora_alpha": 8},
        "stream": {
            "train_size": 32,
            "test_size": 6,
            "tasks": ["synthetic:parity", "synthetic:capital_letters"],
        },
        "method": {"name": method, **(params or {})},
        "train": {
            "learning_rate": 2e-2,
            "per_device_train_batch_size": 4,
            "max_steps": 6,
            "cutoff_len": 96,
            "logging_steps": 2,
            "bf16": "false",
        },
        "eval": {"max_new_tokens": 6, "batch_size": 8},
        "output_dir": str(tmp_path / "run"),
        "seed": 3,
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


def tiny_context(tmp_path, method: str = "sequential", params: dict | None = None):
    """(ctx, tasks) with a LoRA-wrapped tiny model, as the loop builds them."""
    config = config_from_dict(tiny_config(tmp_path, method, params))
    tokenizer = tiny_tokenizer()
    model = apply_finetuning(tiny_model(tokenizer), config.model)
    tasks = build_stream(config)
    ctx = MethodContext.create(model, tokenizer, config, tasks, task_index=1)
    return ctx, tasks


def set_gradient(ctx, loss_fn) -> list:
    """Clear the trainable parameters' gradients, backpropagate `loss_fn()`, return the parameters."""
    from retain.models.adapters import trainable_parameters

    params = list(trainable_parameters(ctx.model).values())
    for p in params:
        p.grad = None
    loss_fn().backward()
    return params


def train_one_task(ctx, tasks, method, folder, examples=None, **arguments):
    """Run a ContinualTrainer with `method` on `examples` (default: the first task's training set);
    `arguments` override TrainingArguments."""
    from transformers import TrainingArguments

    from retain.data.batching import FeatureDataset
    from retain.engine.trainer import ContinualTrainer

    settings = dict(
        output_dir=str(folder),
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = ContinualTrainer(
        model=ctx.model,
        args=TrainingArguments(**{**settings, **arguments}),
        train_dataset=FeatureDataset(ctx.encode(tasks[0].train if examples is None else examples)),
        data_collator=ctx.collate,
        method=method,
        ctx=ctx,
    )
    trainer.train()
    return trainer


class AlternatingRoutes(ContinualMethod):
    """Routes even test instances to 'a' and odd ones to 'b', recording the activations."""

    def __init__(self):
        super().__init__()
        self.activated: list[str] = []

    def eval_routes(self, ctx, task):
        return ["a" if i % 2 == 0 else "b" for i in range(len(task.test))]

    def activate_route(self, ctx, route):
        self.activated.append(route)
        return ctx.model
