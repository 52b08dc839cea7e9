"""CoSO: each step is taken in a low-rank subspace of the gradient, orthogonal to the bases of every earlier
task, which grow from the tasks' Frequent Directions sketches."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.errors import RetainError
from retain.methods.base import ContinualMethod
from retain.methods.common.subspaces import FrequentDirections, extend_orthonormal_basis
from retain.methods.coso import CoSO, CoSOAdam, CoSOConfig, SubspaceTarget
from retain.methods.registry import create_method
from retain.models.adapters import trainable_parameters

from ..helpers import assert_same, crash_then_resume, tiny_config, tiny_context, train_one_task

TASKS = ["synthetic:parity", "synthetic:capital_letters", "synthetic:max_number"]
SMALL = {"proj_rank": 4, "sketch_rank": 12}


def checkpoints(run) -> tuple[list[dict], list[dict]]:
    """Weights (the model's, or the adapter's under LoRA) and CoSO bases after each task (0-init first),
    keyed from `layers.` on, without PEFT's adapter name, as the method's target names are."""
    tasks = run / "run" / "tasks"
    names = sorted(p.name for p in tasks.iterdir() if p.name[0].isdigit())
    weights, bases = [], []
    for name in names:
        folder = tasks / name
        saved = folder / "model" / "model.safetensors"
        if not saved.exists():
            saved = folder / "adapter" / "adapter_model.safetensors"
        weights.append({suffix(k): w for k, w in load_file(str(saved)).items() if "layers." in k})
        bases.append({suffix(k): b for k, b in torch.load(folder / "method_state.pt")["history"].items()})
    return weights, bases


def suffix(name: str) -> str:
    return name[name.index("layers.") :].replace(".default", "")


def oriented(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix with its projected (longer) side first, as SubspaceTarget orients it."""
    return matrix.T if matrix.shape[1] > matrix.shape[0] else matrix


def leak(delta: torch.Tensor, basis: torch.Tensor) -> float:
    d = oriented(delta.double())
    return float((basis.double().T @ d).norm() / d.norm())


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_each_task_changes_the_weights_only_outside_every_earlier_tasks_basis(tmp_path, finetuning_type):
    # Three tasks, weight decay on: task 3 must stay clear of task 1's directions as well as task 2's.
    raw = tiny_config(
        tmp_path,
        "coso",
        SMALL,
        model={"finetuning_type": finetuning_type},
        stream={"tasks": TASKS},
        train={"weight_decay": 0.1},
    )
    run_experiment(config_from_dict(raw), evaluate=False)
    weights, bases = checkpoints(tmp_path)
    assert bases[0] == {} and set(bases[1]) == set(bases[3])
    names = list(bases[3])
    if finetuning_type == "full":
        assert names and all(n.endswith("proj.weight") for n in names)
        # Not a target (norms): frozen throughout.
        others = [k for k in weights[0] if k not in names]
        assert others and all(torch.equal(weights[0][k], weights[3][k]) for k in others)
    else:  # the adapter factors, each projected on its longer side (A: r x n, so its n side)
        assert {n.split(".")[-2] for n in names} == {"lora_A", "lora_B"}
    for name in names:
        sizes = [bases[t][name].shape[1] for t in (1, 2, 3)]
        assert 0 < sizes[0] < sizes[1] < sizes[2], (name, sizes)  # every task adds its directions
        assert sizes[2] <= max(weights[0][name].shape)
        final = bases[3][name]
        assert torch.allclose(final.T @ final, torch.eye(final.shape[1]), atol=1e-4)  # orthonormal
        assert torch.equal(final[:, : sizes[0]], bases[1][name])  # task 1's basis is kept, not replaced
        for t in (2, 3):
            delta = weights[t][name] - weights[t - 1][name]
            assert delta.norm() > 1e-3, (t, name)  # the matrix still learns
            assert leak(delta, bases[t - 1][name]) < 1e-5, (t, name)
            assert leak(delta, bases[1][name]) < 1e-5, (t, name)


def make_target(shape, history_size: int, config: CoSOConfig) -> tuple[torch.nn.Parameter, SubspaceTarget]:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(*shape))
    dim = max(shape)
    history = torch.linalg.qr(torch.randn(dim, history_size))[0] if history_size else None
    return param, SubspaceTarget("w", param, history, config)


def optimizer_of(param, target, config: CoSOConfig, **settings) -> CoSOAdam:
    defaults = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, **settings}
    return CoSOAdam([{"params": [param]}], {param: target}, config.update_gap, **defaults)


@pytest.mark.parametrize("shape", [(24, 10), (10, 24)])
def test_the_subspace_of_a_step_is_taken_from_the_gradient_without_the_history(shape):
    config = CoSOConfig(proj_rank=3, sketch_rank=6)
    param, target = make_target(shape, 5, config)
    param.grad = torch.randn(*shape)
    basis = target.history
    assert (basis.T @ oriented(param.grad)).norm() > 0.1 * param.grad.norm()  # the raw gradient has some
    optimizer_of(param, target, config).step()
    assert (basis.T @ target.projector).norm() < 1e-5
    assert (basis.T @ target.sketch.sketch).norm() < 1e-4 * target.sketch.sketch.norm()


def test_one_step_is_a_low_rank_update_in_the_gradients_top_subspace():
    config = CoSOConfig(proj_rank=3, sketch_rank=6)
    param, target = make_target((24, 10), 0, config)
    before = param.detach().clone()
    gradient = torch.randn(24, 10)
    param.grad = gradient.clone()
    optimizer = optimizer_of(param, target, config)
    optimizer.step()
    delta = param.detach() - before
    singular = torch.linalg.svdvals(delta)
    assert singular[2] > 0.1 * singular[0] and singular[3] < 1e-4 * singular[0]  # rank 3 (fp32 rounding)
    top = torch.linalg.svd(gradient)[0][:, :3]
    assert (delta - top @ (top.T @ delta)).norm() < 1e-5 * delta.norm()  # in span of the top 3 directions
    assert optimizer.state[param]["exp_avg"].shape == (3, 10)  # Adam's moments in the r1 coordinates


def test_the_subspace_is_renewed_every_update_gap_steps():
    config = CoSOConfig(proj_rank=2, sketch_rank=4, update_gap=2)
    param, target = make_target((12, 6), 0, config)
    optimizer = optimizer_of(param, target, config)
    projectors = []
    for _ in range(4):
        param.grad = torch.randn(12, 6)
        optimizer.step()
        projectors.append(target.projector.clone())
    assert torch.equal(projectors[0], projectors[1]) and torch.equal(projectors[2], projectors[3])
    assert not torch.allclose(projectors[1], projectors[2])


def test_a_gradient_of_rank_below_proj_rank_does_not_leak_through_adams_moments():
    # SVD completes P with arbitrary columns when G' has rank < r1; they may lie in span(M), where the
    # moments carried over from earlier steps are not zero.
    config = CoSOConfig(proj_rank=4, sketch_rank=4)
    param, target = make_target((16, 8), 8, config)
    optimizer = optimizer_of(param, target, config)
    before = param.detach().clone()
    for _ in range(4):
        param.grad = torch.randn(16, 1) @ torch.randn(1, 8)  # rank 1
        optimizer.step()
    delta = param.detach() - before
    assert delta.norm() > 1e-3 and leak(delta, target.history) < 1e-4


def test_weight_decay_leaves_the_protected_subspace_alone():
    config = CoSOConfig(proj_rank=2, sketch_rank=4)
    param, target = make_target((16, 8), 6, config)
    before = param.detach().clone()
    param.grad = torch.zeros(16, 8)
    param.grad[0, 0] = 1.0
    optimizer_of(param, target, config, weight_decay=0.5).step()
    delta = param.detach() - before
    # Decaying the whole weight would put about sqrt(6/16) of the change in the basis; fp32 rounding of a
    # unit-sized weight leaves ~1e-6.
    assert delta.norm() > 1e-3 and leak(delta, target.history) < 1e-4


def test_frequent_directions_keeps_its_error_bound_over_a_stream():
    torch.manual_seed(0)
    ell, k = 8, 4
    sketch = FrequentDirections(30, ell)
    seen = []
    for _ in range(25):
        block = torch.randn(30, 5) * torch.linspace(3, 0.1, 30)[:, None]  # a decaying spectrum
        sketch.add(block)
        seen.append(block)
    a = torch.cat(seen, dim=1).double()
    b = sketch.sketch.double()
    gap = a @ a.T - b @ b.T
    assert torch.linalg.eigvalsh(gap).min() > -1e-6 * gap.norm()  # B B^T <= A A^T
    tail = (torch.linalg.svdvals(a)[k:] ** 2).sum()
    assert torch.linalg.matrix_norm(gap, ord=2) <= tail / (ell - k)
    assert b.shape[1] == ell


def test_frequent_directions_lets_a_small_recurring_direction_in():
    # Two large directions once, then a small third one 100 times: it ends as the largest of the three.
    # Keeping only the top 2 of [B, A_t] would drop it every time (error 100, above the bound's 20).
    sketch = FrequentDirections(3, 2)
    sketch.add(torch.diag(torch.tensor([10.0, 10.0, 0.0]).sqrt()))
    for _ in range(100):
        sketch.add(torch.tensor([[0.0], [0.0], [1.0]]))
    a_at = torch.diag(torch.tensor([10.0, 10.0, 100.0]))
    gap = a_at - sketch.sketch @ sketch.sketch.T
    assert torch.linalg.matrix_norm(gap, ord=2) <= 20.0 + 1e-4
    top = torch.linalg.svd(sketch.sketch)[0][:, 0]
    assert top[2].abs().item() == pytest.approx(1.0, abs=1e-4)


def test_the_kept_directions_stay_under_the_threshold_and_extend_the_basis():
    sketch = FrequentDirections(6, 6)
    sketch.add(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0])))
    # Squared mass 16, 9, 4, 1 of 30: cumulative 0.53, 0.83, 0.97, 1.0.
    assert sketch.directions(0.98).shape[1] == 3
    assert sketch.directions(0.9).shape[1] == 2
    basis = extend_orthonormal_basis(torch.eye(6)[:, :1], torch.eye(6)[:, :3])
    assert basis.shape[1] == 3 and torch.allclose(basis.T @ basis, torch.eye(3), atol=1e-6)


def test_target_modules_select_the_layers_and_freeze_the_rest(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "coso")
    method = CoSO(CoSOConfig(target_modules=["o_proj"]))
    method.training_data(ctx, tasks[0], tasks[0].train)
    trainable = trainable_parameters(ctx.model)
    assert trainable and all("o_proj" in n for n in trainable)
    assert {t.name for t in method.targets} == {n for n in trainable}
    with pytest.raises(RetainError, match="target_modules"):
        CoSO(CoSOConfig(target_modules=["no_such_layer"])).training_data(ctx, tasks[0], tasks[0].train)


def test_train_other_params_steps_the_rest_with_plain_adamw(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "coso")
    before = trainable_parameters(ctx.model)
    method = CoSO(CoSOConfig(target_modules=["o_proj"], train_other_params=True))
    method.training_data(ctx, tasks[0], tasks[0].train)
    assert set(trainable_parameters(ctx.model)) == set(before)  # nothing frozen
    trainer = train_one_task(ctx, tasks, method, tmp_path / "t", max_steps=1)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    targets, rest = optimizer.param_groups
    assert len(targets["params"]) == len(method.targets) and len(rest["params"]) == len(before) - len(
        method.targets
    )
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in rest["params"])  # full-size moments


def test_the_trainer_steps_with_cosos_optimizer_also_in_a_combination(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "coso")
    method = create_method("coso", {**SMALL, "plus": ["ewc"]})
    method.setup(ctx)
    method.before_task(ctx, tasks[0])
    method.training_data(ctx, tasks[0], tasks[0].train)
    trainer = train_one_task(ctx, tasks, method, tmp_path / "t", max_steps=2)
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), CoSOAdam)


def test_two_methods_with_their_own_optimizer_are_not_combined():
    class OtherOptimizer(ContinualMethod):
        name = "other_optimizer"

        def create_optimizer(self, ctx, args):
            return None

    with pytest.raises(RetainError, match="both bring their own optimizer"):
        from retain.methods.combine import Combined

        Combined([CoSO(), OtherOptimizer()])


def test_full_finetuning_resumes_after_a_crash_with_the_same_matrix(tmp_path, monkeypatch):
    def raw(folder):
        return tiny_config(
            tmp_path / folder, "coso", SMALL, model={"finetuning_type": "full"}, stream={"tasks": TASKS}
        )

    expected = run_experiment(config_from_dict(raw("whole")))
    assert_same(crash_then_resume(raw("crashed"), monkeypatch), expected)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"proj_rank": 0}, "proj_rank must be >= 1"),
        ({"proj_rank": 8, "sketch_rank": 4}, "sketch_rank .4. must be >= proj_rank"),
        ({"update_gap": 0}, "update_gap must be >= 1"),
        ({"threshold": 1.5}, "threshold must be in"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(params, needle):
    with pytest.raises(RetainError, match=needle):
        create_method("coso", params)
