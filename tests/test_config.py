"""Config: YAML onto dataclasses, LLaMA-Factory names, dotted overrides, clear errors."""

from __future__ import annotations

import pytest
import yaml

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


def test_the_study_sweeps_every_built_in_method():
    import os

    from retain.methods.compat import builtin_methods

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "study_lnt.yaml")
    with open(path, encoding="utf-8") as handle:
        methods = yaml.safe_load(handle)["sweep"]["methods"]
    names = [m if isinstance(m, str) else m["name"] for m in methods]
    assert sorted(names) == sorted(builtin_methods())


def test_scheduler_names_are_transformers_scheduler_types():
    import typing

    from transformers import SchedulerType

    from retain.config import SchedulerName

    assert set(typing.get_args(SchedulerName)) == {s.value for s in SchedulerType}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lr_scheduler_type=bogus", "train.lr_scheduler_type"),
        ("warmup_ratio=-0.5", "train.warmup_ratio"),
        ("warmup_ratio=1.0", "train.warmup_ratio"),
        ("seed=-1", "seed"),
        ("seed=4294967296", "seed"),
        ("lora_dropout=1.5", "model.lora_dropout"),
        ("lora_dropout=-0.1", "model.lora_dropout"),
        ("lora_alpha=-16", "model.lora_alpha"),
        ("lora_alpha=0", "model.lora_alpha"),
        ("model.lora_target=''", "model.lora_target"),
        ("max_steps=0", "train.max_steps"),
        ("max_steps=-2", "train.max_steps"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.max_grad_norm=-1", "train.max_grad_norm"),
        ("train.logging_steps=0", "train.logging_steps"),
    ],
)
def test_out_of_range_values_are_refused_naming_their_key(override, key):
    with pytest.raises(RetainError) as err:
        config_from_dict(BASE, overrides=[override])
    assert str(err.value).startswith(f"config: {key} ")


def test_boundary_values_are_accepted():
    config = config_from_dict(
        BASE,
        overrides=[
            "max_steps=-1",
            "warmup_ratio=0.0",
            "train.weight_decay=0",
            "train.max_grad_norm=0",
            "lora_dropout=0.0",
            "seed=0",
            "lr_scheduler_type=cosine",
        ],
    )
    assert config.train.max_steps == -1 and config.train.lr_scheduler_type == "cosine"
    assert config_from_dict(BASE, overrides=["finetuning_type=full", "model.lora_target=''"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.lora_layers=last:0", "model.lora_layers"),
        ("model.lora_layers=top", "model.lora_layers"),
        ("model.lora_layers=1,x", "model.lora_layers"),
        ("train.global_batch_size=0", "train.global_batch_size"),
    ],
)
def test_bad_layer_and_batch_settings_are_refused_naming_their_key(override, key):
    with pytest.raises(RetainError) as err:
        config_from_dict(BASE, overrides=[override])
    assert str(err.value).startswith(f"config: {key} ")


def test_global_batch_and_accumulation_are_not_both_set():
    with pytest.raises(RetainError, match="not both"):
        config_from_dict(BASE, overrides=["train.global_batch_size=8", "gradient_accumulation_steps=2"])


def test_each_method_of_a_config_gets_its_own_run_directory(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump({"stream": {"tasks": ["synthetic:parity"]}}))
    assert load_config(str(path)).output_dir == "runs/demo/sequential"
    assert load_config(str(path), ["method.name=replay"]).output_dir == "runs/demo/replay"
    combined = load_config(str(path), ["method.name=lwf", "method.plus=[ewc]"])
    assert combined.output_dir == "runs/demo/lwf+ewc"
    seeded = load_config(str(path), ["output_dir=out/{config}-{seed}/{method}", "seed=7"])
    assert seeded.output_dir == "out/demo-7/sequential"
    assert load_config(str(path), ["output_dir=plain/dir"]).output_dir == "plain/dir"
    with pytest.raises(RetainError, match="placeholder"):
        load_config(str(path), ["output_dir=runs/{model}"])


def test_relative_paths_resolve_from_the_current_directory_and_the_config_folder_is_named(
    tmp_path, monkeypatch
):
    configs = tmp_path / "configs"
    (configs / "data").mkdir(parents=True)
    path = configs / "c.yaml"
    path.write_text(yaml.safe_dump({"stream": {"dataset_dir": "data", "tasks": ["synthetic:parity"]}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RetainError, match="resolve from where retain runs") as err:
        load_config(str(path))
    assert "configs/data" in str(err.value)
    monkeypatch.chdir(configs)
    assert load_config(str(path)).stream.dataset_dir == "data"


def test_a_sweep_section_is_left_to_retain_sweep():
    from retain.config import config_from_dict as build

    raw = {"stream": {"tasks": ["synthetic:parity"]}, "sweep": {"seeds": 3, "methods": ["ewc"]}}
    assert build(raw).method.name == "sequential"
