"""OSFT: updates stay out of the frozen top-k singular subspaces; the frozen rank follows its schedule."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.data.streams import build_stream
from retain.engine.loop import run_experiment
from retain.errors import RetainError
from retain.methods.base import MethodContext
from retain.methods.common.subspaces import FrozenSubspace, frozen_rank
from retain.methods.osft import OSFT, OSFTConfig
from retain.methods.registry import create_method
from retain.models.adapters import apply_finetuning, trainable_parameters
from retain.models.tiny import tiny_model, tiny_tokenizer

from ..helpers import assert_same, crash_then_resume, tiny_config, train_one_task

TASKS = ["synthetic:parity", "synthetic:capital_letters", "synthetic:max_number"]


def full_context(tmp_path, finetuning_type="full"):
    config = config_from_dict(tiny_config(tmp_path, "osft", model={"finetuning_type": finetuning_type}))
    tokenizer = tiny_tokenizer()
    model = apply_finetuning(tiny_model(tokenizer), config.model)
    return MethodContext.create(model, tokenizer, config, build_stream(config), task_index=1)


def matrices(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2 and "layers." in n}


def top_subspace(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vt = torch.linalg.svd(weight.double(), full_matrices=False)
    return u[:, :k], vt[:k, :]


def leak(delta: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """Largest component of `delta` in the left or right frozen subspace, relative to its norm."""
    d = delta.double()
    return float(max((u.T @ d).norm(), (d @ v.T).norm()) / d.norm())


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_an_adamw_task_changes_each_matrix_only_outside_its_frozen_subspace(tmp_path, finetuning_type):
    ctx = full_context(tmp_path, finetuning_type)
    method = OSFT(OSFTConfig(frozen_ratio=0.5))
    method.training_data(ctx, ctx.tasks[0], ctx.tasks[0].train)
    targets = {n: p for n, p in trainable_parameters(ctx.model).items()}
    before = {n: p.detach().clone() for n, p in targets.items()}
    assert targets and all(p.dim() == 2 for p in targets.values())  # norms, embeddings, biases frozen
    # AdamW with weight decay: its per-element scaling and the decay both leave the subspace on their own.
    train_one_task(ctx, ctx.tasks, method, tmp_path / "t", max_steps=6, learning_rate=5e-2, weight_decay=0.1)
    for name, param in targets.items():
        k = frozen_rank(param.shape, 0.5)
        if finetuning_type == "lora" and "lora_B" in name:
            continue  # B starts at zero: its singular vectors are arbitrary, checked below on A
        u, v = top_subspace(before[name], k)
        delta = param.detach() - before[name]
        assert delta.norm() > 1e-4, name  # the free part learns
        assert leak(delta, u, v) < 1e-4, name


def test_the_gradient_is_projected_before_the_step(tmp_path):
    ctx = full_context(tmp_path)
    method = OSFT(OSFTConfig(frozen_ratio=0.5))
    method.training_data(ctx, ctx.tasks[0], ctx.tasks[0].train)
    batch = ctx.collate(ctx.encode(ctx.tasks[0].train[:4]))
    ctx.forward(ctx.model, batch).loss.backward()
    raw = {id(p): p.grad.clone() for p, _ in method.targets}
    method.before_optimizer_step(ctx, ctx.model)
    for param, subspace in method.targets:
        assert leak(raw[id(param)], subspace.u.double(), subspace.v.double()) > 1e-2  # it had a component
        assert leak(param.grad, subspace.u.double(), subspace.v.double()) < 1e-5


def test_the_frozen_rank_grows_with_the_schedule_over_a_three_task_stream(tmp_path):
    params = {"frozen_ratio": 0.25, "ratio_step": 0.25, "max_ratio": 0.6}
    raw = tiny_config(
        tmp_path,
        "osft",
        params,
        model={"finetuning_type": "full"},
        stream={"tasks": TASKS},
        train={"weight_decay": 0.1},
    )
    run_experiment(config_from_dict(raw), evaluate=False)
    run = tmp_path / "run" / "tasks"
    names = ["0-init", "1-parity", "2-capital_letters", "3-max_number"]
    weights = [load_file(str(run / n / "model" / "model.safetensors")) for n in names]
    history = torch.load(run / names[-1] / "method_state.pt")["history"]
    ratios = [0.25, 0.5, 0.6]  # the last one capped by max_ratio
    assert [history[t]["ratio"] for t in (1, 2, 3)] == pytest.approx(ratios)
    targets = [n for n in weights[0] if n.endswith("proj.weight")]
    assert targets
    for t in (1, 2, 3):
        for name in targets:
            k = history[t]["frozen_rank"][name]
            assert k == frozen_rank(weights[0][name].shape, ratios[t - 1])
            old, new = weights[t - 1][name], weights[t][name]
            u, v = top_subspace(old, k)
            delta = new - old
            assert leak(delta, u, v) < 1e-4, (t, name)
            # One direction further is free: the constraint is exactly the scheduled rank, no more.
            u_more, v_more = top_subspace(old, min(k + 2, min(old.shape)))
            assert leak(delta, u_more, v_more) > 1e-3, (t, name)
        # The frozen rank grows with the task count.
    assert all(
        history[1]["frozen_rank"][n] < history[2]["frozen_rank"][n] <= history[3]["frozen_rank"][n]
        for n in targets
    )
    # What is not decomposed (embeddings, norms) is frozen throughout.
    others = [n for n in weights[0] if n not in targets]
    assert others and all(torch.equal(weights[0][n], weights[3][n]) for n in others)


def test_full_finetuning_resumes_after_a_crash_with_the_same_matrix(tmp_path, monkeypatch):
    def raw(folder):
        return tiny_config(
            tmp_path / folder, "osft", model={"finetuning_type": "full"}, stream={"tasks": TASKS}
        )

    expected = run_experiment(config_from_dict(raw("whole")))
    assert_same(crash_then_resume(raw("crashed"), monkeypatch), expected)


def test_the_subspace_helper_restores_the_frozen_part():
    torch.manual_seed(0)
    weight = torch.randn(12, 7)
    subspace = FrozenSubspace(weight, 3)
    moved = weight + torch.randn(12, 7)
    subspace.constrain_(moved)
    assert subspace.leak(moved - weight) < 1e-5
    assert frozen_rank((12, 7), 0.5) == 3 and frozen_rank((12, 7), 0.0) == 0


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"max_ratio": 1.0}, "max_ratio must be in"),
        ({"frozen_ratio": 0.95}, "frozen_ratio must be in"),
        ({"ratio_step": -0.1}, "ratio_step must be"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(params, needle):
    with pytest.raises(RetainError, match=needle):
        create_method("osft", params)
