"""LLaMA-Factory and EasyCL configs as they are: aliases, EasyCL method switches, keys that change nothing,
refusals in one error, `dataset: a,b,c` with `<name>_test` test sets, `retain config`, the generated doc."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import textwrap

import pytest

from retain import config_compat as compat
from retain.config import RunConfig, config_from_dict, config_reference
from retain.errors import RetainError

from .helpers import retain_in_process

BASE = {"stream": {"tasks": ["synthetic:parity"]}}
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "llamafactory_easycl.md")


def _refusal(raw: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(RetainError) as err:
        config_from_dict(raw, overrides=overrides)
    return str(err.value)


def _setting(config: RunConfig, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


# --- the tables point at settings that exist ------------------------------------------------------------


def test_every_alias_targets_a_retain_setting():
    for alias in compat.ALIASES:
        section, _, name = alias.target.partition(".")
        cls = {f.name: f.type for f in dataclasses.fields(RunConfig)}
        assert section in cls, alias
        assert name in {f.name for f in dataclasses.fields(getattr(RunConfig(), section))}, alias


def test_every_easycl_switch_and_setting_names_a_real_method_and_param():
    from retain.methods.registry import available

    methods = available()
    for switch in compat.SWITCHES:
        assert switch.method in methods, switch
    for entry in compat.METHOD_PARAMS:
        assert entry.method in methods, entry
        if entry.param:
            fields = {f.name for f in dataclasses.fields(methods[entry.method].config_cls)}
            assert set(entry.params(entry.easycl_default)) <= fields, entry
        else:
            assert entry.note, f"{entry.key} is refused without a reason"
    # Each switch's EasyCL defaults build a valid method config.
    for switch in compat.SWITCHES:
        config = config_from_dict({**BASE, switch.key: True})
        from retain.methods.registry import build_method_config

        build_method_config(config.method.name, config.method.params)


def test_no_key_is_in_two_tables():
    tables = [compat.ALIASES, compat.IGNORED, compat.REFUSED, compat.SWITCHES]
    keys = [entry.key for table in tables for entry in table]
    assert len(keys) == len(set(keys))
    assert not set(keys) & {p.key for p in compat.METHOD_PARAMS}


# --- LLaMA-Factory's flat names ------------------------------------------------------------------------


def test_llamafactory_train_and_model_names_land_in_their_settings():
    config = config_from_dict(
        {
            **BASE,
            "logging_steps": 5,
            "weight_decay": 0.1,
            "max_grad_norm": 0.5,
            "warmup_steps": 3,
            "per_device_eval_batch_size": 4,
            "optim": "sgd",
            "gradient_checkpointing": True,
            "report_to": ["tensorboard", "wandb"],
            "use_dora": True,
            "use_rslora": True,
            "adapter_name_or_path": "adapters/start",
            "trust_remote_code": True,
            "flash_attn": "fa2",
            "freeze_multi_modal_projector": False,
            "default_system": "Be brief.",
            "max_samples": 100,
        }
    )
    assert (config.train.logging_steps, config.train.weight_decay, config.train.max_grad_norm) == (
        5,
        0.1,
        0.5,
    )
    assert (config.train.warmup_steps, config.train.optim, config.train.gradient_checkpointing) == (
        3,
        "sgd",
        True,
    )
    assert config.train.report_to == "tensorboard,wandb" and config.eval.batch_size == 4
    assert config.model.use_dora and config.model.use_rslora and config.model.trust_remote_code
    assert config.model.adapter_name_or_path == "adapters/start"
    assert config.model.attn_implementation == "flash_attention_2" and config.model.train_projector
    assert config.stream.system == "Be brief." and config.stream.tasks[0].train_size == 100


@pytest.mark.parametrize(
    ("key", "value", "dotted", "expected"),
    [
        ("fp16", True, "train.bf16", "auto"),
        ("bf16", True, "train.bf16", "true"),
        ("flash_attn", "auto", "model.attn_implementation", ""),
        ("flash_attn", "disabled", "model.attn_implementation", "eager"),
        ("disable_gradient_checkpointing", False, "train.gradient_checkpointing", True),
    ],
)
def test_converted_values(key, value, dotted, expected):
    assert _setting(config_from_dict({**BASE, key: value}), dotted) == expected


def test_fp16_false_changes_nothing_and_fp16_true_is_said(caplog):
    assert config_from_dict({**BASE, "fp16": False}).train.bf16 == "auto"
    with caplog.at_level(logging.INFO, logger="retain"):
        config_from_dict({**BASE, "fp16": True})
    assert "fp16: true -> auto" in caplog.text


def test_the_same_names_work_as_command_line_overrides():
    config = config_from_dict(
        BASE, overrides=["logging_steps=7", "per_device_eval_batch_size=2", "fp16=true"]
    )
    assert (config.train.logging_steps, config.eval.batch_size, config.train.bf16) == (7, 2, "auto")


# --- keys that change nothing, keys that are refused ----------------------------------------------------


def test_keys_that_change_nothing_are_listed_in_one_log_line(caplog):
    quiet = {
        "stage": "sft",
        "do_train": True,
        "overwrite_cache": True,
        "overwrite_output_dir": True,
        "preprocessing_num_workers": 16,
        "ddp_timeout": 180000000,
        "save_steps": 500,
        "plot_loss": True,
        "resume_from_checkpoint": None,
    }
    with caplog.at_level(logging.INFO, logger="retain"):
        config_from_dict({**BASE, **quiet})
    lines = [r.getMessage() for r in caplog.records if "changing nothing" in r.getMessage()]
    assert len(lines) == 1
    assert all(key in lines[0] for key in quiet)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("stage", "dpo", "supervised fine-tuning"),
        ("do_train", False, "retain eval"),
        ("resume_from_checkpoint", "saves/checkpoint-500", "same command again"),
        ("packing", True, "packing"),
        ("flash_attn", "fa3", "fa3"),
        ("freeze_multi_modal_projector", "yes", "true or false"),
    ],
)
def test_values_that_would_change_results_are_refused(key, value, needle):
    message = _refusal({**BASE, key: value})
    assert message.startswith(f"config: {key}: ") and needle in message


def test_every_problem_is_named_in_one_error_with_reasons_and_close_suggestions_only():
    message = _refusal(
        {
            **BASE,
            "use_dora": True,
            "val_size": 0.1,
            "pissa_init": True,
            "galore_rank": 16,
            "lora_rnak": 8,
            "trian": {},
            "train": {"learnig_rate": 1e-4},
        }
    )
    assert message.startswith("config: 6 keys retain cannot use")
    assert "val_size: " in message and "pissa_init: " in message and "galore_rank: GaLore" in message
    assert "unknown key 'lora_rnak' (did you mean: lora_rank?)" in message
    assert "unknown key 'trian' (did you mean: train?)" in message
    assert "unknown key 'train.learnig_rate' (did you mean: learning_rate?)" in message
    assert "seed" not in message  # the old suggestion for use_dora and deepspeed
    assert "use_dora" not in message  # a known alias now


def test_a_single_unknown_key_keeps_its_message():
    message = _refusal(BASE, overrides=["train.learnig_rate=1e-4"])
    assert message.startswith(
        "config: unknown key 'train.learnig_rate' (did you mean: learning_rate?); known keys"
    )
    assert compat.suggest("deepspeed", ["seed", "model"]) == "" and compat.suggest("use_dora", ["seed"]) == ""


# --- EasyCL's method switches ----------------------------------------------------------------------------


def test_easycl_switch_selects_the_method_with_easycl_defaults_for_missing_settings():
    config = config_from_dict({**BASE, "use_ewc": True, "ewc_lambda": 5})
    assert config.method.name == "ewc" and config.method.params == {"ewc_lambda": 5, "fisher_samples": 100}
    replay = config_from_dict({**BASE, "use_replay": True})
    assert replay.method.params == {"memory_ratio": 0.3, "memory_size": 0}
    lwf = config_from_dict({**BASE, "use_lwf": True, "lwf_alpha": 0.2, "lwf_temperature": 3})
    assert lwf.method.params == {"lwf_alpha": pytest.approx(0.25), "temperature": 3}


def test_settings_of_an_unselected_method_change_nothing_and_switches_off_are_accepted(caplog):
    with caplog.at_level(logging.INFO, logger="retain"):
        config = config_from_dict({**BASE, "use_olora": True, "use_ewc": False, "ewc_lambda": 3})
    assert config.method.name == "olora" and "ewc_lambda" not in config.method.params
    assert "use_ewc, ewc_lambda" in caplog.text or "ewc_lambda" in caplog.text


def test_explicit_method_section_settings_win_over_easycl_defaults():
    config = config_from_dict({**BASE, "use_ewc": True, "method": {"name": "ewc", "fisher_samples": 8}})
    assert config.method.params["fisher_samples"] == 8 and config.method.params["ewc_lambda"] == 10000


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"use_ewc": True, "use_lwf": True}, "plus: [lwf]"),
        ({"use_ewc": True, "method": "replay"}, "selects ewc but method.name is replay"),
        ({"use_moe": True, "task_embedding_dim": 64}, "no task embedding"),
        ({"use_dynamic_conpet": True, "classification_loss_weight": 10.0}, "selector"),
        ({"use_lamol": True, "lamol_num_samples_per_task": 5}, "gen_ratio"),
        ({"use_lwf": True, "lwf_alpha": 1.0}, "[0, 1)"),
        ({"use_ssr": True, "model_name_or_path": "tiny-random", "base_model_path": "other"}, "must equal"),
        ({"use_ewc": "yes"}, "true or false"),
    ],
)
def test_easycl_settings_without_a_retain_equivalent_are_refused(raw, needle):
    assert needle in _refusal({**BASE, **raw})


def test_base_model_path_equal_to_the_model_selects_the_base_generator():
    raw = {
        **BASE,
        "use_pseudo_replay": True,
        "model_name_or_path": "tiny-random",
        "base_model_path": "tiny-random",
    }
    assert config_from_dict(raw).method.params["generator"] == "base"


# --- dataset: a,b,c -------------------------------------------------------------------------------------


@pytest.fixture
def dataset_dir(tmp_path):
    row = [{"instruction": "q", "input": "", "output": "a"}]
    info = {}
    for name in ("alpha", "alpha_test", "beta", "gamma", "gamma_eval"):
        (tmp_path / f"{name}.json").write_text(json.dumps(row * 4))
        info[name] = {"file_name": f"{name}.json"}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return str(tmp_path)


def test_dataset_list_is_the_stream_and_name_test_entries_are_its_test_sets(dataset_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="retain"):
        config = config_from_dict({"dataset": "alpha, beta", "dataset_dir": dataset_dir})
    assert [(t.name, t.train, t.test) for t in config.stream.tasks] == [
        ("alpha", "alpha", "alpha_test"),
        ("beta", "beta", ""),
    ]
    warnings = [r.getMessage() for r in caplog.records if "no test set" in r.getMessage()]
    assert len(warnings) == 1 and "no test set for beta " in warnings[0]


def test_dataset_dir_given_on_the_command_line_is_the_one_looked_in(dataset_dir):
    config = config_from_dict({"dataset": "alpha"}, overrides=[f"dataset_dir={dataset_dir}"])
    assert config.stream.tasks[0].test == "alpha_test"


def test_eval_dataset_names_each_dataset_test_set(dataset_dir):
    config = config_from_dict(
        {"dataset": "alpha,gamma", "eval_dataset": "beta,gamma_eval", "dataset_dir": dataset_dir}
    )
    assert [t.test for t in config.stream.tasks] == ["beta", "gamma_eval"]


def test_dataset_dir_defaults_to_llamafactory_data():
    assert config_from_dict({"dataset": "alpha"}).stream.dataset_dir == "data"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"dataset": "a,b", "eval_dataset": "x"}, "1 test set(s) for 2 dataset(s)"),
        ({"eval_dataset": "x"}, "only with dataset"),
        ({"dataset": "a", "tasks": ["synthetic:parity"]}, "keep one of the two"),
        ({"dataset": ""}, "comma-separated"),
    ],
)
def test_inconsistent_dataset_settings_are_refused(raw, needle):
    assert needle in _refusal(raw)


# --- retain config and the doc ---------------------------------------------------------------------------


def test_config_reference_lists_every_key_with_default_help_and_flat_names():
    text = config_reference()
    for section, (cls, prefix) in __import__("retain.config", fromlist=["x"]).REFERENCE_SECTIONS.items():
        assert f"[{section}]" in text
        for spec in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(spec.type) and spec.name not in ("tasks",) and section != "run":
                assert f"{prefix}{spec.name}: " in text, spec.name
    assert "train.learning_rate: float = 0.0002" in text
    assert "also at the top level as: learning_rate" in text
    train = config_reference("train")
    assert train.startswith("[train]") and "[model]" not in train
    with pytest.raises(RetainError, match="did you mean: train"):
        config_reference("trian")


def test_retain_config_command_prints_a_section(capsys):
    from retain.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    if "config" not in commands:
        pytest.skip("the `retain config` subcommand is not in retain.cli yet")
    result = retain_in_process("config", "eval", capsys=capsys)
    assert result.returncode == 0 and result.stdout == config_reference("eval")
    assert "also at the top level as: per_device_eval_batch_size" in result.stdout
    assert retain_in_process("config", "evl", capsys=capsys).returncode == 2


def test_the_mapping_doc_is_generated_from_the_tables():
    with open(DOC, encoding="utf-8") as handle:
        assert handle.read() == compat.mapping_table_markdown(), (
            "docs/llamafactory_easycl.md is stale: regenerate it (the command is in its first lines)"
        )


# --- real-world-shaped configs through `retain run --dry-run` ------------------------------------------

_LLAMAFACTORY_HEAD = """
### model
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
trust_remote_code: true
### method
stage: sft
do_train: true
finetuning_type: {finetuning_type}
lora_rank: 8
lora_target: all
### dataset
dataset: identity,alpaca_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4
### output
output_dir: {output_dir}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]
### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""

# name -> (extra YAML lines, expected exit code, what the error or the logs must say)
REAL_WORLD = {
    "llamafactory-lora-sft": ("", 0, "no test set for identity, alpaca_en_demo"),
    "llamafactory-lora-sft-eval": (
        "eval_dataset: alpaca_zh_demo,identity\nval_size: 0.1\nper_device_eval_batch_size: 1\n"
        "eval_strategy: steps\neval_steps: 500",
        2,
        "val_size: LLaMA-Factory splits",
    ),
    # LLaMA-Factory's path is relative to its own repository: the file is looked for and named.
    "llamafactory-ds3": (
        "deepspeed: examples/deepspeed/ds_z3_config.json",
        2,
        "train.deepspeed file examples/deepspeed/ds_z3_config.json does not exist",
    ),
    "llamafactory-qlora": ("quantization_bit: 4\nquantization_method: bnb", 2, "config: 2 keys"),
    "llamafactory-flash-fp16": ("flash_attn: sdpa\nfp16: false\ndisable_gradient_checkpointing: true", 0, ""),
    "easycl-ewc": ("use_ewc: true\newc_lambda: 10000\newc_num_samples: 100", 0, "accepted, changing nothing"),
    "easycl-replay": ("use_replay: true\nreplay_ratio: 0.3", 0, ""),
    "easycl-lwf": ("use_lwf: true\nlwf_temperature: 2.0\nlwf_alpha: 0.5", 0, ""),
    "easycl-olora": ("use_olora: true\northogonal_lambda: 0.5\nl2_lambda: 0.0\nolora_history_path: x", 0, ""),
    "easycl-ilora": (
        "use_ilora: true\nema_alpha: 0.25\nconsistency_weight: 1.0\nsave_ema_adapter: true",
        0,
        "",
    ),
    "easycl-gem": ("use_gem: true\ngem_memory_strength: 0.5", 0, ""),
    "easycl-abscl": ("use_abscl: true\nabscl_orthogonal_lambda: 0.1\nadapters_save_path: saves/a", 0, ""),
    "easycl-moelora": ("use_moe: true\nexpert_num: 4\ntask_embedding_dim: 64", 2, "no task embedding"),
}


@pytest.mark.parametrize("name", sorted(REAL_WORLD))
def test_real_world_shaped_configs_dry_run(name, shared_data, tmp_path, capsys, caplog):
    data = os.path.join(shared_data, "llamafactory")
    if not os.path.isfile(os.path.join(data, "dataset_info.json")):
        pytest.skip(f"{data}/dataset_info.json is absent (LLaMA-Factory's demo data)")
    extra, code, needle = REAL_WORLD[name]
    finetuning_type = "full" if name == "llamafactory-ds3" else "lora"
    text = (
        _LLAMAFACTORY_HEAD.format(finetuning_type=finetuning_type, output_dir=tmp_path / "out") + extra + "\n"
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    # The hub model id is not in this machine's cache: the tiny model stands in for it.
    overrides = [f"dataset_dir={data}", "model_name_or_path=tiny-random", "max_samples=8", "test_size=2"]
    with caplog.at_level(logging.INFO, logger="retain"):
        result = retain_in_process("run", str(path), "--dry-run", *overrides, capsys=capsys)
    assert result.returncode == code, result.stderr + result.stdout
    assert needle in result.stderr + result.stdout + caplog.text
    if code == 0:
        assert "dry run: nothing was trained" in result.stdout


def test_deepspeed_and_fsdp_keys_map_to_the_strategy_settings(tmp_path):
    ds = tmp_path / "ds_z2.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    found = compat.translate({"deepspeed": str(ds), "fsdp": ["full_shard", "auto_wrap"]})
    assert found.entries == {"train.deepspeed": str(ds), "train.fsdp": "full_shard auto_wrap"}
    refused = compat.translate({"fsdp_config": {"min_num_params": 0}})
    want = "fsdp_config: give the path of a JSON or YAML file (an inline mapping is not read)"
    assert refused.refused == [want]
