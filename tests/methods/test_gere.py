"""GeRe: general samples in every step and a margin loss on the base model's last-layer states."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import TrainingArguments

from retain.config import config_from_dict
from retain.data.batching import FeatureDataset
from retain.engine.loop import run_experiment
from retain.engine.trainer import ContinualTrainer
from retain.errors import RetainError
from retain.methods.common.activation_codes import margin_loss, pack_codes, threshold_codes, unpack_codes
from retain.methods.gere import GeRe, GeReConfig, encode_general, read_general_samples
from retain.methods.registry import create_method
from retain.models.adapters import trainable_parameters

from ..helpers import tiny_config, tiny_context


def test_margin_loss_is_zero_at_the_base_states_and_measures_crossings():
    neg, pos = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    # One sequence of 3 tokens, 2 dimensions: low, inside and high entries of the base model.
    base = torch.tensor([[[-2.0, 0.0], [2.0, 0.5], [0.0, -3.0]]])
    codes = threshold_codes(base, neg, pos)
    assert codes.tolist() == [[[1, 0], [2, 0], [0, 1]]]
    mask = torch.ones(1, 3)
    assert margin_loss(base, codes, neg, pos, mask) == 0
    # Moving within one's own side of the thresholds costs nothing.
    assert margin_loss(torch.tensor([[[-9.0, 0.9], [7.0, -0.9], [0.2, -1.0]]]), codes, neg, pos, mask) == 0
    # Crossings: low -2 -> -0.5 (0.5 above neg), inside 0.5 -> 1.3 (0.3 above pos), high 2 -> 0.4 (0.6 below
    # pos): the loss is the mean over the violating entries, (0.5 + 0.3 + 0.6) / 3.
    drifted = torch.tensor([[[-0.5, 0.0], [0.4, 1.3], [0.0, -3.0]]])
    assert margin_loss(drifted, codes, neg, pos, mask).item() == pytest.approx(1.4 / 3, abs=1e-6)
    # An inside entry that leaves the band downwards, and padding (mask 0) that never counts.
    drifted[0, 2, 0] = -1.5
    assert margin_loss(drifted, codes, neg, pos, mask).item() == pytest.approx(1.9 / 4, abs=1e-6)
    mask[0, 0] = 0
    assert margin_loss(drifted, codes, neg, pos, mask).item() == pytest.approx(1.4 / 3, abs=1e-6)
    # A constant dimension (sigma = 0, so neg = pos = h0) is held at h0 from both sides.
    flat = threshold_codes(torch.tensor([[[0.0]]]), torch.zeros(1), torch.zeros(1))
    assert flat.item() == 3
    assert margin_loss(
        torch.tensor([[[0.2]]]), flat, torch.zeros(1), torch.zeros(1), torch.ones(1, 1)
    ).item() == (pytest.approx(0.2))


def test_codes_pack_four_per_byte_and_round_trip():
    codes = torch.randint(0, 4, (7, 33), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 9)
    assert torch.equal(unpack_codes(packed, 33), codes)


def test_general_sample_files_alpaca_plain_text_and_errors(tmp_path, tokenizer):
    builtin = read_general_samples()
    assert len(builtin) >= 60 and all({"instruction", "output"} <= set(r) for r in builtin)
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        json.dumps({"text": "the quick brown fox"}) + "\n" + json.dumps({"text": "lazy dog"}) + "\n"
    )
    features = encode_general(tokenizer, read_general_samples(str(texts)), 96, "texts")
    assert all(f["labels"] == f["input_ids"] for f in features)  # plain text: loss on every token
    alpaca = encode_general(tokenizer, builtin[:2], 96, "builtin")
    assert all(-100 in f["labels"] and f["labels"] != f["input_ids"] for f in alpaca)  # loss on the answer
    with pytest.raises(RetainError, match="not a file"):
        create_method("gere", {"general_samples": str(tmp_path / "missing.jsonl")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(RetainError, match="record 0"):
        read_general_samples(str(bad))


def _trainer(tmp_path, ctx, method, data, steps, accumulation=1):
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
    )
    return ContinualTrainer(
        model=ctx.model,
        args=args,
        train_dataset=FeatureDataset(ctx.encode(data)),
        data_collator=ctx.collate,
        method=method,
        ctx=ctx,
    )


def test_states_come_from_the_base_model_and_general_samples_enter_every_step(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "gere")
    method = GeRe(GeReConfig(general_batch_size=3, tm_weight=10.0))
    flags = {n: p.requires_grad for n, p in ctx.model.named_parameters()}
    with torch.no_grad():  # adapters far from zero: the states must still be the base model's
        for param in trainable_parameters(ctx.model).values():
            param.normal_(0.0, 0.5)
    method.before_task(ctx, tasks[0])
    batch = ctx.collate(ctx.encode(tasks[0].train[:2]))
    method.record(ctx, ctx.model, torch.device("cpu"))
    reference = GeRe(GeReConfig())
    with torch.no_grad():  # B = 0: the adapted model equals the base model again
        for name, param in trainable_parameters(ctx.model).items():
            if "lora_B" in name:
                param.zero_()
    reference.before_task(ctx, tasks[0])
    reference.record(ctx, ctx.model, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(method.codes, reference.codes, strict=True))
    assert {n: p.requires_grad for n, p in ctx.model.named_parameters()} == flags and ctx.model.training

    # Compact: 2-bit codes, ceil(H/4) bytes per token (hidden size 32 -> 8 bytes).
    for codes, feature in zip(method.codes, method.features, strict=True):
        assert codes.dtype == torch.uint8 and codes.shape == (len(feature["input_ids"]), 8)
    assert method.state_bytes() == 8 * sum(len(f["input_ids"]) for f in method.features)

    # With the adapters back at zero the model is the base model: the margin loss is 0 at the first step.
    spy = _DrawSpy(GeReConfig(general_batch_size=3, tm_weight=10.0))
    spy.before_task(ctx, tasks[0])
    outputs = ctx.forward(ctx.model, batch)
    total = spy.loss(ctx, ctx.model, batch, outputs)
    assert ctx.logged["gere/tm"][0].item() < 1e-6
    assert total.item() == pytest.approx((outputs.loss.item() + ctx.logged["gere/general_ce"][0].item()) / 2)

    # Training with a large learning rate moves the states across thresholds: the margin loss grows.
    ctx.logged.clear()
    _trainer(tmp_path, ctx, spy, tasks[0].train[:16], steps=4, accumulation=2).train()
    assert len(spy.drawn) == 1 + 8 and all(len(d) == 3 for d in spy.drawn)  # a general batch per micro-batch
    general = {tuple(f["input_ids"]) for f in spy.features}
    drawn = {sample for d in spy.drawn for sample in d}
    assert drawn <= general and len(drawn) > 9  # a shuffled pass through the set, not the same few
    assert spy.last_tm > 0


class _DrawSpy(GeRe):
    """Records the general samples of every draw and the latest margin loss."""

    def __init__(self, config):
        super().__init__(config)
        self.drawn: list[list[tuple[int, ...]]] = []
        self.last_tm = 0.0

    def draw(self, ctx, device):
        batch, codes = super().draw(ctx, device)
        rows = zip(batch["input_ids"], batch["attention_mask"], strict=True)
        self.drawn.append([tuple(ids[mask.bool()].tolist()) for ids, mask in rows])
        return batch, codes

    def loss(self, ctx, model, batch, outputs):
        total = super().loss(ctx, model, batch, outputs)
        self.last_tm = ctx.logged["gere/tm"][-1].item()
        return total


def test_recorded_states_are_saved_per_task_and_survive_resume(tmp_path):
    raw = tiny_config(
        tmp_path, "gere", {"general_batch_size": 2}, train={"max_steps": 3}, eval={"before_training": False}
    )
    run_experiment(config_from_dict(raw))
    states = [
        torch.load(
            os.path.join(raw["output_dir"], "tasks", f"{i}-{name}", "method_state.pt"), weights_only=False
        )
        for i, name in ((1, "parity"), (2, "capital_letters"))
    ]
    for state in states:
        assert all(c.dtype == torch.uint8 for c in state["codes"])
        assert state["mean"].dtype == torch.float32 and state["mean"].shape == (32,)
    # Recorded once, from the base model: task 2 keeps task 1's states.
    assert all(torch.equal(a, b) for a, b in zip(states[0]["codes"], states[1]["codes"], strict=True))

    ctx, tasks = tiny_context(tmp_path / "again", "gere")
    resumed = GeRe()
    resumed.load_state_dict(states[0])
    resumed.record = None  # a resumed run must not record again
    resumed.before_task(ctx, tasks[1])
    batch = ctx.collate(ctx.encode(tasks[1].train[:2]))
    resumed.loss(ctx, ctx.model, batch, ctx.forward(ctx.model, batch))
    assert resumed.features == states[0]["features"]


def test_the_default_weight_lets_the_quickstart_tasks_be_learned(tmp_path):
    # At the reference's tm_weight 100 the margin term dominates: the quickstart's parity reached 37.5%
    # after task 1 (dynamic_weight: 54.2%, w = 1: 68.8%, w = 0: 83.3%). The default is w = 1, fixed.
    config = GeReConfig()
    assert config.tm_weight == 1.0 and not config.dynamic_weight
    ctx, tasks = tiny_context(tmp_path, "gere")
    method = GeRe(config)
    method.before_task(ctx, tasks[0])
    batch = ctx.collate(ctx.encode(tasks[0].train[:2]))
    method.record(ctx, ctx.model, torch.device("cpu"))  # adapters at B = 0: the base model's states
    with torch.no_grad():  # move the states across the thresholds
        for param in trainable_parameters(ctx.model).values():
            param.normal_(0.0, 0.5)
    outputs = ctx.forward(ctx.model, batch)
    total = method.loss(ctx, ctx.model, batch, outputs)
    tm, general = ctx.logged["gere/tm"][-1].item(), ctx.logged["gere/general_ce"][-1].item()
    assert tm > 0 and "gere/tm_weight" not in ctx.logged
    assert total.item() == pytest.approx((outputs.loss.item() + general) / 2 + tm, rel=1e-4)
