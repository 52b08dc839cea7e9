"""Models named by Hugging Face Hub id load from the local Hugging Face cache, offline; a missing one, an
incomplete snapshot or code the model ships without the opt-in are user errors, caught by the plan too."""

from __future__ import annotations

import json
import os

import pytest
import torch

from retain.config import ModelConfig, config_from_dict
from retain.engine.plan import make_plan
from retain.errors import RetainError
from retain.models import loading
from retain.models.tiny import TINY_LAYERS, tiny_model, tiny_tokenizer, tiny_vlm, tiny_vlm_processor

from ..helpers import tiny_config

REPO = "retain-tests/Tiny-Llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_snapshot(cache, repo_id: str = REPO, model=None, save=None) -> str:
    """Write a model into `cache` in the Hugging Face hub layout (models--org--name/snapshots/<commit>/,
    refs/main naming the commit), as `hf download` leaves it; returns the snapshot folder."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = folder / "snapshots" / COMMIT
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    if save is not None:
        save(snapshot)
    else:
        (model or tiny_model()).save_pretrained(snapshot)
        tiny_tokenizer().save_pretrained(snapshot)
    return str(snapshot)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache that HF_HUB_CACHE points at."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_loads_model_and_tokenizer_from_the_cache(hub_cache):
    model = tiny_model(seed=5)
    snapshot = cache_snapshot(hub_cache, model=model)
    loaded, tokenizer, info = loading.load_model(REPO)
    assert info.source == REPO and info.processor is None
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab()
    assert loading.model_dir(REPO) == snapshot
    assert loading.model_layer_count(REPO) == TINY_LAYERS
    assert loading.load_encoders(REPO)[1] is None and not loading.is_image_text(REPO)


def test_hf_home_without_hf_hub_cache_is_searched(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snapshot = cache_snapshot(tmp_path / "home" / "hub")
    assert loading.hub_cache_dir() == str(tmp_path / "home" / "hub")
    assert loading.model_dir(REPO) == snapshot


def test_an_image_text_model_in_the_cache_loads_with_its_processor(hub_cache):
    def save(folder):
        tiny_vlm().save_pretrained(folder)
        tiny_vlm_processor().save_pretrained(folder)

    cache_snapshot(hub_cache, save=save)
    assert loading.is_image_text(REPO)
    model, tokenizer, info = loading.load_model(REPO, ModelConfig(name_or_path=REPO, dtype="bfloat16"))
    assert type(model).__name__ == "LlavaForConditionalGeneration" and info.processor is not None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert loading.load_encoders(REPO)[1] is not None


def test_a_missing_hub_id_names_the_id_the_cache_and_the_fix(hub_cache):
    with pytest.raises(RetainError) as error:
        loading.load_model("Qwen/Qwen3-4B-Instruct-2507")
    message = str(error.value)
    assert "Qwen/Qwen3-4B-Instruct-2507" in message and str(hub_cache) in message
    assert "models--Qwen--Qwen3-4B-Instruct-2507" in message
    assert "hf download Qwen/Qwen3-4B-Instruct-2507" in message and "local model folder" in message
    with pytest.raises(RetainError, match="neither a built-in name"):
        loading.load_model("no/such/path")  # not a Hub id either


def test_a_snapshot_without_weights_says_to_download_again(hub_cache):
    cache_snapshot(hub_cache, save=lambda folder: tiny_tokenizer().save_pretrained(folder))
    with pytest.raises(RetainError, match=f"{REPO}.*no config.json.*hf download {REPO}"):
        loading.load_model(REPO)


def _with_remote_code(folder) -> None:
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="retain_custom_llm", auto_map={"AutoConfig": "modeling_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))


def test_a_model_with_its_own_code_needs_the_trust_remote_code_opt_in(hub_cache):
    cache_snapshot(hub_cache, save=_with_remote_code)
    with pytest.raises(
        RetainError, match="own Python code.*retain_custom_llm.*model.trust_remote_code: true"
    ):
        loading.load_model(REPO)
    with pytest.raises(RetainError, match="trust_remote_code"):
        loading.check_model(ModelConfig(name_or_path=REPO))
    # opted in, the check passes (the code itself is then transformers' business)
    loading.check_model(ModelConfig(name_or_path=REPO, trust_remote_code=True))


def test_a_known_architecture_with_an_auto_map_loads_without_remote_code(hub_cache):
    def save(folder):
        _with_remote_code(folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))

    cache_snapshot(hub_cache, save=save)
    loading.check_model(ModelConfig(name_or_path=REPO))  # transformers' own Llama is used


def test_dry_run_plan_checks_that_the_hub_model_resolves(tmp_path, hub_cache):
    raw = tiny_config(tmp_path, model={"name_or_path": "Qwen/Qwen3-4B-Instruct-2507"})
    with pytest.raises(RetainError, match="Qwen/Qwen3-4B-Instruct-2507.*Hugging Face cache"):
        make_plan(config_from_dict(raw))
    cache_snapshot(hub_cache)
    plan = make_plan(config_from_dict(tiny_config(tmp_path, model={"name_or_path": REPO})))
    assert plan.config.model.name_or_path == REPO
    assert not os.path.exists(raw["output_dir"])
