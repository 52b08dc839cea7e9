"""The batch layout (how a step's examples split over processes and gradient accumulation), the
strategy a run trains under, and the heap a run keeps out of the garbage collector."""

from __future__ import annotations

import gc
import json
import weakref

import pytest

from retain.config import RunConfig, TrainConfig, config_from_dict
from retain.engine.loop import run_experiment
from retain.errors import RetainError
from retain.runtime import STRATEGIES, Strategy, batch_layout, frozen_heap, resolve_strategy

from .helpers import tiny_config


def test_without_a_global_batch_each_process_adds_its_per_device_batch():
    train = TrainConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2)
    assert batch_layout(train, 1).global_batch == 16
    assert batch_layout(train, 2).to_dict() == {
        "per_device": 8,
        "processes": 2,
        "accumulation": 2,
        "global": 32,
    }


@pytest.mark.parametrize(
    ("global_batch", "per_device", "processes", "expected"),
    [
        (8, 8, 1, (8, 1)),
        (8, 8, 2, (4, 1)),  # each process's share is smaller than the per-device batch
        (16, 3, 2, (2, 4)),  # 8 per process: the largest micro-batch up to 3 that divides 8 is 2
        (32, 8, 2, (8, 2)),
        (6, 4, 2, (3, 1)),
    ],
)
def test_a_global_batch_is_kept_whatever_the_process_count(global_batch, per_device, processes, expected):
    train = TrainConfig(per_device_train_batch_size=per_device, global_batch_size=global_batch)
    layout = batch_layout(train, processes)
    assert (layout.per_device, layout.accumulation) == expected
    assert layout.global_batch == global_batch
    assert "examples per step" in layout.describe()


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(RetainError, match="train.global_batch_size 7 cannot be split over 2"):
        batch_layout(TrainConfig(global_batch_size=7), 2)


# The strategy: from train.deepspeed / train.fsdp or accelerate launch's environment, else the process count.


def _config(tmp_path, **train):
    return RunConfig(train=TrainConfig(**train))


def _deepspeed_file(tmp_path, zero: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero, "train_batch_size": "auto"}))
    return str(path)


def test_without_a_strategy_setting_the_process_count_decides(tmp_path):
    config = _config(tmp_path)
    assert resolve_strategy(config, {}) == Strategy("single", 1)
    assert resolve_strategy(config, {"WORLD_SIZE": "2"}) == Strategy("ddp", 2)


@pytest.mark.parametrize(
    ("zero", "expected"),
    [
        ({}, Strategy("zero0", 2)),
        ({"stage": 1}, Strategy("zero1", 2)),
        ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, Strategy("zero2", 2, offload=True)),
        ({"stage": 3, "offload_param": {"device": "none"}}, Strategy("zero3", 2)),
        ({"stage": 3, "offload_param": {"device": "cpu"}}, Strategy("zero3", 2, offload=True)),
    ],
)
def test_train_deepspeed_reads_the_stage_and_offload_from_the_json(tmp_path, zero, expected):
    config = _config(tmp_path, deepspeed=_deepspeed_file(tmp_path, zero))
    assert resolve_strategy(config, {"WORLD_SIZE": "2"}) == expected


def test_accelerate_launch_environment_selects_deepspeed_or_fsdp(tmp_path):
    config = _config(tmp_path)
    env = {
        "WORLD_SIZE": "4",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    }
    assert resolve_strategy(config, env) == Strategy("zero2", 4, offload=True)
    # accelerate's deepspeed_config_file wins over its zero_stage field
    env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = _deepspeed_file(tmp_path, {"stage": 3})
    assert resolve_strategy(config, env) == Strategy("zero3", 4)
    fsdp_env = {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}
    assert resolve_strategy(config, fsdp_env) == Strategy("fsdp", 2, offload=True)


def test_train_fsdp_selects_fsdp_and_its_offload_word(tmp_path):
    assert resolve_strategy(_config(tmp_path, fsdp="full_shard auto_wrap"), {"WORLD_SIZE": "2"}) == Strategy(
        "fsdp", 2
    )
    assert resolve_strategy(_config(tmp_path, fsdp="full_shard offload"), {}).offload


def test_two_different_strategies_are_refused(tmp_path):
    config = _config(tmp_path, fsdp="full_shard")
    with pytest.raises(
        RetainError,
        match=r"two strategies asked for \(accelerate launch \(DeepSpeed\): ZeRO-3; train.fsdp: FSDP\)",
    ):
        resolve_strategy(config, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    # the same strategy from the config and the launcher is fine
    assert resolve_strategy(config, {"ACCELERATE_USE_FSDP": "true"}) == Strategy("fsdp", 1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"zero_optimization": {"stage": "auto"}}', "zero_optimization.stage must be 0, 1, 2 or 3"),
        ("not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_a_deepspeed_file_retain_cannot_read_names_the_field(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(RetainError, match=f"train.deepspeed {path}.*{message}|{message}"):
        resolve_strategy(_config(tmp_path, deepspeed=str(path)), {})


def test_strategy_properties_say_what_is_sharded():
    sharded = {
        name: (s.shards_parameters, s.shards_gradients, s.shards_optimizer)
        for name in STRATEGIES
        for s in [Strategy(name, 2)]
    }
    assert sharded == {
        "single": (False, False, False),
        "ddp": (False, False, False),
        "fsdp": (True, True, True),
        "zero0": (False, False, False),
        "zero1": (False, False, True),
        "zero2": (False, True, True),
        "zero3": (True, True, True),
    }
    assert Strategy("zero2", 2, offload=True).label == "ZeRO-2 + offload"
    assert Strategy("ddp", 2).label == "DDP" and Strategy("zero3", 8).zero_stage == 3
    assert Strategy("zero3", 2, offload=True).keys == {
        "zero3",
        "multiprocess",
        "sharded-params",
        "sharded-grads",
        "sharded-optimizer",
        "deepspeed",
        "offload",
    }
    assert Strategy("single").keys == {"single"}
    with pytest.raises(ValueError, match="offload needs FSDP or DeepSpeed"):
        Strategy("ddp", 2, offload=True)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"fsdp": "full_shard auto_wrp"}, "train.fsdp word 'auto_wrp' .*did you mean: auto_wrap"),
        ({"fsdp": "full_shard", "deepspeed": "ds.json"}, "set train.deepspeed or train.fsdp, not both"),
        ({"fsdp_config": "fsdp.json"}, "train.fsdp_config is set but train.fsdp is empty"),
        ({"deepspeed": "missing.json"}, "train.deepspeed file missing.json does not exist"),
    ],
)
def test_strategy_settings_are_checked_when_the_config_is_read(tmp_path, train, message):
    raw = {"stream": {"tasks": ["synthetic:parity"]}, "train": train}
    with pytest.raises(RetainError, match=message):
        config_from_dict(raw)


class _Node:
    pass


@pytest.fixture
def unfrozen():
    """The heap as a fresh process has it: the session's freeze (conftest) lifted, put back after."""
    gc.unfreeze()
    try:
        yield
    finally:
        gc.collect()
        gc.freeze()


def test_frozen_heap_collects_garbage_then_freezes_the_rest_until_exit(unfrozen):
    garbage = _Node()
    garbage.self = garbage  # a cycle: only the collector frees it
    collected = weakref.ref(garbage)
    del garbage
    alive = _Node()
    with frozen_heap():
        assert collected() is None  # freed on entry, not frozen
        frozen = gc.get_freeze_count()
        assert frozen > 1000 and not any(o is alive for o in gc.get_objects(generation=2))
        with frozen_heap():  # nested: leaves the outer freeze alone
            pass
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0  # handed back: a notebook's later collections see them again


def test_a_runs_full_collections_do_not_walk_what_was_alive_at_its_start(tmp_path, unfrozen):
    # The Trainer forces a full collection after every task; each must find the startup heap frozen.
    seen = []

    def record(phase, info):
        if phase == "start" and info["generation"] == 2:
            seen.append(gc.get_freeze_count())

    gc.callbacks.append(record)
    try:
        run_experiment(config_from_dict(tiny_config(tmp_path)), evaluate=False)
    finally:
        gc.callbacks.remove(record)
    during = seen[1:]  # the first is frozen_heap's own collection on entry
    assert len(during) >= 2 and all(count > 1000 for count in during), seen
    assert gc.get_freeze_count() == 0
