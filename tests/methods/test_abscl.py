"""ABSCL: orthogonal domain adapters, L2 on the shared adapter, Mahalanobis domain positioning per task."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.methods.abscl import ABSCL, ABSCLConfig, mahalanobis_domains
from retain.models.adapters import adapter_state, peft_model

from ..helpers import tiny_config, tiny_context


def test_domain_statistics_select_the_training_domain_of_unseen_instances(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "abscl")
    method = ABSCL()
    for index, task in enumerate(tasks, start=1):
        ctx.task_index = index
        method.before_task(ctx, task)
        method.after_task(ctx, task, task.train)
    assert method.means.shape[0] == 2 and method.count == sum(len(t.train) for t in tasks)
    # Test instances (never used for the statistics) are placed in their own domain.
    for domain, task in enumerate(tasks):
        assert method.domain_of(ctx, task.test) == [domain] * len(task.test)
    assert method.eval_routes(ctx, tasks[1]) == ["domain2"] * len(tasks[1].test)
    method.activate_route(ctx, "domain1")
    assert set(peft_model(ctx.model).active_adapters) == {"default", "domain1"}
    restored = ABSCL()
    restored.load_state_dict(method.state_dict())
    assert [restored.eval_routes(ctx, t) for t in tasks] == [method.eval_routes(ctx, t) for t in tasks]


def test_orthogonality_loss_is_positive_and_falls_and_the_l2_acts_on_the_shared_adapter(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "abscl")
    method = ABSCL(ABSCLConfig(orthogonal_lambda=1.0, shared_l2_lambda=0.1))
    method.before_task(ctx, tasks[0])
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    batch = ctx.collate(ctx.encode(tasks[0].train[:4]))
    for _ in range(8):
        optimizer.zero_grad()
        method.loss(ctx, ctx.model, batch, ctx.forward(ctx.model, batch)).backward()
        optimizer.step()
    orth = [float(v) for v in ctx.logged["abscl/orthogonal"]]
    assert orth[0] > 0 and orth[-1] < 0.7 * orth[0]
    # The overlap moves only the domain adapter; the L2 term only the shared one.
    optimizer.zero_grad()
    method.orthogonal().backward()
    assert all(p.grad is None for p in adapter_state(ctx.model, "default").values())
    optimizer.zero_grad()
    method.shared_l2().backward()
    assert all(p.grad is None for p in adapter_state(ctx.model, "domain1").values())
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_state(ctx.model, "default").values()
    )


def test_abscl_run_freezes_old_domains_replays_and_saves_statistics_per_task(tmp_path):
    config = config_from_dict(tiny_config(tmp_path, "abscl", {"memory_size": 8, "replay_batch_size": 2}))
    run_experiment(config)
    run = tmp_path / "run" / "tasks"
    first = load_file(run / "1-parity" / "adapter" / "domain1" / "adapter_model.safetensors")
    second = load_file(run / "2-capital_letters" / "adapter" / "domain1" / "adapter_model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    shared = [
        load_file(run / d / "adapter" / "adapter_model.safetensors")
        for d in ("1-parity", "2-capital_letters")
    ]
    assert any(not torch.equal(shared[0][k], shared[1][k]) for k in shared[0])  # the shared adapter learns on
    states = [torch.load(run / d / "method_state.pt") for d in ("1-parity", "2-capital_letters")]
    assert states[0]["means"].shape[0] == 1 and states[1]["means"].shape[0] == 2
    assert len(states[1]["memory"]["domain1"]) == 8
    log = json.loads((run / "2-capital_letters" / "train_log.json").read_text())
    assert any("abscl/replay" in entry for entry in log)
    for task, domain in (("parity", "domain1"), ("capital_letters", "domain2")):
        with open(os.path.join(tmp_path, "run", "eval", "2", f"{task}.jsonl"), encoding="utf-8") as handle:
            assert [json.loads(line)["route"] for line in handle] == [domain] * 6


def test_mahalanobis_expansion_matches_the_direct_distance():
    generator = torch.Generator().manual_seed(0)
    features, means = torch.randn(7, 5, generator=generator), torch.randn(3, 5, generator=generator)
    root = torch.randn(5, 5, generator=generator)
    precision = root @ root.T + torch.eye(5)
    diff = features.double()[:, None] - means.double()[None]
    direct = torch.einsum("ntd,de,nte->nt", diff, precision.double(), diff).argmin(dim=1)
    assert torch.equal(mahalanobis_domains(features, means, precision), direct)
