"""I-LoRA: interpolation-based LoRA with a fast and a slow learner and experience replay (Ren et al., 2024,
"Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning", arXiv 2402.18865, ICASSP
2025; github which47/LLMCL, `method/ILORA.py`).

The fast adapter ('default') is trained; the slow adapter ('ema') follows it after every optimizer step:
theta_slow <- a * theta_slow + (1 - a) * theta_fast, with a = min(1 - 1/(step + 1), ema_alpha).
From task 2 on, each step also draws a batch x_b from a replay buffer of earlier tasks and minimises
L = (L_task + L_CE(x_b)) / 2 + gamma * mean_layers MSE(h_fast(x_b), max(h_fast(x_b), h_slow(x_b))),
the hidden states of every layer (embeddings included) compared on the real tokens of x_b.
Each micro-batch's replay draw is seeded by its place in the task's stream of micro-batches over all
processes (rank r's i-th micro-batch is the (i x processes + r)-th, as accelerate deals batches to ranks),
so two processes replay what one process with the same global batch replays, and a resume the same.
The slow adapter is the one evaluated (set `eval_adapter: fast` to evaluate the fast one).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from retain.data.formats import Example
from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem, example_memory
from retain.methods.common.memory import draw_evenly, reservoir_sample
from retain.methods.common.pseudo import own_examples
from retain.methods.common.sharding import DEEPSPEED_UNVERIFIED
from retain.methods.registry import register
from retain.models.adapters import activate_adapters, adapter_state, add_adapter, peft_model, unwrap
from retain.models.forward import StepOutputs, forward_with_weights, response_forward_with_hidden

if TYPE_CHECKING:
    from retain.data.streams import Task

FAST, SLOW = "default", "ema"


@dataclass
class ILoRAConfig:
    ema_alpha: float = field(
        default=0.25,
        metadata={
            "help": "weight a of the slow adapter's old value in slow <- a*slow + (1-a)*fast, capped by the "
            "warm-up 1 - 1/(step+1) (LLMCL: 0.25)"
        },
    )
    consistency_weight: float = field(
        default=1.0, metadata={"help": "weight gamma of the hidden-state consistency loss (LLMCL: 1.0)"}
    )
    buffer_size: int = field(
        default=500, metadata={"help": "replay buffer size, shared evenly by the tasks seen so far"}
    )
    replay_batch_size: int = field(
        default=0, metadata={"help": "buffer samples drawn per step (0: the training micro-batch size)"}
    )
    eval_adapter: Literal["slow", "fast"] = field(
        default="slow", metadata={"help": "adapter evaluated: 'slow' (the EMA, as in the paper) or 'fast'"}
    )
    seed: int = field(
        default=0,
        metadata={"help": "extra seed of the buffer's reservoir and of the draws (mixed with the run seed)"},
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_alpha < 1.0:
            raise RetainError(f"config: method.ema_alpha must be in [0, 1), got {self.ema_alpha}")
        if self.consistency_weight < 0 or self.buffer_size <= 0 or self.replay_batch_size < 0:
            raise RetainError(
                "config: ilora needs consistency_weight >= 0, buffer_size > 0 and replay_batch_size >= 0"
            )


def consistency_loss(
    fast: tuple[torch.Tensor, ...], slow: tuple[torch.Tensor, ...], mask: torch.Tensor
) -> torch.Tensor:
    """Mean over layers of MSE(h_fast, max(h_fast, h_slow)) on the positions where `mask` is set."""
    terms = []
    for h_fast, h_slow in zip(fast, slow, strict=True):
        h_fast, h_slow = h_fast[mask].float(), h_slow[mask].float()
        # max(h_fast, h_slow) as a constant target: the loss only pulls h_fast up where it is below h_slow.
        terms.append(F.mse_loss(h_fast, torch.maximum(h_fast.detach(), h_slow)))
    return torch.stack(terms).mean()


@register("ilora", config=ILoRAConfig)
class ILoRA(ContinualMethod):
    """I-LoRA: a fast LoRA, a slow EMA LoRA (evaluated), and hidden-state consistency on replayed samples."""

    config: ILoRAConfig
    supports_full_finetuning = False
    decides_eval_model = True
    adds_adapters = True  # the slow adapter
    refused_strategies = {
        "sharded-params": "the slow learner's forward puts the slow adapter's weights in place of the fast "
        "one's (functional_call), and the EMA mixes the two adapters outside the forward; under FSDP / "
        "ZeRO-3 a process holds shards, which those calls do not gather",
        "deepspeed": DEEPSPEED_UNVERIFIED,
    }

    def __init__(self, config: ILoRAConfig | None = None) -> None:
        super().__init__(config or ILoRAConfig())
        self.memory: dict[str, list[Example]] = {}
        self.features: list[list[dict]] = []  # the buffer, encoded, one list per task
        self.fast: list[nn.Parameter] = []  # the fast adapter's tensors, in the order of `slow`
        self.slow: list[nn.Parameter] = []
        self.slow_weights: dict[str, nn.Parameter] = {}  # fast parameter name -> its slow counterpart
        self.step = 0
        self.micro_batches = 0  # micro-batches this rank has trained on in the current task

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        return [
            StateItem("slow (EMA) adapter", sizes.trainable_params),
            example_memory(sizes, min(self.config.buffer_size, sum(sizes.train_examples)), "replay buffer"),
        ]

    def _rng(self, ctx: MethodContext, salt: str) -> random.Random:
        return ctx.rng(f"ilora:{self.config.seed}:{salt}")

    def setup(self, ctx: MethodContext) -> None:
        if SLOW not in peft_model(ctx.model).peft_config:
            add_adapter(ctx.model, SLOW, init_from=FAST)
        activate_adapters(ctx.model, active=[FAST], trainable=[FAST])

    def before_task(self, ctx: MethodContext, task: Task) -> None:
        activate_adapters(ctx.model, active=[FAST], trainable=[FAST])
        slow = adapter_state(ctx.model, SLOW)
        fast = adapter_state(ctx.model, FAST)
        self.slow_weights = {name: slow[name.replace(f".{FAST}.", f".{SLOW}.")] for name in fast}
        self.fast, self.slow = list(fast.values()), list(self.slow_weights.values())
        self.step = self.micro_batches = 0
        self.features = [ctx.encode(examples) for examples in self.memory.values()]

    def draw(self, ctx: MethodContext, size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """A batch from the buffer for this rank's next micro-batch, spread evenly over the tasks (in a
        random order, so that a batch smaller than the number of tasks does not favour the first ones)."""
        index = self.micro_batches * ctx.world_size + ctx.rank  # its place among all ranks' micro-batches
        self.micro_batches += 1
        rng = self._rng(ctx, f"draw:{index}")
        memories = rng.sample(self.features, len(self.features))
        features = draw_evenly(memories, self.config.replay_batch_size or size, rng)
        return {k: v.to(device) for k, v in ctx.collate(features).items()}

    def buffer_terms(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(response cross-entropy of the fast adapter, consistency loss) on a buffer batch."""
        outputs, fast_hidden = response_forward_with_hidden(unwrap(model), batch)
        # The slow learner: the same forward with the fast adapter's weights replaced by the slow ones.
        slow = forward_with_weights(model, self.slow_weights, batch, keep=1, output_hidden_states=True)
        cons = consistency_loss(fast_hidden, slow.hidden_states, batch["attention_mask"].bool())
        return outputs.loss, cons

    def loss(self, ctx: MethodContext, model: nn.Module, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        if not self.features:
            return outputs.loss
        buffer = self.draw(ctx, batch["input_ids"].shape[0], batch["input_ids"].device)
        ce, cons = self.buffer_terms(model, buffer)
        ctx.log("ilora/buffer_ce", ce)
        ctx.log("ilora/consistency", cons)
        return (outputs.loss + ce) / 2 + self.config.consistency_weight * cons

    def after_optimizer_step(self, ctx: MethodContext, model: nn.Module) -> None:
        self.step += 1
        a = min(1.0 - 1.0 / (self.step + 1), self.config.ema_alpha)
        with torch.no_grad():
            # slow <- slow + (1 - a) (fast - slow) = a slow + (1 - a) fast, all tensors in one call
            torch._foreach_lerp_(self.slow, self.fast, 1.0 - a)
        ctx.log("ilora/ema_alpha", a)

    def after_task(self, ctx: MethodContext, task: Task, data: list[Example]) -> None:
        """Give the new task its share of the buffer; earlier tasks keep a uniform subsample of theirs.
        Only the task's own examples enter its share: in a combination (`plus`), `data` may also hold
        earlier tasks' replayed (`replayed_from`) or pseudo (`pseudo_from`) samples, which are left out
        (as replay.py does)."""
        names = [*[n for n in self.memory if n != task.name], task.name]
        shares = {
            n: self.config.buffer_size // len(names) + (i < self.config.buffer_size % len(names))
            for i, n in enumerate(names)
        }
        rng = self._rng(ctx, "reservoir")
        for name in names[:-1]:
            if len(self.memory[name]) > shares[name]:
                self.memory[name] = rng.sample(self.memory[name], shares[name])
        self.memory[task.name] = reservoir_sample(own_examples(data), shares[task.name], rng)
        ctx.log("ilora/buffer_examples", sum(len(m) for m in self.memory.values()))

    def active(self) -> str:
        return SLOW if self.config.eval_adapter == "slow" else FAST

    def eval_model(self, ctx: MethodContext, task: Task) -> nn.Module:
        activate_adapters(ctx.model, active=[self.active()], trainable=[])
        return ctx.model

    def restore(self, ctx: MethodContext) -> None:
        activate_adapters(ctx.model, active=[self.active()], trainable=[])

    def state_dict(self) -> dict[str, Any]:
        return {"memory": {t: [e.to_dict() for e in examples] for t, examples in self.memory.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = {
            t: [Example.from_dict(r) for r in records] for t, records in state.get("memory", {}).items()
        }
