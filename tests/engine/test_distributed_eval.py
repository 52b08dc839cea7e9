"""Evaluation on every process: each answers a share of the prompts, the answers come back in test order,
and rank 0 writes the same predictions files as one process (fp32)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from retain.cli import main
from retain.config import config_from_dict
from retain.data.streams import build_stream
from retain.engine.evaluate import assemble, evaluate_row, share
from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext
from retain.models.adapters import apply_finetuning
from retain.models.tiny import tiny_model, tiny_tokenizer

from ..helpers import AlternatingRoutes, count_generated_prompts, join_gloo, tiny_config, write_config

# (name, method, eval.mode): a plain method, per-instance routes, and routes with ranked labels.
CASES = [("plain", ContinualMethod, "generate"), ("routed", AlternatingRoutes, "generate")]
CASES += [("routed-rank", AlternatingRoutes, "rank")]


def test_the_shares_cover_every_prompt_once_with_every_length():
    lengths = [5, 9, 9, 2, 7, 7, 1, 3, 8, 4, 6]
    members = [0, 1, 2, 4, 5, 6, 8, 9, 10]
    for world in (1, 2, 3, 4, 12):
        shares = [share(lengths, members, rank, world) for rank in range(world)]
        assert sorted(i for s in shares for i in s) == members
        assert all(s == sorted(s) for s in shares)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert share(lengths, members, 0, 1) == members
    # Longest first, dealt in turn: rank 0 gets the longest (ties by index), rank 1 the next.
    assert share(lengths, members, 0, 2) == [0, 1, 5, 6, 8]  # lengths 9, 8, 7, 5, 1
    assert share(lengths, members, 1, 2) == [2, 4, 9, 10]  # lengths 9, 7, 6, 4


def test_the_answers_are_put_back_in_test_order():
    shares = [[(1, "b"), (3, "d")], [(0, "a"), (2, "c"), (4, "e")]]
    assert assemble(shares, 5) == ["a", "b", "c", "d", "e"]
    with pytest.raises(RetainError, match=r"no process answered test examples \[2\] of 3"):
        assemble([[(0, "a")], [(1, "b")]], 3)


def _context(folder: pathlib.Path):
    """(ctx, tasks) around a tiny model whose answers differ from prompt to prompt, so that answers put
    back in the wrong order would show; the first task has labels to rank."""
    config = config_from_dict(tiny_config(folder))
    tokenizer = tiny_tokenizer()
    model = apply_finetuning(tiny_model(tokenizer, seed=2, initializer_range=0.5), config.model)
    tasks = build_stream(config)
    tasks[0].labels, tasks[0].scorer = ["even", "odd"], "accuracy"
    return MethodContext.create(model, tokenizer, config, tasks, task_index=1), tasks


def _evaluate_cases(ctx, tasks, folder: pathlib.Path, all_processes: bool) -> dict[str, list[float]]:
    scores = {}
    for name, method, mode in CASES:
        ctx.config.eval.mode = mode
        files = [str(folder / name / f"{t.name}.jsonl") for t in tasks]
        # batch_size 4: one process answers 6 prompts as 4 + 2, each of two processes 3 at once.
        scores[name] = evaluate_row(method(), ctx, 1, files, 5, 4, all_processes=all_processes)
    return scores


def _eval_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    join_gloo(rank, world, init_file)
    generated = count_generated_prompts()  # prompts this process generated answers for
    try:
        out = pathlib.Path(out_dir)
        ctx, tasks = _context(out / f"context{rank}")
        ctx.rank, ctx.world_size = rank, world
        scores = _evaluate_cases(ctx, tasks, out / f"rank{rank}", all_processes=True)
        (out / f"scores{rank}.json").write_text(json.dumps({**scores, "generated": sum(generated)}))
    finally:
        dist.destroy_process_group()


def test_two_processes_write_the_predictions_of_one(tmp_path):
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ctx, tasks = _context(tmp_path / "context")
    one = _evaluate_cases(ctx, tasks, tmp_path / "one", all_processes=False)
    # 30 answers are generated (6 per task; the rank case's first task is ranked): rank 0 gets 2 of the
    # 3 instances of each route. Every rank gets the whole row's scores.
    for rank, generated in enumerate([18, 12]):
        scores = json.loads((tmp_path / f"scores{rank}.json").read_text())
        assert scores.pop("generated") == generated
        assert scores == one
    assert not list((tmp_path / "rank1").rglob("*.jsonl"))  # rank 0 writes
    two = tmp_path / "rank0"
    written = sorted(str(p.relative_to(two)) for p in two.rglob("*.jsonl"))
    assert written == sorted(
        str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*.jsonl")
    )
    for name in written:
        two_lines = (two / name).read_text().splitlines()
        one_lines = (tmp_path / "one" / name).read_text().splitlines()
        assert two_lines == one_lines, name
    # The comparison would see a shuffle: the examples are answered differently.
    for name in ("plain/parity.jsonl", "routed-rank/parity.jsonl"):
        records = [json.loads(line) for line in (tmp_path / "one" / name).read_text().splitlines()]
        assert len({json.dumps(r.get("label_scores", r["prediction"])) for r in records}) == len(records)


def _torchrun(config: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, "-m", "retain.cli", "run", config], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.distributed
@pytest.mark.xdist_group("torchrun")
def test_a_routed_run_under_torchrun_records_what_one_process_answers(tmp_path):
    # fp32 (tiny_config): every row a 2-process LCIA run recorded, answered again from its checkpoints by
    # one process (`retain eval` with the same settings), gives the same files line by line.
    config = write_config(tmp_path, method="lcia", train={"global_batch_size": 4}, eval={"batch_size": 4})
    proc = _torchrun(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "results.json").read_text())["num_processes"] == 2
    assert main(["eval", str(run), "eval.batch_size=4", "--name", "one"]) == 0
    one = run / "evals" / "one"
    files = sorted(p.relative_to(run) for p in (run / "eval").rglob("*.jsonl"))
    assert len(files) == 6 and files == sorted(p.relative_to(one) for p in (one / "eval").rglob("*.jsonl"))
    routes = set()
    for name in files:
        lines = (run / name).read_text().splitlines()
        assert lines == (one / name).read_text().splitlines(), name
        routes.update(json.loads(line)["route"] for line in lines)
    assert len(routes) > 1  # the tasks were answered by different adapters
