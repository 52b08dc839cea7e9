"""Pseudo replay: rehearse samples that the model writes itself from a few stored demonstrations.

EasyCL's simplified Self-Synthesized Rehearsal (Huang et al., ACL 2024; EasyCL cites Rolnick et al.,
NeurIPS 2019, for experience replay): after task k, `num_shots` real examples of it are kept. Before
task t, for every earlier task k without a memory yet, the generator completes `memory_per_task`
in-context prompts built from task k's demonstrations (seeded order, sampling at `temperature`); the
completions parsed into (input, output) form task k's pseudo memory, kept for the rest of the stream.
Training set of task t: D_t plus the pseudo memories of tasks 1..t-1. No refinement, no selection.

The generator (`generator`):
- `base` (the default): the model with its LoRA adapters disabled, as SSR writes its inputs. It still
  follows the few-shot "write a new Input/Output example" prompt, whereas a model fine-tuned on short
  answers often no longer does: on the quickstart stream, after 80 steps of parity the current model
  answers the prompt with "even" instead of an example, no generation parses and the run degrades to
  sequential fine-tuning (with a warning); the base model's generations mostly parse. Their outputs
  are the base model's own answers, unrefined, so many are wrong (SSR has the latest model answer).
  Needs finetuning_type: lora (the plan refuses full fine-tuning with it).
- `current`: the model as trained through task t-1, adapters enabled (EasyCL's choice). Works with full
  fine-tuning.

Unlike EasyCL (pitfall 7 of METHODS.md), the demonstrations come from the *previous* tasks, never the
current one (so task 1 is rehearsed), and each task's memory is capped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from retain.data.formats import Example
from retain.errors import RetainError
from retain.methods.base import MethodContext, RunSizes, StateItem, example_memory
from retain.methods.common import pseudo
from retain.methods.registry import register
from retain.models.adapters import base_model


@dataclass
class PseudoReplayConfig:
    num_shots: int = field(
        default=5, metadata={"help": "real demonstrations kept per task and shown per prompt"}
    )
    memory_per_task: int = field(
        default=200, metadata={"help": "pseudo samples generated (and at most kept) per previous task"}
    )
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the generation"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus of the sampling (1.0: no cut)"})
    max_new_tokens: int = field(
        default=128, metadata={"help": "longest generated example, in tokens (at most cutoff_len)"}
    )
    generator: Literal["base", "current"] = field(
        default="base",
        metadata={
            "help": "model that writes the pseudo samples: 'base' (LoRA adapters disabled; it still follows "
            "the few-shot prompt; needs LoRA) or 'current' (the model trained so far, as EasyCL)"
        },
    )

    def __post_init__(self) -> None:
        if self.num_shots < 1 or self.memory_per_task < 1 or self.max_new_tokens < 1:
            raise RetainError(
                "config: pseudo_replay needs num_shots, memory_per_task and max_new_tokens >= 1"
            )
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0:
            raise RetainError("config: pseudo_replay needs temperature > 0 and top_p in (0, 1]")


@register("pseudo_replay", config=PseudoReplayConfig)
class PseudoReplay(pseudo.DemoRehearsal):
    """Pseudo replay: the model writes samples of earlier tasks from a few stored demos; rehearse them."""

    config: PseudoReplayConfig
    refused_strategies = {
        "sharded-params": "it generates pseudo samples with the unwrapped model before each task; under "
        "FSDP / ZeRO-3 a process holds only a shard of each parameter outside the wrapped forward",
    }

    def __init__(self, config: PseudoReplayConfig | None = None) -> None:
        super().__init__(config or PseudoReplayConfig())
        # The base generator is the LoRA model with its adapters disabled: full fine-tuning has none.
        self.supports_full_finetuning = self.config.generator == "current"
        # The current generator is the model as the task starts: another method switching adapters breaks it.
        self.needs_previous_model_at_start = self.config.generator == "current"

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        per_task = self.config.memory_per_task or max(sizes.train_examples, default=0)
        return [example_memory(sizes, per_task * max(sizes.tasks - 1, 0), "pseudo-sample memory")]

    def _generate(self, ctx: MethodContext, demos, source: str) -> list[str]:
        options = dict(
            max_new_tokens=pseudo.token_limit(ctx, self.config.max_new_tokens),
            stop_strings=["\n" + pseudo.DEMO_INPUT],
            do_sample=True,
            temperature=self.config.temperature,
            top_p=self.config.top_p,
        )
        salt, n = f"pseudo_replay:{source}", self.config.memory_per_task
        if self.config.generator == "current":
            return pseudo.demo_generations(
                ctx, ctx.model, demos, n, salt, f"pseudo_replay: samples of {source}", **options
            )
        with base_model(ctx.model) as model:
            return pseudo.demo_generations(
                ctx, model, demos, n, salt, f"pseudo_replay: samples of {source} (base model)", **options
            )

    def synthesize(self, ctx: MethodContext, source: str) -> list[dict[str, Any]]:
        """Fill the memory of task `source` from its demonstrations; returns one record per generation."""
        demos = self.demos[source]
        texts = self._generate(ctx, demos, source)
        system = demos[0].system
        kept: list[Example] = []
        seen: set[tuple[str, str]] = set()
        records = []
        for text in texts:
            parsed = pseudo.parse_demo_completion(text)
            status = "unparsable"
            if parsed is not None:
                example = pseudo.pseudo_example(*parsed, system, source, "pseudo_replay", ctx.task_index)
                status = (
                    "duplicate" if parsed in seen else "too_long" if not pseudo.fits(ctx, example) else "kept"
                )
                if status == "kept":
                    seen.add(parsed)
                    kept.append(example)
            records.append({"from_task": source, "text": text, "status": status})
        pseudo.log_kept(ctx, "pseudo_replay", source, len(kept), len(texts))
        self.memory.add(source, kept, self.config.memory_per_task, ctx.rng(f"pseudo_replay:cap:{source}"))
        return records
