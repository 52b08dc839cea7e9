"""SSR: Self-Synthesized Rehearsal (Huang et al., "Mitigating Catastrophic Forgetting in Large Language
Models with Self-Synthesized Rehearsal", ACL 2024).

After task k, `num_shots` real examples of it are kept. Before task t, for every earlier task k without
a memory yet: (1) the *base* model (LoRA adapters disabled) writes `candidates_per_task` synthetic inputs
by in-context learning from task k's demonstrations (sampling: temperature 0.9, top-p 0.6, repetition
penalty 1.2); (2) `memory_per_task` of them are selected for diversity: k-means (`n_clusters`, seeded,
k-means++ init) on L2-normalised features (the base model's mean-pooled last hidden states of the
input's prompt), each cluster's quota proportional to its size, the members nearest the centroid
first (with n_clusters >= memory_per_task: the input nearest each of memory_per_task centroids);
(3) the *latest* model (trained through task t-1) answers them greedily, refining the outputs.
Training set of task t: D_t plus the synthetic memories of tasks 1..t-1 (plain cross-entropy).

Deviations from the reference code (DeepLearnXMU/SSR): selection comes before refinement, which picks
the same inputs (the features are of the inputs only) and halves the refinement; the features are the
base model's own hidden states instead of a separately downloaded SimCSE encoder; the prompts use the
model's chat template rather than a raw-text one; inputs whose refined output is empty are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from retain.data.batching import left_pad
from retain.errors import RetainError
from retain.methods.base import MethodContext, RunSizes, StateItem, example_memory
from retain.methods.common import pseudo
from retain.methods.registry import register
from retain.models.adapters import peft_model


@dataclass
class SSRConfig:
    num_shots: int = field(
        default=2, metadata={"help": "real demonstrations kept per task and shown per prompt"}
    )
    candidates_per_task: int = field(
        default=400, metadata={"help": "synthetic inputs the base model writes per previous task"}
    )
    memory_per_task: int = field(
        default=200, metadata={"help": "synthetic samples selected (k-means) and kept per previous task"}
    )
    n_clusters: int = field(
        default=20,
        metadata={"help": "k-means clusters for the selection (>= memory_per_task: one per sample)"},
    )
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature of the synthetic inputs"})
    top_p: float = field(default=0.6, metadata={"help": "nucleus of the sampling of the synthetic inputs"})
    repetition_penalty: float = field(default=1.2, metadata={"help": "repetition penalty of that sampling"})
    max_new_tokens: int = field(
        default=128, metadata={"help": "longest synthetic input generation, in tokens (at most cutoff_len)"}
    )
    output_max_new_tokens: int = field(default=64, metadata={"help": "longest refined output, in tokens"})

    def __post_init__(self) -> None:
        counts = (self.num_shots, self.candidates_per_task, self.memory_per_task, self.n_clusters)
        if min(counts) < 1 or min(self.max_new_tokens, self.output_max_new_tokens) < 1:
            raise RetainError("config: ssr needs counts and token limits >= 1")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0 or self.repetition_penalty <= 0:
            raise RetainError("config: ssr needs temperature > 0, top_p in (0, 1] and repetition_penalty > 0")


def kmeans(x: torch.Tensor, k: int, seed: int, iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (seeded): (centroids [k, d], assignment [n])."""
    generator = torch.Generator().manual_seed(seed)
    x = x.detach().double().cpu()
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    nearest = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        weights = nearest if float(nearest.sum()) > 0 else torch.ones(n, dtype=x.dtype)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        centroids.append(x[pick])
        nearest = torch.minimum(nearest, (x - x[pick]).pow(2).sum(1))
    c = torch.stack(centroids)
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(iterations):
        new = c.clone()
        distance = (x - c[assign]).pow(2).sum(1)
        for j in range(k):
            members = assign == j
            if members.any():
                new[j] = x[members].mean(0)
            else:  # an empty cluster restarts at the point worst served by its centroid
                worst = int(distance.argmax())
                new[j] = x[worst]
                distance[worst] = 0
        new_assign = torch.cdist(x, new).argmin(1)
        c, converged = new, torch.equal(new_assign, assign)
        assign = new_assign
        if converged:
            break
    return c, assign


def _quotas(sizes: list[int], n: int) -> list[int]:
    """n split over clusters in proportion to their sizes (largest remainder), never above a size."""
    total = sum(sizes)
    exact = [n * s / total for s in sizes]
    quota = [int(e) for e in exact]
    for j in sorted(range(len(sizes)), key=lambda j: exact[j] - quota[j], reverse=True)[: n - sum(quota)]:
        quota[j] += 1
    return [min(q, s) for q, s in zip(quota, sizes, strict=True)]


def kmeans_select(features: torch.Tensor, n: int, n_clusters: int, seed: int) -> list[int]:
    """Indices of n diverse rows: k-means on L2-normalised features, then per cluster the rows nearest
    its centroid (quota proportional to the cluster's size; with n_clusters >= n, n clusters and one
    row each). Sorted; all rows when there are at most n."""
    m = features.shape[0]
    if n >= m:
        return list(range(m))
    x = F.normalize(features.detach().double().cpu(), dim=1)
    k = n if n_clusters >= n else n_clusters
    centroids, assign = kmeans(x, k, seed)
    distance = (x - centroids[assign]).pow(2).sum(1)
    clusters = [
        sorted((int(i) for i in (assign == j).nonzero().flatten()), key=lambda i: (float(distance[i]), i))
        for j in range(k)
    ]
    sizes = [len(c) for c in clusters]
    quotas = [min(1, s) for s in sizes] if k == n else _quotas(sizes, n)
    picked = [i for members, q in zip(clusters, quotas, strict=True) for i in members[:q]]
    if len(picked) < n:  # empty clusters or capped quotas: the nearest remaining rows fill the gap
        rest = sorted(set(range(m)) - set(picked), key=lambda i: (float(distance[i]), i))
        picked += rest[: n - len(picked)]
    return sorted(picked)


@torch.no_grad()
def prompt_features(
    model: torch.nn.Module, prompts: list[list[int]], pad_id: int, batch_size: int
) -> torch.Tensor:
    """Mean over each prompt's tokens of the model's last hidden states, [len(prompts), hidden] in fp32."""
    device = next(model.parameters()).device
    rows = []
    with pseudo.train_mode_kept(model):
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            ids, mask = left_pad(batch, pad_id)
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=position_ids.to(device),
                output_hidden_states=True,
                logits_to_keep=1,
                use_cache=False,
            )
            hidden = out.hidden_states[-1].float()
            weights = mask.to(device).unsqueeze(-1).float()
            rows.append(((hidden * weights).sum(1) / weights.sum(1)).cpu())
    return torch.cat(rows)


@register("ssr", config=SSRConfig)
class SSR(pseudo.DemoRehearsal):
    """SSR: the base model synthesizes inputs of earlier tasks, the latest model answers, k-means selects."""

    config: SSRConfig
    refused_strategies = {
        "sharded-params": "it generates synthetic inputs and answers with the unwrapped model before each "
        "task; under FSDP / ZeRO-3 a process holds only a shard of each parameter outside the wrapped "
        "forward",
    }
    supports_full_finetuning = False  # the base model is the LoRA model with its adapters disabled
    needs_previous_model_at_start = True  # the latest model, as the task starts, writes the outputs

    def __init__(self, config: SSRConfig | None = None) -> None:
        super().__init__(config or SSRConfig())

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        per_task = self.config.memory_per_task or max(sizes.train_examples, default=0)
        return [example_memory(sizes, per_task * max(sizes.tasks - 1, 0), "pseudo-sample memory")]

    def synthesize(self, ctx: MethodContext, source: str) -> list[dict[str, Any]]:
        """Synthesize, select and refine task `source`'s memory; returns one record per candidate."""
        model = peft_model(ctx.model)
        demos = self.demos[source]
        system = demos[0].system
        with model.disable_adapter():
            texts = pseudo.demo_generations(
                ctx,
                model,
                demos,
                self.config.candidates_per_task,
                f"ssr:{source}",
                f"ssr: inputs of {source} (base model)",
                max_new_tokens=pseudo.token_limit(ctx, self.config.max_new_tokens),
                stop_strings=["\n" + pseudo.DEMO_INPUT],
                do_sample=True,
                temperature=self.config.temperature,
                top_p=self.config.top_p,
                repetition_penalty=self.config.repetition_penalty,
            )
        records = [{"from_task": source, "text": t, "input": None, "output": None} for t in texts]
        inputs: dict[str, int] = {}  # input -> its first record
        for index, text in enumerate(texts):
            parsed = pseudo.parse_demo_completion(text, need_output=False)
            if parsed is None:
                records[index]["status"] = "unparsable"
                continue
            records[index]["input"] = parsed[0]
            if parsed[0] in inputs:
                records[index]["status"] = "duplicate"
            elif not pseudo.fits(ctx, pseudo.pseudo_example(parsed[0], "", system, source, "ssr", 0)):
                records[index]["status"] = "too_long"
            else:
                inputs[parsed[0]] = index
        candidates = list(inputs)
        prompts = [pseudo.chat_prompt(ctx.tokenizer, q, system) for q in candidates]
        chosen: list[int] = list(range(len(candidates)))
        if len(candidates) > self.config.memory_per_task:
            with model.disable_adapter():
                features = prompt_features(model, prompts, _pad_id(ctx.tokenizer), ctx.config.eval.batch_size)
            chosen = kmeans_select(
                features,
                self.config.memory_per_task,
                self.config.n_clusters,
                pseudo.sampling_seed(ctx, f"ssr:kmeans:{source}"),
            )
        for i in set(range(len(candidates))) - set(chosen):
            records[inputs[candidates[i]]]["status"] = "not_selected"
        answers = pseudo.generate_texts(
            ctx,
            model,
            [prompts[i] for i in chosen],
            f"ssr: refining outputs of {source} (latest model)",
            max_new_tokens=self.config.output_max_new_tokens,
        )
        kept = []
        for i, answer in zip(chosen, answers, strict=True):
            record = records[inputs[candidates[i]]]
            record["output"] = answer
            record["status"] = "kept" if answer else "empty_output"
            if answer:
                kept.append(
                    pseudo.pseudo_example(candidates[i], answer, system, source, "ssr", ctx.task_index)
                )
        pseudo.log_kept(ctx, "ssr", source, len(kept), len(texts))
        self.memory.add(source, kept, self.config.memory_per_task, ctx.rng(f"ssr:cap:{source}"))
        return records


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
