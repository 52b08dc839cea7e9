"""GeRe: general-sample replay with a threshold-based margin loss (Zhang et al., "GeRe: Towards Efficient
Anti-Forgetting in Continual Learning of LLM via General Samples Replay", arXiv 2508.04676, 2025;
github Qznan/GeRe, gere/gere_trainer.py: GeRePresaveCallback, GeReTrainer.compute_gere_loss).

A small fixed set of general samples is replayed at every step. Before the first update, the base model
(adapters disabled) records the last-layer hidden states h0 (hidden_states[-1], after the final norm) of
every general sample; their per-dimension mean mu and standard deviation sigma over all tokens give the
thresholds pos = mu + sigma, neg = mu - sigma. On each training micro-batch a batch of general samples is
forwarded too, and with the current last-layer states h on their tokens (attention mask):
  l = 1[h0 <= neg] relu(h - neg) + 1[neg < h0 < pos] (relu(h - pos) + relu(neg - h))
      + 1[h0 >= pos] relu(pos - h)                          (per token and dimension)
  L_TM = sum l / (#{l != 0} + 1e-8)                       (the mean over the violating entries)
  L = (L_task + L_general) / 2 + w L_TM,   w = tm_weight, or L_CE / L_TM each step (dynamic_weight)
so activations that were low must stay at most neg, high ones at least pos, the rest inside the band:
L_TM is 0 while the model's states keep the base model's side of both thresholds. L_general is the
training loss on the general samples (the answer tokens of instruction pairs, every token of plain text).

The weight: tm_weight defaults to 1, not the reference's default 100 (used with Llama-3.1-8B and 563-token
SlimPajama texts). On the quickstart stream (SmolLM2-135M, LoRA, 80 steps at lr 1e-3, the 62 built-in
pairs), parity after task 1, with sequential fine-tuning at 100%, measured (one seed, 48 test prompts):
w = 100: 37.5%, dynamic_weight (w settled at about 30-90): 54.2%, w = 1: 68.8%, w = 0 (general CE
only): 83.3%. The margin term costs plasticity at every weight, and the reference's dynamic weight makes
w L_TM as large as the cross-entropy, so it does not fix this; a larger w protects more and learns less.

Storage: the loss needs only which side of the two thresholds each h0 entry lies on, so instead of the
reference's fp32 states (about 9 GB for 1,000 samples of Llama-3.1-8B) each (token, dimension) entry keeps a
2-bit code (bit 0: h0 <= neg, bit 1: h0 >= pos), four codes per byte: ceil(hidden/4) bytes per token, e.g.
1 KiB per token and about 0.55 MiB per 563-token sample for hidden size 4096 (8x smaller than fp16 states),
plus mu and sigma (2 x hidden fp32) once. The codes, the thresholds and the encoded samples are part of the
method state, saved with every task, so a resumed run uses exactly the recorded states.

General samples: `general_samples` points to a JSONL (or JSON list) file of alpaca records
(instruction/input/output) or plain texts ({"text": ...}); without it, 62 short instruction/answer pairs
shipped with retain (retain/data/general_samples.jsonl) are used. Only the first `num_samples` are kept
(the reference replays the first 1,000 SlimPajama texts); samples whose prompt does not fit
train.cutoff_len are skipped. Every rank records all the samples and draws its own general batches.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from torch import nn

from retain.data.encode import encode_example
from retain.data.formats import parse_alpaca
from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext
from retain.methods.common.activation_codes import margin_loss, pack_codes, threshold_codes, unpack_codes
from retain.methods.registry import register
from retain.models.adapters import base_model, unwrap
from retain.models.forward import StepOutputs, hidden_states, response_forward_with_hidden

logger = logging.getLogger(__name__)

DEFAULT_SAMPLES = "general_samples.jsonl"  # in the retain.data package


@dataclass
class GeReConfig:
    general_samples: str = field(
        default="",
        metadata={
            "help": "JSONL/JSON file of general samples: alpaca records or {'text': ...}; "
            "empty: the 62 instruction/answer pairs shipped with retain"
        },
    )
    num_samples: int = field(
        default=1000, metadata={"help": "use at most this many general samples (the first ones of the file)"}
    )
    general_batch_size: int = field(
        default=2, metadata={"help": "general samples forwarded with every training micro-batch"}
    )
    tm_weight: float = field(
        default=1.0, metadata={"help": "weight w of the threshold-margin loss (the reference: 100)"}
    )
    dynamic_weight: bool = field(
        default=False,
        metadata={"help": "w = L_CE / L_TM at each step, the reference's 'dy' strategy (tm_weight unused)"},
    )
    record_batch_size: int = field(
        default=8, metadata={"help": "general samples per forward when recording the base model's states"}
    )

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.general_batch_size < 1 or self.record_batch_size < 1:
            raise RetainError(
                "config: gere needs num_samples >= 1, general_batch_size >= 1 and record_batch_size >= 1"
            )
        if self.tm_weight < 0:
            raise RetainError(f"config: gere tm_weight must be >= 0, got {self.tm_weight}")
        if self.general_samples and not os.path.isfile(self.general_samples):
            raise RetainError(
                f"config: gere general_samples '{self.general_samples}' is not a file; give the path of a "
                "JSONL file of alpaca records or {'text': ...} lines, or leave it empty for the built-in set"
            )


# --- general samples -----------------------------------------------------------------------------------


def read_general_samples(path: str = "") -> list[dict[str, Any]]:
    """The records of a general-sample file (JSONL, or a JSON list); the built-in set when `path` is empty."""
    if path:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        source = path
    else:
        text = resources.files("retain.data").joinpath(DEFAULT_SAMPLES).read_text(encoding="utf-8")
        source = f"retain/data/{DEFAULT_SAMPLES}"
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RetainError(f"{source}: line {number} is not JSON ({exc.msg})") from None
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not (
            isinstance(record.get("text"), str) or "instruction" in record
        ):
            raise RetainError(
                f"{source}: record {index} is neither an alpaca record (instruction/input/output) "
                "nor a plain text ({'text': ...})"
            )
    if not records:
        raise RetainError(f"{source}: no general samples")
    return records


def encode_general(tokenizer: Any, records: list[dict], cutoff_len: int, source: str) -> list[dict]:
    """Training features: alpaca records through the chat template (loss on the answer), plain texts as
    raw tokens with a loss on every token (as the reference's LM loss on SlimPajama texts). Records whose
    prompt does not fit `cutoff_len` are skipped."""
    features, skipped = [], 0
    for index, record in enumerate(records):
        if "instruction" not in record:
            ids = list(tokenizer(record["text"], add_special_tokens=False)["input_ids"])[:cutoff_len]
            if len(ids) > 1:
                features.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * len(ids)})
            continue
        example = parse_alpaca(record, {}, source, index)
        try:
            features.append(encode_example(tokenizer, example, cutoff_len, source))
        except RetainError:
            skipped += 1
    if skipped:
        logger.warning("gere: %d general samples of %s skipped (prompt >= cutoff_len)", skipped, source)
    if not features:
        raise RetainError(f"{source}: no general sample fits cutoff_len={cutoff_len}; raise train.cutoff_len")
    return features


# --- the method ------------------------------------------------------------------------------------------


@register("gere", config=GeReConfig)
class GeRe(ContinualMethod):
    """GeRe: replay of fixed general samples with a margin loss on the base model's last-layer states."""

    config: GeReConfig
    refused_strategies = {
        "sharded-params": "it records the base model's hidden states with its own forward passes outside "
        "the training step; under FSDP / ZeRO-3 those need every process in step and the full parameters, "
        "which no run has checked",
    }

    def __init__(self, config: GeReConfig | None = None) -> None:
        super().__init__(config or GeReConfig())
        self.features: list[dict[str, list[int]]] = []  # encoded general samples
        self.codes: list[torch.Tensor] = []  # per sample [tokens, ceil(H/4)] uint8 packed codes (CPU)
        self.mean: torch.Tensor | None = None  # [H] fp32 statistics of the base model's states
        self.std: torch.Tensor | None = None
        self.order: list[int] = []
        self.draws: random.Random | None = None
        self.report_memory = True

    @property
    def recorded(self) -> bool:
        return self.mean is not None

    def state_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.codes)

    def before_task(self, ctx: MethodContext, task) -> None:
        if not self.features:
            records = read_general_samples(self.config.general_samples)[: self.config.num_samples]
            source = self.config.general_samples or DEFAULT_SAMPLES
            self.features = encode_general(ctx.tokenizer, records, ctx.config.train.cutoff_len, source)
        self.draws = ctx.rng(f"gere:draw:{ctx.rank}")  # each rank replays different samples
        self.order = []
        self.report_memory = True

    def _base_states(self, ctx: MethodContext, model: nn.Module, device: torch.device):
        """The [tokens, H] fp32 last-layer states of each general sample (no padding), from the base model."""
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.bf16)
        size = self.config.record_batch_size
        with base_model(model) as inner, autocast:
            for start in range(0, len(self.features), size):
                chunk = self.features[start : start + size]
                batch = {k: v.to(device) for k, v in ctx.collate(chunk).items()}
                hidden = hidden_states(inner, batch)[-1]
                for row, feature in zip(hidden, chunk, strict=True):
                    yield row[row.shape[0] - len(feature["input_ids"]) :].float()

    @torch.no_grad()
    def record(self, ctx: MethodContext, model: nn.Module, device: torch.device) -> None:
        """mu, sigma per dimension of the base model's last-layer states over all general-sample tokens,
        then the states' codes. Two passes, so that no more than one batch of fp32 states is ever held."""
        total = square = None
        tokens = 0
        for state in self._base_states(ctx, model, device):
            state = state.double()
            total = state.sum(dim=0) + (0 if total is None else total)
            square = state.pow(2).sum(dim=0) + (0 if square is None else square)
            tokens += state.shape[0]
        mean = total / tokens
        std = (square / tokens - mean.pow(2)).clamp(min=0).sqrt()  # population std, as the reference
        self.mean, self.std = mean.float().cpu(), std.float().cpu()
        neg, pos = (self.mean - self.std).to(device), (self.mean + self.std).to(device)
        self.codes = [
            pack_codes(threshold_codes(s, neg, pos)).cpu() for s in self._base_states(ctx, model, device)
        ]
        logger.info(
            "gere: recorded %d general samples (%d tokens): %.1f KiB of codes per sample, %.2f MiB in all",
            len(self.codes),
            tokens,
            self.state_bytes() / len(self.codes) / 1024,
            self.state_bytes() / 2**20,
        )

    def draw(self, ctx: MethodContext, device: torch.device) -> tuple[dict, torch.Tensor]:
        """The next general batch (a shuffled pass over the samples, then another) and its unpacked codes."""
        picked = []
        for _ in range(min(self.config.general_batch_size, len(self.features))):
            if not self.order:
                self.order = self.draws.sample(range(len(self.features)), len(self.features))
            picked.append(self.order.pop())
        batch = ctx.collate([self.features[i] for i in picked])
        length = batch["input_ids"].shape[1]
        packed = torch.zeros(len(picked), length, self.codes[0].shape[-1], dtype=torch.uint8)
        for row, i in enumerate(picked):
            packed[row, length - len(self.codes[i]) :] = self.codes[i]  # left padding, as collate
        batch = {k: v.to(device) for k, v in batch.items()}
        return batch, unpack_codes(packed.to(device), self.mean.numel())

    def loss(self, ctx: MethodContext, model: nn.Module, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        device = batch["input_ids"].device
        if not self.recorded:
            # At the first step the weights are still the base model's (and on the training device).
            self.record(ctx, model, device)
        if self.report_memory:  # once per task, so the training log shows what the states cost
            ctx.log("gere/codes_kib_per_sample", self.state_bytes() / len(self.codes) / 1024)
            self.report_memory = False
        general, codes = self.draw(ctx, device)
        out, hidden = response_forward_with_hidden(unwrap(model), general)
        mean, std = self.mean.to(device), self.std.to(device)
        tm = margin_loss(hidden[-1], codes, mean - std, mean + std, general["attention_mask"])
        ce = (outputs.loss + out.loss) / 2
        weight = ce.detach() / (tm.detach() + 1e-8) if self.config.dynamic_weight else self.config.tm_weight
        ctx.log("gere/general_ce", out.loss)
        ctx.log("gere/tm", tm)
        if self.config.dynamic_weight:
            ctx.log("gere/tm_weight", weight)
        return ce + weight * tm

    def state_dict(self) -> dict[str, Any]:
        if not self.recorded:
            return {}
        return {"features": self.features, "codes": self.codes, "mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.features = list(state.get("features", []))
        self.codes = list(state.get("codes", []))
        self.mean, self.std = state.get("mean"), state.get("std")
