"""SEFE's RegLoRA: key positions from earlier tasks' LoRA updates, a penalty on the new update there only,
accumulated over tasks, rebuilt after a resume (also after SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from retain.cli import main
from retain.config import config_from_dict
from retain.data.streams import build_stream
from retain.engine.loop import run_experiment
from retain.methods import sefe as sefe_module
from retain.methods.base import MethodContext
from retain.methods.sefe import SEFE, SEFEConfig, key_positions, lora_matrices, selected_entries
from retain.models.adapters import adapter_state, apply_finetuning, peft_model, trainable_parameters
from retain.models.tiny import tiny_model, tiny_tokenizer

from ..helpers import ENV, assert_same, tiny_config

TASKS = ["synthetic:parity", "synthetic:capital_letters", "synthetic:reverse"]


def _context(tmp_path, tasks=TASKS):
    config = config_from_dict(tiny_config(tmp_path, "sefe", stream={"tasks": tasks}))
    tokenizer = tiny_tokenizer()
    model = apply_finetuning(tiny_model(tokenizer), config.model)
    stream = build_stream(config)
    return MethodContext.create(model, tokenizer, config, stream, task_index=1), stream


def _train(ctx, adapter: str, seed: int) -> None:
    """Stand in for a task's training: move the adapter's A and B (B starts at zero, so B A would be 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(ctx.model, adapter).values():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _dense_keys(ctx, adapters: list[str], fraction: float) -> dict[str, set[int]]:
    """M by the reference's route: the full product B A of each adapter, its top entries, the union."""
    keys: dict[str, set[int]] = {}
    for adapter in adapters:
        for name, (b, a) in lora_matrices(ctx.model, adapter).items():
            delta = (b.detach() @ a.detach()).abs().flatten()
            top = torch.topk(delta, max(1, int(fraction * delta.numel()))).indices
            keys.setdefault(name, set()).update(top.tolist())
    return keys


def _start(method: SEFE, ctx, tasks, index: int) -> None:
    ctx.task_index = index
    method.before_task(ctx, tasks[index - 1])


def test_key_positions_are_the_top_fraction_of_the_update_magnitude():
    b, a = torch.randn(12, 3), torch.randn(3, 10)
    flat = key_positions(b, a, 0.05)
    assert flat.numel() == 6  # int(0.05 * 120)
    delta = (b @ a).abs().flatten()
    assert delta[flat].min() >= delta[[i for i in range(120) if i not in set(flat.tolist())]].max()
    assert key_positions(b, a, 1e-6).numel() == 1  # at least one position per matrix


@pytest.mark.parametrize("chunk", [1 << 22, 5], ids=["one-chunk", "many-chunks"])
def test_selected_entries_are_the_product_s_entries_with_its_gradient(monkeypatch, chunk):
    monkeypatch.setattr(sefe_module, "CHUNK_ELEMENTS", chunk)
    b = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 6, 3, 3, 1, 0], dtype=torch.int32)
    cols = torch.tensor([4, 0, 2, 1, 1, 4], dtype=torch.int32)
    assert torch.allclose(selected_entries(b, a, rows, cols), (b @ a)[rows.long(), cols.long()])
    assert torch.autograd.gradcheck(lambda b, a: selected_entries(b, a, rows, cols), (b, a))


def test_the_penalty_acts_only_at_task_1_s_key_positions_and_pulls_them_back(tmp_path):
    ctx, tasks = _context(tmp_path)
    method = SEFE(SEFEConfig(reg_lambda=10.0, key_fraction=0.05))
    _start(method, ctx, tasks, 1)
    assert method.regularisation() is None  # task 1: no earlier task to protect
    _train(ctx, "default", seed=1)
    frozen = {n: p.detach().clone() for n, p in adapter_state(ctx.model, "default").items()}
    _start(method, ctx, tasks, 2)
    assert peft_model(ctx.model).active_adapters == ["default", "task2"]
    assert set(trainable_parameters(ctx.model)) == set(adapter_state(ctx.model, "task2"))
    keys = _dense_keys(ctx, ["default"], 0.05)
    assert {n: set(v.tolist()) for n, v in method.keys.items()} == keys
    assert float(method.regularisation().detach()) == 0.0  # the fresh adapter's B is zero: no update yet
    _train(ctx, "task2", seed=2)

    # The value: lambda * mean over matrices of mean |(B2 A2)_ij| over task 1's key positions.
    new = lora_matrices(ctx.model, "task2")
    dense = [(b.detach() @ a.detach()).flatten()[sorted(keys[n])].abs().mean() for n, (b, a) in new.items()]
    reg = method.regularisation().detach()
    assert float(reg) > 0 and float(reg) == pytest.approx(float(torch.stack(dense).mean()), rel=1e-5)
    batch = ctx.collate(ctx.encode(tasks[1].train[:2]))
    outputs = ctx.forward(ctx.model, batch)
    total = method.loss(ctx, ctx.model, batch, outputs)
    assert float((total - outputs.loss).detach()) == pytest.approx(10.0 * float(reg), rel=1e-5)
    assert float(ctx.logged["sefe/reg"][-1]) == pytest.approx(float(reg), rel=1e-6)

    # Its gradient reaches the new update only through the key entries: B2's rows and A2's columns
    # that hold no key position get none.
    for p in trainable_parameters(ctx.model).values():
        p.grad = None
    method.regularisation().backward()
    for name, (b, a) in new.items():
        flat = torch.tensor(sorted(keys[name]))
        rows, cols = set((flat // a.shape[1]).tolist()), set((flat % a.shape[1]).tolist())
        assert b.grad[list(rows)].abs().sum() > 0 and a.grad[:, list(cols)].abs().sum() > 0
        assert b.grad[[i for i in range(b.shape[0]) if i not in rows]].abs().sum() == 0
        assert a.grad[:, [j for j in range(a.shape[1]) if j not in cols]].abs().sum() == 0

    # Descending it shrinks the new update at the key positions; the earlier adapter never moves.
    params = list(trainable_parameters(ctx.model).values())
    optimizer = torch.optim.Adam(params, lr=0.02)
    values = []
    for _ in range(5):
        optimizer.zero_grad()
        reg = method.regularisation()
        values.append(float(reg.detach()))
        reg.backward()
        optimizer.step()
    assert all(b < a for a, b in zip(values, values[1:], strict=False)) and values[-1] < 0.7 * values[0]
    assert all(torch.equal(p, frozen[n]) for n, p in adapter_state(ctx.model, "default").items())


def _key_to_rest_ratio(ctx, keys) -> float:
    """mean |B2 A2| at the key positions over its mean elsewhere, over all matrices."""
    at, off = [], []
    for name, (b, a) in lora_matrices(ctx.model, "task2").items():
        delta = (b.detach() @ a.detach()).abs().flatten()
        mask = torch.zeros_like(delta, dtype=torch.bool)
        mask[sorted(keys[name])] = True
        at.append(delta[mask].mean())
        off.append(delta[~mask].mean())
    return float(torch.stack(at).mean() / torch.stack(off).mean())


def test_training_task_2_with_the_penalty_keeps_the_update_small_at_task_1_s_key_positions(tmp_path):
    ratios = {}
    for reg_lambda in (0.0, 50.0):
        ctx, tasks = _context(tmp_path / str(reg_lambda))
        torch.manual_seed(0)
        method = SEFE(SEFEConfig(reg_lambda=reg_lambda, key_fraction=0.05))
        _start(method, ctx, tasks, 1)
        _train(ctx, "default", seed=1)
        _start(method, ctx, tasks, 2)
        keys = _dense_keys(ctx, ["default"], 0.05)
        optimizer = torch.optim.Adam(list(trainable_parameters(ctx.model).values()), lr=1e-2)
        batch = ctx.collate(ctx.encode(tasks[1].train[:8]))
        for _ in range(15):
            optimizer.zero_grad()
            method.loss(ctx, ctx.model, batch, ctx.forward(ctx.model, batch)).backward()
            optimizer.step()
        ratios[reg_lambda] = _key_to_rest_ratio(ctx, keys)
    # Without the penalty the key positions move like any other entry; with it they are held back.
    assert ratios[0.0] > 0.5 and ratios[50.0] < 0.5 * ratios[0.0]


def test_on_three_tasks_the_key_positions_of_tasks_1_and_2_accumulate(tmp_path):
    ctx, tasks = _context(tmp_path)
    method = SEFE(SEFEConfig(key_fraction=0.05))
    _start(method, ctx, tasks, 1)
    _train(ctx, "default", seed=1)
    _start(method, ctx, tasks, 2)
    first = {n: set(v.tolist()) for n, v in method.keys.items()}
    _train(ctx, "task2", seed=2)
    _start(method, ctx, tasks, 3)
    assert peft_model(ctx.model).active_adapters == ["default", "task2", "task3"]
    assert set(trainable_parameters(ctx.model)) == set(adapter_state(ctx.model, "task3"))
    second = {n: set(v.tolist()) for n, v in method.keys.items()}
    assert second == _dense_keys(ctx, ["default", "task2"], 0.05)  # M_2 = M_1 u TopIdx(|B2 A2|)
    only_task2 = _dense_keys(ctx, ["task2"], 0.05)
    for name in first:
        assert first[name] < second[name] and only_task2[name] <= second[name]
        assert len(second[name]) == len(first[name] | only_task2[name])
    # Task 3's penalty is over M_2: every term's indices are the union's.
    terms = {id(b): (r, c) for b, a, r, c in method.terms}
    for name, (b, a) in lora_matrices(ctx.model, "task3").items():
        rows, cols = terms[id(b)]
        assert set((rows.long() * a.shape[1] + cols.long()).tolist()) == second[name]

    # A resumed run (a fresh method restored from checkpoint 2) rebuilds the same M_2 from the adapters.
    resumed = SEFE(SEFEConfig(key_fraction=0.05))
    resumed.load_state_dict(method.state_dict())
    ctx.task_index = 2
    resumed.restore(ctx)
    _start(resumed, ctx, tasks, 3)
    assert {n: set(v.tolist()) for n, v in resumed.keys.items()} == second


def test_a_run_logs_the_penalty_from_task_2_on_and_evaluates_with_every_adapter(tmp_path):
    raw = tiny_config(tmp_path, "sefe", {"reg_lambda": 100.0}, stream={"tasks": TASKS})
    results = run_experiment(config_from_dict(raw))
    assert len(results["matrix"]) == 4
    logs = {}
    for index, name in enumerate(["parity", "capital_letters", "reverse"], start=1):
        with open(tmp_path / "run" / "tasks" / f"{index}-{name}" / "train_log.json", encoding="utf-8") as f:
            logs[index] = [r for r in json.load(f) if "sefe/reg" in r]
    assert not logs[1] and logs[2] and logs[3]
    assert all(r["sefe/reg"] > 0 for r in logs[2][1:] + logs[3][1:])
    adapter = tmp_path / "run" / "tasks" / "3-reverse" / "adapter"
    assert (adapter / "task2").is_dir() and (adapter / "task3").is_dir()


# Runs `retain run CONFIG` and SIGKILLs itself in task 3, after its penalty over M_2 took a few steps.
KILLER = r"""
import os, signal, sys
from retain.methods.sefe import SEFE

real, calls = SEFE.loss, []


def loss(self, ctx, model, batch, outputs):
    if ctx.task_index == 3:
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(self, ctx, model, batch, outputs)


SEFE.loss = loss
from retain.cli import main

sys.exit(main(["run", sys.argv[1]]))
"""


def test_a_run_killed_in_task_3_resumes_to_the_same_matrix(tmp_path):
    def raw(folder: str) -> dict:
        return tiny_config(tmp_path / folder, "sefe", {"reg_lambda": 100.0}, stream={"tasks": TASKS})

    expected = run_experiment(config_from_dict(raw("whole")))
    config = tmp_path / "killed.json"
    config.write_text(json.dumps(raw("killed")))
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(config)], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    folder = tmp_path / "killed" / "run"
    assert not (folder / "results.json").exists() and (folder / "tasks" / "2-capital_letters").is_dir()
    assert not (folder / "tasks" / "3-reverse").exists()
    assert main(["run", str(config)]) == 0  # the resume, in this process
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
        assert_same(json.load(f), expected)
    # The tiny model's scores say little, its weights more: task 3 trained under the same M_2 as before.
    last = os.path.join("tasks", "3-reverse", "adapter", "task3", "adapter_model.safetensors")
    got, want = load_file(str(folder / last)), load_file(str(tmp_path / "whole" / "run" / last))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
