"""LAMOL: language modeling for lifelong language learning (Sun, Ho & Lee, ICLR 2020).

One model learns to answer each task and to generate whole examples of it. Every training example x
(question q, answer a) of task k is also shown as a generation sequence G_k(x) = [GEN_k] q [ANS] a:
L = L_QA(a | q) + lm_lambda * L_LM(G_k(x)),
each a token mean over the micro-batch. Before task t > 1 the current model samples
ceil(gen_ratio * |D_t|) sequences after [GEN_k], spread evenly over k = 1..t-1 (top-k 20, temperature
1, seeded); those parsed into (q, a) are trained with D_t, with both losses.

Tokens as text, not new embeddings: [GEN_k] is the plain-text user turn `__gen_<task>__` and the example
is the assistant turn `q\\n__ans__\\na`, rendered by the chat template. So the LM loss is the ordinary
response loss of that conversation, no embedding row has to be added, trained and saved beside LoRA
(PEFT's trainable_token_indices or modules_to_save would be needed for new special tokens), and
checkpoints stay plain adapters. The cost: the markers take a few tokens each, and the LM loss covers
the assistant turn (the whole example), not the marker itself, which is given.

Deviations from the reference code (chho33/LAMOL): the LM loss is not weighted up on special tokens
(`tokens_weight`); multi-turn examples contribute their last user turn only; pseudo samples accumulate
in a capped per-task memory (`accumulate`) instead of being regenerated from scratch each task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from retain.data.formats import Example
from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem, example_memory
from retain.methods.common import pseudo
from retain.methods.registry import register
from retain.models.adapters import unwrap
from retain.models.forward import StepOutputs

logger = logging.getLogger(__name__)

ANSWER_MARKER = "__ans__"


def gen_marker(task: str) -> str:
    """The plain-text generation token of a task (LAMOL^TASK: one per task)."""
    return f"__gen_{task}__"


def generation_example(example: Example, task: str) -> Example:
    """The LM sequence of an example: user turn [GEN_task], assistant turn `question __ans__ answer`."""
    text = f"{pseudo.question_of(example)}\n{ANSWER_MARKER}\n{example.reference}"
    messages = [{"role": "user", "content": gen_marker(task)}, {"role": "assistant", "content": text}]
    return Example(messages, example.system, {"lamol_lm_of": task})


def parse_generation(text: str) -> tuple[str, str] | None:
    """(question, answer) from a generated `question __ans__ answer`, or None without the marker."""
    if ANSWER_MARKER not in text:
        return None
    question, _, answer = text.partition(ANSWER_MARKER)
    question, answer = question.strip(), answer.split(ANSWER_MARKER)[0].strip()
    return (question, answer) if question and answer else None


@dataclass
class LAMOLConfig:
    lm_lambda: float = field(
        default=0.25,
        metadata={"help": "weight of the LM loss on the generation sequence [GEN] question answer"},
    )
    gen_ratio: float = field(
        default=0.2,
        metadata={
            "help": "gamma: pseudo samples made before task t, as a fraction of |D_t|, spread over 1..t-1"
        },
    )
    top_k: int = field(default=20, metadata={"help": "top-k of the sampling of pseudo samples"})
    temperature: float = field(
        default=1.0, metadata={"help": "temperature of the sampling of pseudo samples"}
    )
    max_new_tokens: int = field(
        default=128, metadata={"help": "longest generated pseudo sample, in tokens (at most cutoff_len)"}
    )
    accumulate: bool = field(
        default=True,
        metadata={
            "help": "rehearse the pseudo samples of earlier boundaries again (false: only the fresh ones)"
        },
    )
    memory_per_task: int = field(
        default=200, metadata={"help": "most pseudo samples kept per imitated task (0: no cap)"}
    )

    def __post_init__(self) -> None:
        if self.lm_lambda < 0 or self.gen_ratio < 0:
            raise RetainError("config: lamol needs lm_lambda >= 0 and gen_ratio >= 0")
        if self.top_k < 1 or self.temperature <= 0 or self.max_new_tokens < 1:
            raise RetainError("config: lamol needs top_k >= 1, temperature > 0 and max_new_tokens >= 1")
        if self.memory_per_task < 0:
            raise RetainError("config: lamol.memory_per_task must be >= 0 (0: no cap)")


@register("lamol", config=LAMOLConfig)
class LAMOL(ContinualMethod):
    supports_images = False  # the LM generates text-only questions and answers
    """LAMOL: learn to answer and to generate tasks; rehearse self-generated pseudo samples."""

    config: LAMOLConfig
    refused_strategies = {
        "sharded-params": "it generates pseudo samples with the unwrapped model before each task; under "
        "FSDP / ZeRO-3 a process holds only a shard of each parameter outside the wrapped forward",
    }
    needs_previous_model_at_start = True  # generates from the model as the task starts

    def __init__(self, config: LAMOLConfig | None = None) -> None:
        super().__init__(config or LAMOLConfig())
        self.memory = pseudo.PseudoMemory()
        self.systems: dict[str, str | None] = {}
        # token ids of each training example -> its LM sequence's features; rebuilt by training_data
        self._lm_features: dict[tuple[int, ...], dict[str, list[int]]] = {}

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        per_task = self.config.memory_per_task or max(sizes.train_examples, default=0)
        return [example_memory(sizes, per_task * max(sizes.tasks - 1, 0), "pseudo-sample memory")]

    def training_data(self, ctx: MethodContext, task, data: list[Example]) -> list[Example]:
        own = pseudo.own_examples(data)
        self.systems[task.name] = own[0].system if own else None
        if ctx.task_index > 1 and self.config.gen_ratio > 0:
            fresh = self.generate_pseudo(ctx, task, len(own))
            if not self.config.accumulate:
                self.memory = pseudo.PseudoMemory()
            for source in dict.fromkeys(e.meta[pseudo.PSEUDO_FROM] for e in fresh):
                samples = [e for e in fresh if e.meta[pseudo.PSEUDO_FROM] == source]
                self.memory.add(source, samples, self.config.memory_per_task, ctx.rng(f"lamol:cap:{source}"))
            pseudo.write_jsonl(ctx, f"{ctx.task_index}-{task.name}", pseudo.rehearsed_records(self.memory))
        rehearsed = self.memory.examples()
        ctx.log("lamol/pseudo_examples", len(rehearsed))
        out = data + rehearsed
        self._index_lm_sequences(ctx, task, out)
        return out

    def generate_pseudo(self, ctx: MethodContext, task, size: int) -> list[Example]:
        """Sample ceil(gen_ratio * size) sequences after the [GEN] markers of tasks 1..t-1 and parse them."""
        previous = [t.name for t in ctx.tasks[: ctx.task_index - 1]]
        shares = pseudo.spread(pseudo.pseudo_count(self.config.gen_ratio, size), len(previous))
        prompts, sources = [], []
        for source, share in zip(previous, shares, strict=True):
            ids = pseudo.chat_prompt(ctx.tokenizer, gen_marker(source), self.systems.get(source))
            prompts += [ids] * share
            sources += [source] * share
        texts = pseudo.generate_texts(
            ctx,
            ctx.model,
            prompts,
            f"lamol: pseudo samples before task {ctx.task_index}",
            max_new_tokens=pseudo.token_limit(ctx, self.config.max_new_tokens),
            do_sample=True,
            top_k=self.config.top_k,
            temperature=self.config.temperature,
            seed=pseudo.sampling_seed(ctx, "lamol:generate"),
        )
        fresh, records = [], []
        for source, text in zip(sources, texts, strict=True):
            parsed = parse_generation(text)
            status = "unparsable"
            if parsed is not None:
                example = pseudo.pseudo_example(
                    *parsed, self.systems.get(source), source, "lamol", ctx.task_index
                )
                status = "too_long" if not pseudo.fits(ctx, example) else "kept"
                if status == "kept":
                    fresh.append(example)
            records.append({"from_task": source, "text": text, "status": status})
        for source in previous:
            kept = sum(1 for e in fresh if e.meta[pseudo.PSEUDO_FROM] == source)
            pseudo.log_kept(ctx, "lamol", source, kept, sources.count(source))
        pseudo.write_jsonl(ctx, f"{ctx.task_index}-{task.name}.candidates", records)
        return fresh

    def _index_lm_sequences(self, ctx: MethodContext, task, data: list[Example]) -> None:
        """Map each training example's token ids to the features of its generation sequence."""
        lm = [
            generation_example(e, e.meta.get(pseudo.PSEUDO_FROM) or e.meta.get("replayed_from") or task.name)
            for e in data
        ]
        self._lm_features = {
            tuple(qa["input_ids"]): gen for qa, gen in zip(ctx.encode(data), ctx.encode(lm), strict=True)
        }

    def loss(self, ctx: MethodContext, model, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        if self.config.lm_lambda == 0.0 or not self._lm_features:
            return outputs.loss
        features = []
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True):
            found = self._lm_features.get(tuple(t for t, m in zip(ids, mask, strict=True) if m))
            if found is not None:
                features.append(found)
        if not features:
            return outputs.loss
        device = batch["input_ids"].device
        lm_batch = {k: v.to(device) for k, v in ctx.collate(features).items()}
        # The unwrapped model: under DDP one wrapped forward per step, and the gradients of both terms
        # reach each parameter's accumulator once, so the all-reduce sees their sum.
        lm = ctx.forward(unwrap(model), lm_batch)
        ctx.log("lamol/lm_loss", lm.loss)
        return outputs.loss + self.config.lm_lambda * lm.loss

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(), "systems": dict(self.systems)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = pseudo.PseudoMemory()
        self.memory.load_state_dict(state.get("memory", {}))
        self.systems = dict(state.get("systems", {}))
        self._lm_features = {}
