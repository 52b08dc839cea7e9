"""model.adapter_name_or_path: the stream starts from a saved PEFT LoRA adapter, as the trainable
`default` adapter; its own LoRA settings win; a missing or non-adapter folder is a user error."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from retain.config import ModelConfig, config_from_dict
from retain.engine.plan import make_plan
from retain.errors import RetainError
from retain.models.adapters import (
    adapter_state,
    add_adapter,
    apply_finetuning,
    peft_model,
    trainable_parameters,
)
from retain.models.tiny import tiny_model, tiny_tokenizer

from ..helpers import tiny_config


def saved_adapter(folder, **settings) -> str:
    """Train-free but non-zero LoRA weights on the tiny model (seed 0), saved as a PEFT adapter folder."""
    config = ModelConfig(name_or_path="tiny-random", **{"lora_rank": 2, "lora_alpha": 4.0, **settings})
    model = apply_finetuning(tiny_model(), config)
    torch.manual_seed(7)
    with torch.no_grad():
        for param in trainable_parameters(model).values():
            param.normal_(std=0.2)  # LoRA B starts at zero: give it weights that change the output
    model.save_pretrained(folder)
    return str(folder)


def test_the_stream_starts_from_the_saved_adapter(tmp_path):
    folder = saved_adapter(tmp_path / "adapter", lora_target="q_proj,v_proj")
    config = ModelConfig(name_or_path="tiny-random", adapter_name_or_path=folder)
    model = peft_model(apply_finetuning(tiny_model(), config))
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    saved = load_file(f"{folder}/adapter_model.safetensors")
    state = {n.replace(".default", ""): p for n, p in adapter_state(model, "default").items()}
    assert saved.keys() == state.keys()
    for name, value in saved.items():
        assert torch.equal(state[name].detach(), value), name
        assert state[name].requires_grad, name  # trained further on task 1
    # the model answers as the adapter on the base model does in plain PEFT (so row 0 is the adapter's)
    ids = tiny_tokenizer()(["the quick brown fox"], return_tensors="pt")["input_ids"]
    plain = PeftModel.from_pretrained(tiny_model(), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, plain(input_ids=ids).logits)
        untouched = tiny_model()(input_ids=ids).logits
    assert not torch.allclose(plain(input_ids=ids).logits, untouched)  # the adapter does change it
    add_adapter(model, "task2")  # methods that add adapters later get the adapter's settings
    assert model.peft_config["task2"].target_modules == {"q_proj", "v_proj"}


def test_the_adapters_own_lora_settings_win_with_a_log_line(tmp_path, caplog):
    folder = saved_adapter(tmp_path / "adapter", use_rslora=True)
    config = ModelConfig(
        name_or_path="tiny-random", adapter_name_or_path=folder, lora_rank=8, lora_dropout=0.1
    )
    with caplog.at_level(logging.WARNING, logger="retain.models.adapters"):
        model = peft_model(apply_finetuning(tiny_model(), config))
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.use_rslora) == (2, 4.0, True)
    assert lora.lora_dropout == 0.1  # a training setting: the config's
    assert "r 2 (model.lora_rank gives 8)" in caplog.text and "use_rslora True" in caplog.text
    assert "lora_alpha" in caplog.text and "target_modules" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retain.models.adapters"):
        same = ModelConfig(adapter_name_or_path=folder, lora_rank=2, lora_alpha=4.0, use_rslora=True)
        apply_finetuning(tiny_model(), same)
    assert "adapter_name_or_path" not in caplog.text  # nothing differs: nothing logged


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments")  # PEFT reading a LoRA config as IA3
def test_a_missing_or_non_adapter_folder_is_a_user_error(tmp_path):
    def start(path):
        apply_finetuning(tiny_model(), ModelConfig(adapter_name_or_path=str(path)))

    with pytest.raises(RetainError, match=f"adapter_name_or_path {tmp_path / 'nope'} is not a folder"):
        start(tmp_path / "nope")
    tiny_model().save_pretrained(tmp_path / "model")  # a model folder, not an adapter
    with pytest.raises(RetainError, match=f"{tmp_path / 'model'} holds no adapter_config.json"):
        start(tmp_path / "model")
    folder = saved_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(RetainError, match="no weights"):
        start(folder)
    folder = saved_adapter(tmp_path / "ia3")
    config = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(RetainError, match="IA3 adapter; retain starts from LoRA adapters only"):
        start(folder)
    with pytest.raises(RetainError, match="needs finetuning_type: lora"):
        apply_finetuning(tiny_model(), ModelConfig(adapter_name_or_path=folder, finetuning_type="full"))


def test_an_adapter_for_another_model_is_a_user_error(tmp_path):
    folder = saved_adapter(tmp_path / "adapter")
    wider = tiny_model(hidden_size=64, intermediate_size=96)
    with pytest.raises(RetainError, match=f"adapter_name_or_path {folder} does not fit model"):
        apply_finetuning(wider, ModelConfig(adapter_name_or_path=folder))


def test_dry_run_checks_the_adapter_folder(tmp_path):
    raw = tiny_config(tmp_path, model={"adapter_name_or_path": str(tmp_path / "missing")})
    with pytest.raises(RetainError, match="adapter_name_or_path .*missing is not a folder"):
        make_plan(config_from_dict(raw))
    folder = saved_adapter(tmp_path / "adapter")
    make_plan(config_from_dict(tiny_config(tmp_path, model={"adapter_name_or_path": folder})))
