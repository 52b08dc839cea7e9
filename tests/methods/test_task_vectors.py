"""Task vectors: TIES trim / sign election / disjoint mean on a hand-made example, DARE, task arithmetic
through PEFT's exact concatenation, the exact dense adapter, and LiNeS's per-layer factors."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from retain.config import config_from_dict
from retain.methods.common import task_vectors as tv
from retain.models.adapters import add_adapter, apply_finetuning, peft_model
from retain.models.tiny import tiny_model, tiny_tokenizer


def deep_tiny_model(tokenizer, layers: int):
    """The tiny Llama with `layers` blocks instead of 2 (LiNeS needs more than a first and a last)."""
    config = tiny_model(tokenizer).config
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


# Three task vectors of one 4-entry tensor, and what each TIES step makes of them (density 0.5: the
# top 2 magnitudes of each vector survive).
TAUS = [[3.0, -2.0, 0.5, 1.0], [-1.0, -4.0, 0.2, 2.0], [2.0, 1.0, -0.1, -3.0]]
TRIMMED = [[3.0, -2.0, 0.0, 0.0], [0.0, -4.0, 0.0, 2.0], [2.0, 0.0, 0.0, -3.0]]
# sums 5, -6, 0, -1 -> signs +, -, (0: majority of +,-,- = -), -
SIGNS = [1.0, -1.0, -1.0, -1.0]
# mean of the agreeing kept entries: (3+2)/2, (-2-4)/2, none -> 0, -3/1
TIES = [2.5, -3.0, 0.0, -3.0]


def vectors(rows):
    return [{"w": torch.tensor(row)} for row in rows]


def test_ties_trims_elects_signs_and_averages_the_agreeing_entries():
    flat = torch.tensor(TAUS)
    trimmed = tv.trim_top_k(flat, 0.5)
    assert trimmed.tolist() == TRIMMED
    signs = tv.elect_sign(trimmed)
    assert signs.tolist() == SIGNS
    assert tv.disjoint_mean(trimmed, signs).tolist() == TIES
    merged = tv.merge_task_vectors(vectors(TAUS), "ties", density=0.5, lam=2.0)
    assert merged["w"].tolist() == [2 * v for v in TIES]


def test_ties_trims_over_the_whole_vector_not_per_tensor():
    # The reference keeps the top-k of the flattened vector: a tensor of small values loses all of them.
    merged = tv.merge_task_vectors(
        [{"a": torch.tensor([10.0, 9.0]), "b": torch.tensor([0.1, 0.2])}], "ties", density=0.5
    )
    assert merged["a"].tolist() == [10.0, 9.0] and merged["b"].tolist() == [0.0, 0.0]


def test_task_arithmetic_is_the_weighted_sum_times_lam():
    merged = tv.merge_task_vectors(vectors(TAUS), "task_arithmetic", weights=[1.0, 0.5, 2.0], lam=0.5)
    want = 0.5 * (torch.tensor(TAUS[0]) + 0.5 * torch.tensor(TAUS[1]) + 2 * torch.tensor(TAUS[2]))
    assert torch.allclose(merged["w"], want)


def test_dare_drops_about_p_of_the_entries_rescales_the_rest_and_is_seeded():
    ones = [{"w": torch.ones(20000)}]
    merged = tv.merge_task_vectors(ones, "dare_linear", drop_rate=0.75, seed=5)["w"]
    kept = merged != 0
    assert 0.72 < 1 - kept.float().mean() < 0.78
    assert torch.allclose(merged[kept], torch.full_like(merged[kept], 4.0))
    assert abs(float(merged.mean()) - 1.0) < 0.05  # unbiased
    again = tv.merge_task_vectors(ones, "dare_linear", drop_rate=0.75, seed=5)["w"]
    assert torch.equal(merged, again)
    assert not torch.equal(merged, tv.merge_task_vectors(ones, "dare_linear", drop_rate=0.75, seed=6)["w"])


def test_dare_ties_elects_signs_after_dropping():
    merged = tv.merge_task_vectors(vectors(TAUS), "dare_ties", drop_rate=0.0)
    flat = torch.tensor(TAUS)
    assert torch.allclose(merged["w"], tv.disjoint_mean(flat, tv.elect_sign(flat)))


def lora_model(layers: int = 2, adapters: int = 2, seed: int = 0):
    config = config_from_dict(
        {
            "stream": {"tasks": ["synthetic:parity"]},
            "model": {"name_or_path": "tiny-random", "lora_rank": 4, "lora_alpha": 8},
        }
    )
    tokenizer = tiny_tokenizer()
    model = apply_finetuning(deep_tiny_model(tokenizer, layers), config.model)
    for i in range(2, adapters + 1):
        add_adapter(model, f"task{i}")
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model, tokenizer


def test_task_arithmetic_through_peft_cat_equals_the_dense_sum():
    model, _ = lora_model(adapters=3)
    taus = [tv.lora_task_vector(model, a) for a in ("default", "task2", "task3")]
    tv.merge_adapters(model, ["default", "task2", "task3"], "task_arithmetic", weights=[1, 2, 0.5], lam=0.3)
    merged = tv.lora_task_vector(model, "merged")
    for name, value in merged.items():
        want = 0.3 * (taus[0][name] + 2 * taus[1][name] + 0.5 * taus[2][name])
        assert torch.allclose(value, want, atol=1e-6)
    assert peft_model(model).peft_config["merged"].r == 12  # the ranks add up: exact, not truncated


@pytest.mark.parametrize("how", ["ties", "dare_ties"])
def test_a_dense_merge_is_stored_exactly_as_an_adapter_that_loads_back(tmp_path, how):
    model, tokenizer = lora_model()
    taus = [tv.lora_task_vector(model, a) for a in ("default", "task2")]
    tv.merge_adapters(model, ["default", "task2"], how, density=0.3, drop_rate=0.5, seed=1)
    want = tv.merge_task_vectors(taus, how, density=0.3, drop_rate=0.5, seed=1)
    got = tv.lora_task_vector(model, "merged")
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    inner = peft_model(model)
    assert not any(p.requires_grad for n, p in inner.named_parameters() if ".merged." in n)
    tv.save_adapter(model, "merged", str(tmp_path / "adapter"))
    inner.base_model.set_adapter(["merged"])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    expected = inner(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(deep_tiny_model(tokenizer, 2), str(tmp_path / "adapter"))
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)


def test_lines_scales_the_shallowest_block_by_alpha_and_the_deepest_by_alpha_plus_beta():
    model, _ = lora_model(layers=4)
    before = tv.lora_task_vector(model, "default")
    other = tv.lora_task_vector(model, "task2")
    factors = tv.lines_scale_lora(model, ["default"], alpha=0.2, beta=0.6)
    after = tv.lora_task_vector(model, "default")
    expected = {0: 0.2, 1: 0.4, 2: 0.6, 3: 0.8}  # alpha + beta * l / (L - 1), L = 4
    for name, value in after.items():
        factor = expected[tv.block_index(name)]
        assert factors[name] == pytest.approx(factor)
        assert torch.allclose(value, factor * before[name], atol=1e-7)
        assert before[name].abs().sum() > 0
    assert all(torch.equal(v, other[n]) for n, v in tv.lora_task_vector(model, "task2").items())


def test_lines_on_full_weights_pulls_each_block_toward_theta0_and_non_block_weights_by_alpha():
    tokenizer = tiny_tokenizer()
    model = deep_tiny_model(tokenizer, 3)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    tv.lines_scale_full(model, base, alpha=0.1, beta=0.8)
    params = dict(model.named_parameters())
    for name, factor in (
        ("model.layers.0.self_attn.q_proj.weight", 0.1),
        ("model.layers.1.mlp.up_proj.weight", 0.5),
        ("model.layers.2.self_attn.o_proj.weight", 0.9),
        ("model.embed_tokens.weight", 0.1),
        ("model.norm.weight", 0.1),
    ):
        assert torch.allclose(params[name] - base[name], torch.full_like(base[name], factor), atol=1e-6), name


def test_block_index_reads_the_layer_number():
    assert tv.block_index("base_model.model.model.layers.12.self_attn.q_proj") == 12
    assert tv.block_index("transformer.h.3.attn.c_attn.weight") == 3
    assert tv.block_index("model.embed_tokens.weight") is None
    assert tv.lines_factor("model.norm.weight", 30, 0.3, 0.7) == 0.3
