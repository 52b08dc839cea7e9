"""methods/common/sharding.py: whole gradients and parameters from FSDP2 shards (2 processes, gloo), and
the plain path (one process, DDP) that returns the tensors themselves."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from retain.methods.common.ema import DynamicEMA
from retain.methods.common.sharding import (
    full_gradient,
    full_gradients,
    full_parameter,
    is_sharded,
    set_full_gradient,
    set_full_parameter,
)
from retain.methods.migu import mask_rows

from ..helpers import join_gloo


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 3 output rows over 2 ranks: uneven shards (2 rows and 1), as FSDP2's dim-0 chunks give.
    return nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))


def _backward(model: nn.Module) -> None:
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).sum().backward()


def test_the_plain_path_returns_the_tensors_themselves():
    model = _model()
    _backward(model)
    for param in model.parameters():
        assert not is_sharded(param)
        assert full_gradient(param) is param.grad
        assert full_parameter(param).data_ptr() == param.data_ptr()  # a detached view, no copy
    weight = model[0].weight
    set_full_gradient(weight, torch.ones_like(weight))
    assert torch.equal(weight.grad, torch.ones_like(weight))
    set_full_parameter(weight, torch.zeros_like(weight))
    assert torch.equal(weight.detach(), torch.zeros_like(weight))


def _scenario(model: nn.Module) -> dict:
    """What the helpers and their users read from `model` after a backward (the same calls on a plain
    model and on an FSDP2-sharded one): whole gradients and weights, written back doubled and halved, a
    MIGU row mask, and two DEMA steps (alpha from gradient and weight L1 norms)."""
    _backward(model)
    params = list(model.parameters())
    result = {
        "sharded": [is_sharded(p) for p in params],
        "local_rows": [p.to_local().shape[0] if hasattr(p, "to_local") else p.shape[0] for p in params],
        "grads": [g.clone() for g in full_gradients(params)],
        "weights": [full_parameter(p).clone() for p in params],
    }
    named = dict(model.named_parameters())
    ema = DynamicEMA(c=2.0, fallback=0.01)
    ema.capture(named)
    ema.update(named)
    # Write back doubled gradients and halved weights; reading them again gives the whole new values.
    for param, grad in zip(params, result["grads"], strict=True):
        set_full_gradient(param, 2 * grad)
        set_full_parameter(param, full_parameter(param) / 2)
    result["doubled"] = [g.clone() for g in full_gradients(params)]
    result["halved"] = [full_parameter(p).clone() for p in params]
    mask_rows(params[0], torch.tensor([True, False, True]))  # rows 0 and 2 on rank 0, row 1 on rank 1
    result["masked"] = full_gradient(params[0]).clone()
    ema.capture(named)
    ema.update(named)
    result["alphas"] = ema.last.clone()
    result["ema"] = {name: value.clone() for name, value in ema.ema.items()}
    return result


def _fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    join_gloo(rank, world, init_file)
    try:
        model = _model()
        fully_shard(model)
        torch.save(_scenario(model), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.xdist_group("torchrun")
def test_fsdp2_shards_give_what_one_process_reads(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    plain = _scenario(_model())
    assert not any(plain["sharded"])
    assert plain["masked"][1].abs().sum() == 0 and plain["masked"][0].abs().sum() > 0
    assert plain["alphas"].numel() == 4
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert all(got["sharded"])
        assert got["local_rows"][0] == (2 if rank == 0 else 1)  # each rank held a shard only
        for key in ("grads", "weights", "doubled", "halved"):
            for i, (a, b) in enumerate(zip(got[key], plain[key], strict=True)):
                assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (key, i)
        assert torch.allclose(got["masked"], plain["masked"], rtol=1e-6, atol=1e-7)
        assert torch.allclose(got["alphas"], plain["alphas"], rtol=1e-5)
        assert set(got["ema"]) == set(plain["ema"])
        for name, value in plain["ema"].items():
            assert got["ema"][name].shape == value.shape  # whole on every rank, not a shard
            assert torch.allclose(got["ema"][name], value, rtol=1e-6, atol=1e-7), name
