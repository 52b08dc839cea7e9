"""Shared pieces of the generative rehearsal methods (lamol, pseudo_replay, ssr).

A pseudo sample is an ordinary `Example` (user question, assistant answer, the source task's system
prompt) whose meta names the task it imitates (`pseudo_from`). The pieces here: the capped per-task
memory kept in a method's state_dict, in-context demonstration prompts and the parser of their
completions, the checks that keep generated samples trainable (no prompt longer than cutoff_len), the
seeds and precision of generation, and the JSONL files that show what was generated and rehearsed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from collections.abc import Iterator
from typing import Any

import torch

from retain.data.encode import encode_prompt
from retain.data.formats import Example
from retain.evaluation.generate import generate
from retain.io import write_text_atomic
from retain.methods.base import ContinualMethod, MethodContext
from retain.models.adapters import unwrap

logger = logging.getLogger(__name__)

PSEUDO_FROM = "pseudo_from"  # meta key: the task a pseudo sample imitates
DEMO_INPUT = "Input:"
DEMO_OUTPUT = "Output:"
DEMO_INSTRUCTION = (
    "Create a new example of the task shown by the examples below: a new input and its correct output, "
    "in the same format."
)


def is_rehearsal(example: Example) -> bool:
    """Whether an example was added by a rehearsal method (pseudo sample or replayed real sample)."""
    return PSEUDO_FROM in example.meta or "replayed_from" in example.meta


def own_examples(data: list[Example]) -> list[Example]:
    """The task's own examples in a training set that rehearsal may have extended."""
    return [e for e in data if not is_rehearsal(e)]


def question_of(example: Example) -> str:
    """The last user turn of an example (earlier turns of a multi-turn example are not rehearsed)."""
    users = [m["content"] for m in example.messages[:-1] if m["role"] == "user"]
    return users[-1] if users else ""


def pseudo_example(
    question: str, answer: str, system: str | None, source: str, method: str, made_before: int
) -> Example:
    """A single-turn pseudo sample of task `source`, generated before task `made_before`."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Example(messages, system, {PSEUDO_FROM: source, "method": method, "made_before_task": made_before})


def chat_prompt(tokenizer: Any, user: str, system: str | None) -> list[int]:
    """Token ids of the generation prompt for one user turn, exactly as evaluation encodes prompts."""
    return encode_prompt(
        tokenizer, Example([{"role": "user", "content": user}, {"role": "assistant", "content": ""}], system)
    )


def fits(ctx: MethodContext, example: Example) -> bool:
    """Whether the example's prompt leaves room for its answer within cutoff_len (else encoding fails)."""
    return len(encode_prompt(ctx.tokenizer, example, ctx.processor)) < ctx.config.train.cutoff_len


def format_demo(example: Example) -> str:
    return f"{DEMO_INPUT} {question_of(example)}\n{DEMO_OUTPUT} {example.reference}"


def demo_prompt(tokenizer: Any, demos: list[Example], rng: random.Random) -> list[int]:
    """An in-context prompt: the instruction, the demos in a seeded random order, then the assistant's
    answer opened with "Input:" so that the completion is a new example in the demos' format."""
    order = rng.sample(demos, len(demos))
    user = DEMO_INSTRUCTION + "\n\n" + "\n\n".join(format_demo(d) for d in order)
    return chat_prompt(tokenizer, user, None) + list(
        tokenizer(DEMO_INPUT, add_special_tokens=False)["input_ids"]
    )


def parse_demo_completion(text: str, need_output: bool = True) -> tuple[str, str] | None:
    """(input, output) from the completion of `demo_prompt` ("<input>\\nOutput: <output>"), or None.

    The "Output:" marker must be there (the model followed the format); what follows a further "Input:"
    (the model went on with another example) is dropped. With need_output=False an empty output is
    accepted (SSR rewrites outputs anyway).
    """
    if DEMO_OUTPUT not in text:
        return None
    question, _, rest = text.partition(DEMO_OUTPUT)
    question = question.strip()
    answer = rest.split(DEMO_INPUT)[0].strip()
    if not question or DEMO_INPUT in question or (need_output and not answer):
        return None
    return question, answer


def pick_demos(data: list[Example], k: int, rng: random.Random) -> list[Example]:
    """k of the task's own examples (seeded), kept as in-context demonstrations for later generation."""
    own = own_examples(data)
    return [own[i] for i in sorted(rng.sample(range(len(own)), min(k, len(own))))]


def generate_texts(
    ctx: MethodContext, model: torch.nn.Module, prompts: list[list[int]], desc: str, **options: Any
) -> list[str]:
    """Completions of `prompts` by `model` through retain's batched generator (progress bar, the run's
    precision and eval batch size), identical on every rank (rank 0's)."""
    if not prompts:
        return []
    with generation_precision(ctx):
        texts = generate(
            unwrap(model), ctx.tokenizer, prompts, batch_size=ctx.config.eval.batch_size, desc=desc, **options
        )
    return same_on_all_ranks(texts)


def demo_generations(
    ctx: MethodContext,
    model: torch.nn.Module,
    demos: list[Example],
    n: int,
    salt: str,
    desc: str,
    **options: Any,
) -> list[str]:
    """n completions of in-context prompts built from `demos` (a seeded order per prompt)."""
    rng = ctx.rng(f"{salt}:order")
    prompts = [demo_prompt(ctx.tokenizer, demos, rng) for _ in range(n)]
    return generate_texts(ctx, model, prompts, desc, seed=sampling_seed(ctx, salt), **options)


def spread(n: int, parts: int) -> list[int]:
    """n split into `parts` shares that differ by at most one (the first ones get the remainder)."""
    if parts <= 0:
        return []
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def pseudo_count(ratio: float, size: int) -> int:
    """ceil(ratio x size), as LAMOL's gamma x |D_t|."""
    return math.ceil(ratio * size - 1e-9)


def token_limit(ctx: MethodContext, max_new_tokens: int) -> int:
    """Generation length, at most cutoff_len: a longer sample could not be trained whole anyway."""
    return min(max_new_tokens, ctx.config.train.cutoff_len)


def sampling_seed(ctx: MethodContext, salt: str) -> int:
    """A generation seed from (run seed, task index, salt): the same on every rank and on resume."""
    return ctx.rng(salt).randrange(2**31)


def generation_precision(ctx: MethodContext) -> contextlib.AbstractContextManager:
    """bf16 autocast when the run trains and evaluates in bf16, as evaluation generates."""
    if ctx.bf16:
        return torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def same_on_all_ranks(obj: Any) -> Any:
    """Rank 0's value on every rank, so all ranks train on the same pseudo samples."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


@contextlib.contextmanager
def train_mode_kept(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block, the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def write_jsonl(ctx: MethodContext, name: str, records: list[dict[str, Any]]) -> str | None:
    """Write `<run_dir>/pseudo/<name>.jsonl` atomically on rank 0; returns the path (None: no run dir)."""
    if ctx.run_dir is None or ctx.rank != 0:
        return None
    path = os.path.join(ctx.run_dir, "pseudo", f"{name}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def log_kept(ctx: MethodContext, method: str, source: str, kept: int, total: int) -> None:
    """Log how many generations became pseudo samples (what the parser and the length check kept)."""
    fraction = kept / total if total else 0.0
    ctx.log(f"{method}/kept_fraction", fraction)
    logger.info(
        "%s: %d of %d generations for task %s kept (%.0f%%)", method, kept, total, source, 100 * fraction
    )
    if total and not kept:
        # Nothing to rehearse: the run silently degrades to sequential fine-tuning for this task.
        logger.warning(
            "%s: none of %d generations for task %s could be parsed, so it is not rehearsed (the model "
            "no longer follows the demonstration format); the candidates.jsonl files under pseudo/ show "
            "what it wrote",
            method,
            total,
            source,
        )


class PseudoMemory:
    """Pseudo samples per source task, in task order, capped at `cap` per task (0: no cap)."""

    def __init__(self) -> None:
        self.items: dict[str, list[Example]] = {}

    def __contains__(self, task: str) -> bool:
        return task in self.items

    def add(self, task: str, examples: list[Example], cap: int, rng: random.Random) -> None:
        """Append to task's memory; over the cap, keep a seeded uniform subset (in its order)."""
        merged = self.items.get(task, []) + list(examples)
        if cap and len(merged) > cap:
            keep = sorted(rng.sample(range(len(merged)), cap))
            merged = [merged[i] for i in keep]
        self.items[task] = merged

    def examples(self) -> list[Example]:
        return [e for items in self.items.values() for e in items]

    def sizes(self) -> dict[str, int]:
        return {task: len(items) for task, items in self.items.items()}

    def state_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {task: [e.to_dict() for e in items] for task, items in self.items.items()}

    def load_state_dict(self, state: dict[str, list[dict[str, Any]]]) -> None:
        self.items = {task: [Example.from_dict(r) for r in records] for task, records in state.items()}


def rehearsed_records(memory: PseudoMemory) -> list[dict[str, Any]]:
    """One JSONL record per rehearsed pseudo sample."""
    return [e.to_dict() for e in memory.examples()]


class DemoRehearsal(ContinualMethod):
    """Base of pseudo_replay and ssr: keep `config.num_shots` demonstrations of each task after it, and
    before task t fill the pseudo memory of every earlier task that has none (`synthesize`); task t
    trains on D_t plus all pseudo memories. Demonstrations and memories live in the state_dict."""

    supports_images = False  # the generator writes text-only inputs from text demonstrations

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.demos: dict[str, list[Example]] = {}
        self.memory = PseudoMemory()

    def synthesize(self, ctx: MethodContext, source: str) -> list[dict[str, Any]]:
        """Fill task `source`'s memory from self.demos[source]; returns one JSONL record per generation."""
        raise NotImplementedError

    def training_data(self, ctx: MethodContext, task, data: list[Example]) -> list[Example]:
        previous = [t.name for t in ctx.tasks[: ctx.task_index - 1] if t.name in self.demos]
        missing = [name for name in previous if name not in self.memory]
        if missing:
            records: list[dict[str, Any]] = []
            for source in missing:
                records += self.synthesize(ctx, source)
            write_jsonl(ctx, f"{ctx.task_index}-{task.name}.candidates", records)
            write_jsonl(ctx, f"{ctx.task_index}-{task.name}", rehearsed_records(self.memory))
        rehearsed = self.memory.examples()
        ctx.log(f"{self.name}/pseudo_examples", len(rehearsed))
        return data + rehearsed

    def after_task(self, ctx: MethodContext, task, data: list[Example]) -> None:
        self.demos[task.name] = pick_demos(data, self.config.num_shots, ctx.rng(f"{self.name}:demos"))

    def state_dict(self) -> dict[str, Any]:
        return {
            "demos": {t: [e.to_dict() for e in demos] for t, demos in self.demos.items()},
            "memory": self.memory.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.demos = {t: [Example.from_dict(r) for r in rs] for t, rs in state.get("demos", {}).items()}
        self.memory = PseudoMemory()
        self.memory.load_state_dict(state.get("memory", {}))
