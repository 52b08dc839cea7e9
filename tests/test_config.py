"""Config: YAML onto dataclasses, LLaMA-Factory names, dotted overrides, clear errors."""

from __future__ import annotations

import pytest

from retain.config import config_from_dict, load_config
from retain.errors import RetainError

BASE = {"stream": {"tasks": ["synthetic:parity"]}}


def test_llamafactory_flat_names_land_in_their_sections():
    config = config_from_dict(
        {
            **BASE,
            "model_name_or_path": "tiny-random",
            "finetuning_type": "full",
            "lora_rank": 16,
            "lora_alpha": 32,
            "lora_target": "q_proj,v_proj",
            "cutoff_len": 512,
            "per_device_train_batch_size": 2,
            "learning_rate": "5e-5",
            "num_train_epochs": 2,
            "template": "qwen",
        }
    )
    assert config.model.name_or_path == "tiny-random" and config.model.finetuning_type == "full"
    assert (config.model.lora_rank, config.model.lora_alpha, config.model.lora_target) == (
        16,
        32.0,
        "q_proj,v_proj",
    )
    assert (config.train.cutoff_len, config.train.per_device_train_batch_size) == (512, 2)
    assert config.train.learning_rate == 5e-5 and config.train.num_train_epochs == 2.0


def test_dotted_overrides_and_method_settings():
    config = config_from_dict(
        {**BASE, "method": {"name": "ewc", "ewc_lambda": 10}},
        overrides=["train.learning_rate=1e-4", "method.gamma=0.5"],
    )
    assert config.train.learning_rate == 1e-4
    assert config.method.name == "ewc" and config.method.params == {"ewc_lambda": 10, "gamma": 0.5}
    switched = config_from_dict(
        {**BASE, "method": {"name": "ewc", "ewc_lambda": 10}}, overrides=["method.name=replay"]
    )
    assert switched.method.name == "replay" and switched.method.params == {}


def test_task_shorthand_and_defaults():
    config = config_from_dict(
        {"stream": {"train_size": 10, "tasks": ["synthetic:parity", {"train": "x.json"}]}}
    )
    assert [t.name for t in config.stream.tasks] == ["parity", "x"]
    assert config.stream.tasks[0].train_size == 10


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({**BASE, "trian": {}}, "did you mean: train"),
        ({**BASE, "train": {"learning_rat": 1}}, "did you mean: learning_rate"),
        ({**BASE, "train": {"learning_rate": "fast"}}, "must be a number"),
        ({**BASE, "train": {"per_device_train_batch_size": 0}}, "positive"),
        ({**BASE, "model": {"finetuning_type": "qlora"}}, "must be one of lora, full"),
        ({"stream": {"tasks": []}}, "stream.tasks is empty"),
        ({"stream": {"tasks": ["synthetic:parity", "synthetic:parity"]}}, "used twice"),
    ],
)
def test_bad_configs_are_refused_with_the_fix(raw, needle):
    with pytest.raises(RetainError, match=needle):
        config_from_dict(raw)


def test_every_example_config_loads():
    import glob
    import os

    files = glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "*.yaml"))
    assert any(f.endswith("quickstart.yaml") for f in files)
    for path in files:
        load_config(path)
