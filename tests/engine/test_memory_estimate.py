"""The memory estimate of --dry-run: parameter counts from the meta device equal a real model's, the
strategy divides what it shards, and each method's reported state equals its real state after a task."""

from __future__ import annotations

import pytest
import torch

from retain.config import config_from_dict
from retain.engine.memory_estimate import ParameterCounts, count_parameters, estimate_memory, human_bytes
from retain.engine.plan import make_plan
from retain.methods.registry import create_method
from retain.models.adapters import adapter_names, adapter_state, apply_finetuning
from retain.models.tiny import tiny_model, tiny_tokenizer
from retain.runtime import Strategy

from ..helpers import tiny_config, tiny_context, train_one_task


def test_meta_device_counts_equal_the_real_lora_model(tmp_path):
    ctx, _ = tiny_context(tmp_path)
    counts = count_parameters(ctx.config)
    params = list(ctx.model.parameters())
    assert counts.total == sum(p.numel() for p in params)
    assert counts.trainable == sum(p.numel() for p in params if p.requires_grad) > 0
    assert (counts.hidden_size, counts.layers) == (32, 2)


def test_meta_device_counts_equal_the_real_fully_fine_tuned_model(tmp_path):
    config = config_from_dict(tiny_config(tmp_path, model={"finetuning_type": "full"}))
    model = apply_finetuning(tiny_model(tiny_tokenizer()), config.model)
    counts = count_parameters(config)
    assert counts.total == counts.trainable == sum(p.numel() for p in model.parameters())


# 1000 frozen fp32 weights, 100 trainable (LoRA, fp32); AdamW keeps 2 states per trainable parameter.
COUNTS = ParameterCounts(total=1100, trainable=100, hidden_size=8, layers=1, block_matrices=[])
FOUR = 4


@pytest.mark.parametrize(
    ("strategy", "weights", "adapter", "gradients", "optimizer"),
    [
        (Strategy("single"), 4000, 400, 400, 800),
        (Strategy("ddp", FOUR), 4000, 400, 400, 800),
        (Strategy("zero0", FOUR), 4000, 400, 400, 800),
        (Strategy("zero1", FOUR), 4000, 400, 400, 200),
        (Strategy("zero2", FOUR), 4000, 400, 100, 200),
        (Strategy("zero3", FOUR), 1000, 100, 100, 200),
        (Strategy("fsdp", FOUR), 1000, 100, 100, 200),
    ],
)
def test_each_strategy_divides_what_it_shards_over_the_processes(
    tmp_path, strategy, weights, adapter, gradients, optimizer
):
    config = config_from_dict(tiny_config(tmp_path, model={"dtype": "float32"}))
    estimate = estimate_memory(config, strategy, create_method("sequential"), COUNTS, [32, 32])
    assert [line.bytes for line in estimate.lines] == [weights, adapter, gradients, optimizer]
    assert estimate.device_bytes == weights + adapter + gradients + optimizer and estimate.host_bytes == 0


def test_offload_moves_the_optimizer_state_to_cpu_ram(tmp_path):
    config = config_from_dict(tiny_config(tmp_path, model={"dtype": "bfloat16"}))
    estimate = estimate_memory(
        config, Strategy("zero2", 2, offload=True), create_method("sequential"), COUNTS, [8]
    )
    weights, adapter, gradients, optimizer = estimate.lines
    assert weights.bytes == 1000 * 2  # bf16 frozen weights, LoRA stays fp32
    assert (adapter.bytes, gradients.bytes) == (400, 200)
    assert not optimizer.on_device and optimizer.bytes == 400 and estimate.host_bytes == 400
    fsdp = estimate_memory(
        config, Strategy("fsdp", 2, offload=True), create_method("sequential"), COUNTS, [8]
    )
    assert fsdp.device_bytes == 0  # FSDP's CPU offload moves parameters and gradients too


def _run_tasks(ctx, tasks, method) -> None:
    method.setup(ctx)
    for index, task in enumerate(tasks, 1):
        ctx.task_index = index
        method.before_task(ctx, task)
        method.training_data(ctx, task, task.train)


def _real_state(name: str, ctx, method) -> int:
    """The numel of the state the method really holds at the start of the last task."""
    if name == "osft":
        return sum(s.u.numel() + s.s.numel() + s.v.numel() for _, s in method.targets)
    if name in ("merge", "conpet", "sefe"):  # every adapter but the one the last task trains
        earlier = adapter_names(ctx.model)[:-1]
        return sum(v.numel() for n in earlier for v in adapter_state(ctx.model, n).values())
    if name == "lwf":
        method.take_teacher(ctx.model)
        return sum(v.numel() for v in method.teacher.values())
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["osft", "merge", "conpet", "sefe", "lwf"])
def test_a_methods_reported_state_equals_its_real_state(tmp_path, name):
    ctx, tasks = tiny_context(tmp_path, name)
    method = create_method(name)
    _run_tasks(ctx, tasks, method)
    counts = count_parameters(ctx.config)
    items = method.state_estimate(_sizes(ctx, counts, tasks))
    assert items[0].numel == _real_state(name, ctx, method) > 0


@pytest.mark.parametrize("how", ["task_arithmetic", "ties"])
def test_merges_reported_merged_adapter_equals_the_real_one(tmp_path, how):
    ctx, tasks = tiny_context(tmp_path, "merge", {"how": how})
    method = create_method("merge", {"how": how})
    _run_tasks(ctx, tasks, method)
    method.build_merged(ctx)
    real = sum(v.numel() for v in adapter_state(ctx.model, "merged").values())
    _, merged = method.state_estimate(_sizes(ctx, count_parameters(ctx.config), tasks))
    assert merged.numel == real > 0


def test_replay_memory_holds_the_reported_number_of_examples(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "replay", {"memory_size": 5})
    method = create_method("replay", {"memory_size": 5})
    for index, task in enumerate(tasks, 1):
        ctx.task_index = index
        method.after_task(ctx, task, task.train)
    (item,) = method.state_estimate(_sizes(ctx, count_parameters(ctx.config), tasks))
    replayed = sum(len(m) for m in list(method.memory.values())[:-1])  # the last task's is never replayed
    assert item.numel == replayed * ctx.config.train.cutoff_len and not item.on_device


def _sizes(ctx, counts, tasks):
    from retain.methods.base import RunSizes

    return RunSizes(
        total_params=counts.total,
        trainable_params=counts.trainable,
        hidden_size=counts.hidden_size,
        layers=counts.layers,
        train_examples=[len(t.train) for t in tasks],
        cutoff_len=ctx.config.train.cutoff_len,
        block_matrices=counts.block_matrices,
        block_matrix_names=counts.block_matrix_names,
    )


def test_the_plan_estimates_its_memory_under_its_strategy(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = config_from_dict(tiny_config(tmp_path, method="lwf", train={"fsdp": "full_shard"}))
    with pytest.raises(Exception, match="method 'lwf' is refused under FSDP"):
        make_plan(config)
    plan = make_plan(config_from_dict(tiny_config(tmp_path, method="lwf")))
    memory = plan.memory()
    assert memory.strategy == Strategy("ddp", 2)
    text = "\n".join(memory.describe())
    assert "lwf: teacher" in text and "total:" in text and human_bytes(1536) == "1.50 KiB"
    assert torch.finfo(torch.float32).bits == 32


def test_conpets_reported_feature_memory_equals_the_real_one(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "conpet", {"memory_per_task": 5})
    method = create_method("conpet", {"memory_per_task": 5})
    for index, task in enumerate(tasks, 1):
        ctx.task_index = index
        method.before_task(ctx, task)
        method.after_task(ctx, task, task.train)
    _, features = method.state_estimate(_sizes(ctx, count_parameters(ctx.config), tasks))
    assert features.numel == sum(m.numel() for m in method.memory.values()) == 2 * 5 * 32


def test_a_combination_reports_each_components_state_under_its_name(tmp_path):
    config = config_from_dict(tiny_config(tmp_path))
    method = create_method("replay", {"plus": ["lwf"]})
    lines = estimate_memory(config, Strategy("single"), method, COUNTS, [32, 32]).lines[4:]
    assert [line.what for line in lines] == [
        "replay: memory (64 examples)",
        "lwf: teacher: a copy of the trainable weights",
    ]
    assert lines[1].bytes == COUNTS.trainable * 4


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
@pytest.mark.parametrize("train_other_params", [False, True])
@pytest.mark.parametrize("target_modules", [[], ["o_proj"]])
def test_cosos_reported_optimizer_state_equals_its_real_one(
    tmp_path, finetuning_type, train_other_params, target_modules
):
    # coso's Adam keeps its moments in the r1 coordinates: the estimate must not count AdamW's 2 per weight.
    params = {
        "proj_rank": 4,
        "sketch_rank": 12,
        "train_other_params": train_other_params,
        "target_modules": target_modules,
    }
    ctx, tasks = tiny_context(tmp_path, "coso", params, model={"finetuning_type": finetuning_type})
    method = create_method("coso", params)
    method.setup(ctx)
    method.before_task(ctx, tasks[0])
    method.training_data(ctx, tasks[0], tasks[0].train)
    trainer = train_one_task(ctx, tasks, method, tmp_path / "t", max_steps=1)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    real = sum(s[k].numel() for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    counts = count_parameters(ctx.config)
    reported = method.optimizer_state_estimate(_sizes(ctx, counts, tasks))
    assert reported.numel == real > 0
    assert real < 2 * counts.trainable or train_other_params  # well under AdamW's share
    lines = estimate_memory(ctx.config, Strategy("single"), method, counts, [32]).lines
    assert lines[3].what.startswith("optimizer state (coso") and lines[3].bytes == reported.bytes
    # gradients: only for what coso left trainable (its targets, unless train_other_params)
    trained = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
    assert lines[2].bytes == 4 * trained
    if target_modules and not train_other_params:
        assert trained < counts.trainable  # the rest frozen for the task
    # the sketch and projector of the task in training: as many as the real targets hold
    _, sketches = method.state_estimate(_sizes(ctx, counts, tasks))
    config = method.components[0].config
    real_sketch = sum(t.dim * (config.sketch_rank + config.proj_rank) for t in method.components[0].targets)
    assert sketches.numel == real_sketch


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_hfts_gradients_estimate_bounds_what_each_draw_leaves_trainable(tmp_path, finetuning_type):
    # HFT freezes about half of each layer's linear layers (and, by default, everything outside them): the
    # gradients line must cover the largest draw but not count what is always frozen.
    ctx, tasks = tiny_context(tmp_path, "hft", model={"finetuning_type": finetuning_type})
    counts = count_parameters(ctx.config)
    method = create_method("hft")
    estimate = method.trained_params_estimate(_sizes(ctx, counts, tasks))
    real = []
    for seed in range(6):  # six draws
        ctx.config.seed = seed
        method.training_data(ctx, tasks[0], tasks[0].train)
        real.append(sum(p.numel() for p in ctx.model.parameters() if p.requires_grad))
        method.release()
    assert max(real) <= estimate < counts.trainable
    assert estimate <= 1.5 * min(real)  # about half, not all
    line = estimate_memory(ctx.config, Strategy("single"), method, counts, [32]).lines[2]
    assert line.bytes == 4 * estimate and "at most" in line.what
