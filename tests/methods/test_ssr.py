"""SSR: inputs from the base model, outputs from the latest model, k-means selection, capped memory."""

from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.lora import LoraLayer

from retain.config import config_from_dict
from retain.engine.loop import make_plan
from retain.errors import RetainError
from retain.methods import ssr
from retain.methods.common import pseudo
from retain.methods.ssr import SSR, SSRConfig, kmeans_select

from ..helpers import tiny_config, tiny_context


def blobs(sizes, dim=4, seed=0):
    """Points around well-separated directions (k-means sees L2-normalised rows)."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for j, size in enumerate(sizes):
        center = torch.zeros(dim)
        center[j] = 10.0
        rows.append(center + torch.randn(size, dim, generator=g))
        labels += [j] * size
    return torch.cat(rows), labels


def test_kmeans_selection_returns_the_requested_number_spread_over_the_clusters():
    x, labels = blobs([10, 10, 10])
    picked = kmeans_select(x, 3, n_clusters=20, seed=0)  # n_clusters >= n: one nearest each centroid
    assert len(picked) == 3 and sorted(labels[i] for i in picked) == [0, 1, 2]
    assert picked == kmeans_select(x, 3, n_clusters=20, seed=0)
    picked = kmeans_select(x, 6, n_clusters=3, seed=1)
    assert len(set(picked)) == 6 and sorted(labels[i] for i in picked) == [0, 0, 1, 1, 2, 2]
    x, labels = blobs([20, 10, 10], seed=2)
    picked = kmeans_select(x, 8, n_clusters=3, seed=0)  # quotas proportional to cluster sizes
    assert sorted(labels[i] for i in picked) == [0, 0, 0, 0, 1, 1, 2, 2]
    # within a cluster, the members nearest its centroid come first
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    members = [i for i, label in enumerate(labels) if label == 1]
    centroid = unit[members].mean(0)
    nearest = min(members, key=lambda i: float((unit[i] - centroid).norm()))
    assert nearest in picked
    assert kmeans_select(x, 50, n_clusters=3, seed=0) == list(range(40))


def adapters_disabled(model) -> bool:
    return any(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))


class Spy:
    """Stands in for generate: records whether the LoRA adapters were disabled, answers by call."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, tokenizer, prompts, **options):
        self.calls.append(
            {
                "disabled": adapters_disabled(model),
                "prompts": [tokenizer.decode(p) for p in prompts],
                **options,
            }
        )
        if len(self.calls) % 2 == 1:  # in-context generation of inputs
            return [
                "garbage"
                if i % 4 == 3
                else f"Is {1000 + i} even or odd? Answer with even or odd.\nOutput: maybe"
                for i in range(len(prompts))
            ]
        return ["odd" if i % 5 else "" for i in range(len(prompts))]  # refined outputs, one in 5 empty


def test_base_model_writes_inputs_latest_model_answers_and_kmeans_selects(tmp_path, monkeypatch):
    spy = Spy()
    monkeypatch.setattr(pseudo, "generate", spy)
    features_disabled = []
    real_features = ssr.prompt_features

    def spy_features(model, prompts, pad_id, batch_size):
        features_disabled.append(adapters_disabled(model))
        return real_features(model, prompts, pad_id, batch_size)

    monkeypatch.setattr(ssr, "prompt_features", spy_features)
    ctx, tasks = tiny_context(tmp_path, "ssr")
    ctx.run_dir = str(tmp_path / "run")
    method = SSR(SSRConfig(num_shots=2, candidates_per_task=16, memory_per_task=5, n_clusters=3))
    assert method.training_data(ctx, tasks[0], tasks[0].train) == tasks[0].train
    method.after_task(ctx, tasks[0], tasks[0].train)
    assert not spy.calls

    ctx.task_index = 2
    data = method.training_data(ctx, tasks[1], tasks[1].train)
    generation, refinement = spy.calls
    assert generation["disabled"] and len(generation["prompts"]) == 16  # base model: adapters off
    assert generation["do_sample"] and generation["top_p"] == 0.6 and generation["repetition_penalty"] == 1.2
    assert all(d.messages[0]["content"] in p for d in method.demos["parity"] for p in generation["prompts"])
    assert features_disabled == [True]
    assert (
        not refinement["disabled"] and len(refinement["prompts"]) == 5
    )  # latest model answers the selection
    assert not refinement.get("do_sample")
    assert not adapters_disabled(ctx.model)
    rehearsed = data[len(tasks[1].train) :]
    assert len(rehearsed) == 4  # 12 parsable inputs, 5 selected, one refined output empty
    assert all(e.reference == "odd" and e.meta["pseudo_from"] == "parity" for e in rehearsed)
    assert all(any(e.messages[0]["content"] in p for p in refinement["prompts"]) for e in rehearsed)
    folder = tmp_path / "run" / "pseudo"
    statuses = [
        json.loads(x)["status"]
        for x in (folder / "2-capital_letters.candidates.jsonl").read_text().splitlines()
    ]
    assert sorted(set(statuses)) == ["empty_output", "kept", "not_selected", "unparsable"]
    assert statuses.count("kept") == 4 and statuses.count("not_selected") == 7
    assert len((folder / "2-capital_letters.jsonl").read_text().splitlines()) == 4

    restored = SSR()
    restored.load_state_dict(method.state_dict())
    assert restored.memory.examples() == method.memory.examples()


def test_ssr_refuses_full_finetuning(tmp_path):
    raw = tiny_config(tmp_path, "ssr", model={"finetuning_type": "full"})
    with pytest.raises(RetainError, match="full fine-tuning"):
        make_plan(config_from_dict(raw))
