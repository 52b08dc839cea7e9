"""Gradient flow of every method with a loss term: what loss() adds must reach the weights it trains.

Parametrised over every registered method that overrides `loss`, so a new one is covered without editing
this file (give it SETTINGS below if its term is off by default). Each method runs the engine's hooks on
a 3-task tiny stream (setup; for task 1: before_task, training_data, a few optimizer steps, after_task;
then task 2 the same up to a few steps), and on one batch of task 2 the probe records, with the gradient
kept, every tensor the method passes to ctx.log during loss(): its named terms. Then:

- the gradient of loss() differs from the task loss's, and each named term has a non-zero gradient of
  its own, not the task loss's;
- the gradient of loss() is the task loss's plus a non-zero multiple of each term's: a term that is
  logged but added detached (or not added) has a zero weight, and a term added but not logged leaves a
  residual;
- every trainable parameter, the MoE routers included, receives gradient from loss();
- LAMOL's LM term is the loss on the generation sequences "__gen_<task>__ -> question __ans__ answer",
  not on the QA batch.

Detaching any one term (I-LoRA's consistency, GeRe's margin, ABSCL's replay or orthogonality, LwF's KL),
the MoE routers' output, or LAMOL's LM loss moved to the QA batch makes one of these tests fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import set_seed

from retain.config import config_from_dict
from retain.data.streams import build_stream
from retain.methods.base import ContinualMethod, MethodContext
from retain.methods.lamol import generation_example
from retain.methods.registry import available, create_method
from retain.models.adapters import apply_finetuning, trainable_parameters
from retain.models.tiny import tiny_model, tiny_tokenizer

from ..helpers import tiny_config, train_one_task

TASKS = ["synthetic:parity", "synthetic:capital_letters", "synthetic:max_number"]
# rft's loss is the GRPO objective alone (no task loss to add a term to), and the tiny model's rollouts all
# score 0, so its gradient is zero here; tests/methods/test_rft.py checks its gradient instead.
LOSS_METHODS = [
    name
    for name, cls in available().items()
    if not name.startswith("_") and cls.loss is not ContinualMethod.loss and name != "rft"
]
# Settings that switch a term on (or keep the hooks cheap); a method absent here runs its defaults.
SETTINGS: dict[str, dict] = {
    "abscl": {"memory_size": 8, "stats_samples": 16},  # replay (4 a step), orthogonality and L2 are on
    "clmoe": {"balance_coef": 0.01},  # the balancing loss is off by default
    "moelora": {"balance_coef": 0.01},
    "ewc": {"fisher_samples": 4},
    "gere": {"num_samples": 8},
    "ilora": {"buffer_size": 16, "replay_batch_size": 2},
    "lamol": {"lm_lambda": 0.25, "gen_ratio": 0.1, "max_new_tokens": 16, "memory_per_task": 4},
    "olora": {"lamda_2": 0.1},  # the L2 norm of the new adapter is off by default
}
# Tensors that a loss() logs as statistics, not as loss terms (no gradient expected).
STATISTICS = {"gere/tm_weight"}
STEPS = 3  # optimizer steps per task: enough for LwF's student and EWC's weights to leave the teacher


def flat(grads: list[torch.Tensor | None], params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1).double()
            for g, p in zip(grads, params, strict=True)
        ]
    )


@dataclass
class Probe:
    ctx: MethodContext
    method: ContinualMethod
    batch: dict
    examples: list  # the examples of `batch`
    names: list[str]  # the trainable parameters, in the order of the gradients
    params: list[torch.Tensor]
    total: list[torch.Tensor | None]  # gradient of loss() per parameter (None: no path)
    task: torch.Tensor  # flat gradient of outputs.loss
    terms: dict[str, torch.Tensor]  # each named term logged by loss() (with its graph)
    term_grads: dict[str, torch.Tensor | None]  # flat gradient of each term (None: it has no gradient)


def run_to_task_2(name: str, folder) -> tuple[MethodContext, ContinualMethod, list]:
    """The method's hooks as Experiment.train_unit calls them, through task 1 and STEPS steps of task 2."""
    settings = SETTINGS.get(name, {})
    config = config_from_dict(tiny_config(folder, name, settings, stream={"tasks": TASKS}))
    tokenizer = tiny_tokenizer()
    set_seed(config.seed)
    model = apply_finetuning(tiny_model(tokenizer), config.model)
    tasks = build_stream(config)
    ctx = MethodContext.create(model, tokenizer, config, tasks)
    method = create_method(name, settings)
    method.setup(ctx)
    for index in (1, 2):
        task = tasks[index - 1]
        ctx.task_index = index
        set_seed(config.seed + index)
        method.before_task(ctx, task)
        data = method.training_data(ctx, task, task.train)
        train_one_task(
            ctx,
            tasks,
            method,
            folder / f"trainer{index}",
            examples=data,
            max_steps=STEPS,
            per_device_train_batch_size=4,
            learning_rate=config.train.learning_rate,
            seed=config.seed + index,
        )
        ctx.logged.clear()
        if index == 1:
            method.after_task(ctx, task, data)
    return ctx, method, data


def probe(name: str, folder) -> Probe:
    ctx, method, data = run_to_task_2(name, folder)
    examples = data[:4]
    batch = {k: v.to(ctx.device) for k, v in ctx.collate(ctx.encode(examples)).items()}
    recorded: dict[str, object] = {}

    def keep_graph(term: str, value) -> None:  # ctx.log detaches; the probe keeps the graph
        recorded[term] = value

    ctx.log = keep_graph
    try:
        ctx.model.train()
        outputs = ctx.forward(ctx.model, batch)
        total = method.loss(ctx, ctx.model, batch, outputs)
    finally:
        del ctx.log
    named = trainable_parameters(ctx.model)
    names, params = list(named), list(named.values())

    def grad(value: torch.Tensor) -> list[torch.Tensor | None] | None:
        if not value.requires_grad:
            return None
        return list(torch.autograd.grad(value, params, retain_graph=True, allow_unused=True))

    terms = {n: v for n, v in recorded.items() if isinstance(v, torch.Tensor) and n not in STATISTICS}
    term_grads = {}
    for term, value in terms.items():
        g = grad(value)
        term_grads[term] = None if g is None else flat(g, params)
    total_grad = grad(total)
    assert total_grad is not None, f"{name}: loss() returned a tensor without gradient"
    task_grad = flat(grad(outputs.loss), params)
    return Probe(ctx, method, batch, examples, names, params, total_grad, task_grad, terms, term_grads)


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """name -> Probe, each method brought to task 2 once for all the tests of this file."""
    cache: dict[str, Probe] = {}

    def get(name: str) -> Probe:
        if name not in cache:
            cache[name] = probe(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def test_every_method_with_a_loss_term_is_covered():
    assert {"abscl", "clmoe", "ewc", "gere", "ilora", "lamol", "lwf", "moelora", "olora"} <= set(LOSS_METHODS)
    assert set(SETTINGS) <= set(LOSS_METHODS)


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_each_loss_term_reaches_the_weights_through_the_total(probes, method):
    p = probes(method)
    assert p.terms, (
        f"{method}: loss() logged no term at task 2; switch its term on in SETTINGS (or log it with ctx.log)"
    )
    total = flat(p.total, p.params)
    assert not torch.allclose(total, p.task, rtol=1e-5, atol=1e-9), (
        f"{method}: the gradient of loss() is the task loss's alone"
    )
    for term, g in p.term_grads.items():
        assert g is not None, f"{method}: term {term} has no gradient (detached)"
        assert g.norm() > 0, f"{method}: term {term} has a zero gradient"
        assert not torch.allclose(g, p.task, rtol=1e-4, atol=1e-9), (
            f"{method}: term {term} has the task loss's gradient (computed on the task batch?)"
        )
    # grad(total) = a * grad(task) + sum_i c_i grad(term_i), each term with a non-zero weight c_i.
    names = list(p.term_grads)
    basis = torch.stack([p.task, *(p.term_grads[n] for n in names)], dim=1)
    scale = basis.norm(dim=0).clamp(min=1e-30)
    weights = torch.linalg.lstsq(basis / scale, total[:, None]).solution[:, 0] / scale
    residual = (basis @ weights - total).norm() / total.norm()
    assert residual < 1e-4, (
        f"{method}: the gradient of loss() is not the task loss's plus the logged terms' "
        f"(relative residual {float(residual):.2e}): a term is added but not logged, or logged but not added"
    )
    assert weights[0] > 1e-3, (
        f"{method}: the task loss is missing from loss() (weight {float(weights[0]):.3g})"
    )
    for term, weight, norm in zip(names, weights[1:].tolist(), scale[1:].tolist(), strict=True):
        share = abs(weight) * norm / float(total.norm())
        assert share > 1e-5, (
            f"{method}: term {term} does not reach the gradient of loss() (weight {weight:.3g}); "
            "is it added detached?"
        )


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_every_trainable_parameter_and_router_gets_gradient_from_the_loss(probes, method):
    p = probes(method)
    dead = [n for n, g in zip(p.names, p.total, strict=True) if g is None or not bool(g.abs().sum() > 0)]
    routers = [n for n in p.names if "router" in n]
    frozen = [n for n in dead if n in routers]
    assert not frozen, f"{method}: routers without gradient from loss(): {frozen}"
    assert not dead, f"{method}: trainable parameters without gradient from loss(): {dead}"
    if hasattr(p.method, "moe"):  # MoE-LoRA, CL-MoE: the routers are trained
        assert len(routers) == len(p.method.moe.routers) > 0


def test_lamol_lm_loss_is_on_the_generation_sequence_not_the_qa_batch(probes):
    p = probes("lamol")
    lm_grad = p.term_grads["lamol/lm_loss"]
    assert lm_grad is not None
    assert not torch.allclose(lm_grad, p.task, rtol=1e-3, atol=1e-9), (
        "lamol: the LM term's gradient is the QA batch loss's: it is computed on the QA batch"
    )
    # and it is the response loss of "__gen_<task>__ -> question __ans__ answer" of the batch's examples
    task = p.ctx.task
    sequences = [generation_example(e, task.name) for e in p.examples]
    lm_batch = {k: v.to(p.ctx.device) for k, v in p.ctx.collate(p.ctx.encode(sequences)).items()}
    want = p.ctx.forward(p.ctx.model, lm_batch).loss
    assert p.terms["lamol/lm_loss"].item() == pytest.approx(want.item(), rel=1e-5)
    want_grad = flat(list(torch.autograd.grad(want, p.params, allow_unused=True)), p.params)
    torch.testing.assert_close(lm_grad, want_grad, rtol=1e-4, atol=1e-7)
