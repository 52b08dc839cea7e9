"""RFT's instance filter under two processes (gloo): each process samples the rollouts of its share of
the instances, the keep flags are summed over processes, and every process keeps the instances one
process keeps."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from retain.data.encode import encode_prompt
from retain.methods import rft
from retain.methods.rft import RFT, RFTConfig

from ..helpers import join_gloo, tiny_context

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("torchrun")]
INSTANCES = 6
# Per instance: how many of its 4 rollouts are right (0: all wrong, 4: all right, else mixed).
RIGHT = [4, 0, 1, 3, 0, 4]


def _filter(folder: pathlib.Path, rank: int, world: int) -> dict:
    """Run the `both` filter on INSTANCES scripted instances as process `rank` of `world`."""
    ctx, tasks = tiny_context(folder / f"rank{rank}", "rft")
    ctx = dataclasses.replace(ctx, rank=rank, world_size=world)
    task = tasks[1]
    data = task.train[:INSTANCES]
    wrong = ctx.tokenizer.encode("nope", add_special_tokens=False)
    script = {}
    for example, right in zip(data, RIGHT, strict=True):
        answer = ctx.tokenizer.encode(example.reference, add_special_tokens=False)
        script[tuple(encode_prompt(ctx.tokenizer, example))] = [answer] * right + [wrong] * (4 - right)
    sampled: list[int] = []

    def sample(model, tokenizer, prompts, **options):
        keys = [tuple(p) for p in prompts]
        sampled.extend(sorted({list(script).index(k) for k in keys}))
        seen: dict[tuple, int] = {}
        out = []
        for key in keys:
            seen[key] = seen.get(key, 0) + 1
            out.append(script[key][seen[key] - 1])
        return out

    rft.sample_completions = sample
    kept = RFT(RFTConfig(filter_rule="both", filter_rollouts=4)).training_data(ctx, task, data)
    return {"kept": [data.index(e) for e in kept], "sampled": sampled}


def _worker(rank: int, world: int, init_file: str, folder: str) -> None:
    join_gloo(rank, world, init_file)
    try:
        result = _filter(pathlib.Path(folder), rank, world)
        (pathlib.Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_processes_keep_what_one_process_keeps(tmp_path, monkeypatch):
    monkeypatch.setattr(rft, "sample_completions", rft.sample_completions)  # restored after _filter
    one = _filter(tmp_path / "one", 0, 1)
    assert one["kept"] == [2, 3]  # the mixed groups: all-right and all-wrong ones are dropped
    assert one["sampled"] == list(range(INSTANCES))
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Each instance's rollouts were sampled by exactly one process...
    assert sorted(ranks[0]["sampled"] + ranks[1]["sampled"]) == list(range(INSTANCES))
    assert ranks[0]["sampled"] and ranks[1]["sampled"]
    # ...and every process keeps the same instances as one process.
    assert ranks[0]["kept"] == ranks[1]["kept"] == one["kept"]
