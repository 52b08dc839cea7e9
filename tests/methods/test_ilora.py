"""I-LoRA: a slow EMA adapter that follows the fast one, consistency on replayed samples, slow at test."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.data.formats import Example
from retain.engine.loop import run_experiment
from retain.methods.common import pseudo
from retain.methods.ilora import ILoRA, ILoRAConfig, consistency_loss
from retain.models.adapters import adapter_state, peft_model, trainable_parameters

from ..helpers import tiny_config, tiny_context


def _step(ctx, method, optimizer, batch):
    optimizer.zero_grad()
    method.loss(ctx, ctx.model, batch, ctx.forward(ctx.model, batch)).backward()
    optimizer.step()


def _logits(ctx, batch):
    with torch.no_grad():
        return ctx.forward(ctx.model, batch).logits


def test_the_slow_adapter_moves_every_step_to_an_interpolation_of_its_old_value_and_the_fast_one(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "ilora")
    method = ILoRA(ILoRAConfig(ema_alpha=0.6))
    method.setup(ctx)
    method.before_task(ctx, tasks[0])
    assert set(trainable_parameters(ctx.model)) == set(adapter_state(ctx.model, "default"))
    batch = ctx.collate(ctx.encode(tasks[0].train[:4]))
    optimizer = torch.optim.Adam(list(trainable_parameters(ctx.model).values()), lr=1e-2)
    slow = adapter_state(ctx.model, "ema")
    for step in range(1, 5):
        _step(ctx, method, optimizer, batch)
        old = {n: p.detach().clone() for n, p in slow.items()}
        fast = {
            n.replace(".default.", ".ema."): p.detach().clone()
            for n, p in adapter_state(ctx.model, "default").items()
        }
        method.after_optimizer_step(ctx, ctx.model)
        a = min(1 - 1 / (step + 1), 0.6)  # warm-up 0.5, then ema_alpha
        assert float(ctx.logged["ilora/ema_alpha"][-1]) == a
        assert any(not torch.equal(new, old[n]) for n, new in slow.items()), f"step {step}: no change"
        for n, new in slow.items():
            # it moves wherever the fast weights are elsewhere (step 1: A gets no gradient while B = 0)
            moved = fast[n] != old[n]
            assert torch.all(new[moved] != old[n][moved]), f"step {step}: {n} did not move"
            low, high = torch.minimum(old[n], fast[n]), torch.maximum(old[n], fast[n])
            assert torch.all(new >= low - 1e-7) and torch.all(new <= high + 1e-7)
            assert torch.allclose(new, a * old[n] + (1 - a) * fast[n], atol=1e-7)
            assert not new.requires_grad


def test_consistency_loss_appears_once_the_buffer_holds_samples_and_fast_and_slow_differ(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "ilora")
    method = ILoRA(ILoRAConfig(buffer_size=10))
    method.setup(ctx)
    method.before_task(ctx, tasks[0])
    batch = ctx.collate(ctx.encode(tasks[0].train[:4]))
    outputs = ctx.forward(ctx.model, batch)
    assert method.loss(ctx, ctx.model, batch, outputs) is outputs.loss  # task 1: empty buffer, plain loss
    method.after_task(ctx, tasks[0], tasks[0].train)
    assert [len(m) for m in method.memory.values()] == [10]

    ctx.task_index = 2
    method.before_task(ctx, tasks[1])
    batch = ctx.collate(ctx.encode(tasks[1].train[:4]))
    method.loss(ctx, ctx.model, batch, ctx.forward(ctx.model, batch))
    assert float(ctx.logged["ilora/consistency"][-1]) == 0.0  # slow == fast (copied at setup)
    with torch.no_grad():
        for p in adapter_state(ctx.model, "default").values():
            p.add_(0.3 * torch.randn_like(p))
    outputs = ctx.forward(ctx.model, batch)
    total = method.loss(ctx, ctx.model, batch, outputs)
    cons, ce = float(ctx.logged["ilora/consistency"][-1]), float(ctx.logged["ilora/buffer_ce"][-1])
    assert cons > 0 and ce > 0
    assert abs(total.item() - ((outputs.loss.item() + ce) / 2 + cons)) < 1e-4
    # the consistency term alone has a gradient on the fast adapter, none on the slow one
    ce_t, cons_t = method.buffer_terms(ctx.model, method.draw(ctx, 4, ctx.device))
    cons_t.backward()
    assert sum(float(p.grad.abs().sum()) for p in adapter_state(ctx.model, "default").values()) > 0
    assert all(p.grad is None for p in adapter_state(ctx.model, "ema").values())

    method.after_task(ctx, tasks[1], tasks[1].train)
    assert {t: len(m) for t, m in method.memory.items()} == {"parity": 5, "capital_letters": 5}
    restored = ILoRA(ILoRAConfig(buffer_size=10))
    restored.load_state_dict(method.state_dict())
    assert restored.memory == method.memory


def test_consistency_pulls_the_fast_states_up_to_the_slow_ones_only_where_they_are_below():
    mask = torch.tensor([[True]])
    above = consistency_loss((torch.full((1, 1, 1), 2.0),), (torch.full((1, 1, 1), 1.0),), mask)
    below = consistency_loss((torch.full((1, 1, 1), 0.0),), (torch.full((1, 1, 1), 1.0),), mask)
    assert float(above) == 0.0  # h_f = 2 > h_s = 1: the target max(h_f, h_s) is h_f itself
    assert float(below) == 1.0  # h_f = 0 < h_s = 1: (0 - 1)^2
    # per element, over the masked positions only, averaged over layers
    fast = (torch.tensor([[[0.0, 3.0], [9.0, 9.0]]]), torch.tensor([[[1.0, 1.0], [9.0, 9.0]]]))
    slow = (torch.tensor([[[2.0, 1.0], [0.0, 0.0]]]), torch.tensor([[[1.0, 3.0], [0.0, 0.0]]]))
    loss = consistency_loss(fast, slow, torch.tensor([[True, False]]))
    assert float(loss) == ((4 + 0) / 2 + (0 + 4) / 2) / 2


def test_evaluation_uses_the_slow_adapter(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "ilora")
    method = ILoRA()
    method.setup(ctx)
    method.before_task(ctx, tasks[0])
    batch = ctx.collate(ctx.encode(tasks[0].train[:4]))
    optimizer = torch.optim.Adam(list(trainable_parameters(ctx.model).values()), lr=1e-2)
    _step(ctx, method, optimizer, batch)
    fast_logits = _logits(ctx, batch)
    model = method.eval_model(ctx, tasks[0])
    assert peft_model(model).active_adapters == ["ema"]
    assert not trainable_parameters(model)
    slow_logits = _logits(ctx, batch)
    assert not torch.allclose(slow_logits, fast_logits)  # the EMA has not caught up after one step
    fast_only = ILoRA(ILoRAConfig(eval_adapter="fast"))
    assert peft_model(fast_only.eval_model(ctx, tasks[0])).active_adapters == ["default"]
    assert torch.equal(_logits(ctx, batch), fast_logits)
    method.restore(ctx)
    assert peft_model(ctx.model).active_adapters == ["ema"]


def test_a_run_updates_and_checkpoints_the_slow_adapter(tmp_path):
    """Pitfall 4 of the reference code: its EMA never moves. Ours does, and is saved with the fast one."""
    run_experiment(config_from_dict(tiny_config(tmp_path, "ilora")), evaluate=False)
    tasks = os.path.join(tmp_path, "run", "tasks")

    def adapter(folder, name):
        sub = "" if name == "default" else name
        return load_file(os.path.join(tasks, folder, "adapter", sub, "adapter_model.safetensors"))

    def differ(a, b):
        return any(not torch.equal(a[k], b[k]) for k in a)

    init_slow, slow1, slow2 = (
        adapter("0-init", "ema"),
        adapter("1-parity", "ema"),
        adapter("2-capital_letters", "ema"),
    )
    fast1 = adapter("1-parity", "default")
    assert differ(init_slow, slow1) and differ(slow1, slow2)
    assert differ(slow1, fast1)
    state = torch.load(os.path.join(tasks, "1-parity", "method_state.pt"))
    assert len(state["memory"]["parity"]) == 32  # the buffer holds task 1 (its 32 examples < 500)


def test_the_buffer_files_only_the_tasks_own_examples_not_rehearsed_ones(tmp_path):
    # Combined with replay (`plus`) or a pseudo-sample method, the training data of task 2 holds earlier
    # tasks' examples; they must not enter task 2's share of the buffer (as replay.py leaves them out).
    ctx, tasks = tiny_context(tmp_path, "ilora")
    method = ILoRA(ILoRAConfig(buffer_size=500))
    method.after_task(ctx, tasks[0], tasks[0].train)
    replayed = [Example(e.messages, e.system, {**e.meta, "replayed_from": "parity"}) for e in tasks[0].train]
    made = [pseudo.pseudo_example("Is 7 even or odd?", "odd", None, "parity", "pseudo_replay", 2)]
    ctx.task_index = 2
    method.after_task(ctx, tasks[1], tasks[1].train + replayed + made)
    assert method.memory["capital_letters"] == tasks[1].train
    assert method.memory["parity"] == tasks[0].train
