"""Evaluation on every process: one evaluation row with 1 process vs 2 processes (torchrun, gloo on CPU).

The row is the quickstart's (examples/quickstart.yaml: smollm2-135m with LoRA, 3 synthetic tasks x 48
test prompts, greedy, 8 new tokens, 48 prompts per batch) in fp32 (`train.bf16=false`), answered by the
model as it starts (row 0; no training). Each side runs in fresh processes that load the model, warm up
on a few prompts and then time `retain.engine.evaluate.evaluate_row` (process start and model load are
not timed, as the loop's `eval_s/<row>` does not time them):

- 1 process: `python eval_scaling.py --worker`, torch with --threads threads (default 2: the machine's
  two cores go to the one process);
- 2 processes: `torchrun --nproc_per_node 2 eval_scaling.py --worker`, each with 1 thread, every rank
  calling `evaluate_row(..., all_processes=True)`: each answers its share of the prompts, rank 0 gathers
  and writes; the clock runs from a barrier before the row to the end of the row on rank 0 (the gather
  at the end of each task waits for the slowest rank).

The sides alternate --repeats times (1, 2, 1, 2, ...) and the medians are compared: the ratio is
seconds with 1 process over seconds with 2 (target >= 1.6 on a 2-core CPU). The predictions files of
both sides must be equal line by line (fp32); the script says so and exits 1 if they are not.

    python benchmarks/eval_scaling.py                                           # quickstart, 2 repeats
    python benchmarks/eval_scaling.py --model tiny-random --test-size 8 --repeats 1          # smoke test
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import tempfile
import time

import torch
from _common import launch, machine, median, print_table, quiet_libraries, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.yaml")


def worker(args: argparse.Namespace) -> None:
    """Load the run's model and method as the loop does, warm up, time one evaluation row."""
    quiet_libraries()
    import torch.distributed as dist

    from retain.config import load_config
    from retain.data.encode import encode_prompt
    from retain.engine.evaluate import evaluate_row
    from retain.engine.loop import Experiment
    from retain.engine.plan import make_plan
    from retain.engine.run_dir import RunDir
    from retain.evaluation.generate import generate

    torch.set_num_threads(args.threads)
    overrides = ["train.bf16=false", f"output_dir={args.out}/run", f"stream.test_size={args.test_size}"]
    if args.model:
        # Another model: LoRA on all its layers (the quickstart's last:8 assumes a deep model).
        overrides += [f"model.name_or_path={args.model}", "model.lora_layers=all"]
    config = load_config(args.config, overrides)
    plan = make_plan(config)
    experiment = Experiment(plan, RunDir(config.output_dir))  # joins the process group under torchrun
    ctx, world = experiment.ctx, experiment.processes.num_processes
    task = plan.tasks[0]  # a few of its prompts warm the kernels up
    prompts = [encode_prompt(ctx.tokenizer, example, ctx.processor) for example in task.test[:4]]
    generate(ctx.model, ctx.tokenizer, prompts, max_new_tokens=2, batch_size=4, progress=False)
    files = [os.path.join(args.out, "eval", f"{t.name}.jsonl") for t in plan.tasks]
    experiment.processes.wait_for_everyone()
    start, cpu = time.perf_counter(), [time.process_time()]
    scores = evaluate_row(
        plan.method,
        ctx,
        0,
        files,
        config.eval.max_new_tokens,
        config.eval.batch_size,
        all_processes=world > 1,
    )
    seconds, cpu = time.perf_counter() - start, [time.process_time() - cpu[0]]
    if world > 1:
        every: list = [None] * world
        dist.all_gather_object(every, cpu[0])
        cpu = every
    if experiment.is_main:
        report = {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "scores": scores,
            "processes": world,
            "threads": torch.get_num_threads(),
        }
        with open(os.path.join(args.out, "timing.json"), "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    if world > 1:
        dist.destroy_process_group()


def run_side(args: argparse.Namespace, processes: int, out: str) -> dict:
    """One side in fresh processes; returns its timing.json."""
    threads = args.threads if processes == 1 else 1
    options = ["--worker", "--out", out, "--config", args.config, "--threads", str(threads)]
    options += ["--test-size", str(args.test_size)] + (["--model", args.model] if args.model else [])
    launch(processes, threads, [os.path.abspath(__file__), *options], f"{processes}-process side")
    with open(os.path.join(out, "timing.json"), encoding="utf-8") as handle:
        return json.load(handle)


def same_predictions(one: str, two: str) -> list[str]:
    """The predictions files that differ between the two sides' folders (none: equal line by line)."""
    names = sorted(set(os.listdir(os.path.join(one, "eval"))) | set(os.listdir(os.path.join(two, "eval"))))
    return [
        n for n in names if not filecmp.cmp(os.path.join(one, "eval", n), os.path.join(two, "eval", n), False)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=QUICKSTART)
    parser.add_argument("--model", default="", help="override model.name_or_path (tiny-random: smoke test)")
    parser.add_argument("--test-size", type=int, default=48, help="test prompts per task (quickstart: 48)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the 1-process side")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    seconds: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[list[float]]] = {1: [], 2: []}
    differing: list[str] = []
    with tempfile.TemporaryDirectory(prefix="eval_scaling_") as folder:
        for repeat in range(args.repeats):
            for processes in (1, 2):
                out = os.path.join(folder, f"{processes}p-{repeat}")
                timing = run_side(args, processes, out)
                seconds[processes].append(timing["seconds"])
                cpu[processes].append(timing["cpu_seconds"])
            differing += same_predictions(
                os.path.join(folder, f"1p-{repeat}"), os.path.join(folder, f"2p-{repeat}")
            )
    one, two = median(seconds[1]), median(seconds[2])
    ratio = one / two
    print_table(
        [
            ("side", "row seconds (median)", "runs"),
            (f"1 process, {args.threads} threads", f"{one:.2f}", " ".join(f"{s:.2f}" for s in seconds[1])),
            ("2 processes, 1 thread each", f"{two:.2f}", " ".join(f"{s:.2f}" for s in seconds[2])),
        ]
    )
    print(f"ratio 1-process / 2-process row time: {ratio:.2f}x (target >= 1.6)")
    # CPU seconds do not depend on what else the machine runs: how evenly the work was split.
    work = median([sum(c) for c in cpu[1]]) / median([max(c) for c in cpu[2]])
    print(f"CPU seconds of the row, 1 process / busiest of 2: {work:.2f}x (2 = an even split)")
    print("predictions: " + (f"DIFFER in {sorted(set(differing))}" if differing else "equal line by line"))
    path = write_json(
        "eval_scaling",
        {
            "ratio": ratio,
            "seconds": {"1": seconds[1], "2": seconds[2]},
            "cpu_seconds": {"1": cpu[1], "2": cpu[2]},
            "cpu_ratio": work,
            "equal_predictions": not differing,
            "differing_files": sorted(set(differing)),
            "settings": {
                "config": os.path.relpath(args.config, ROOT),
                "model": args.model or "(config)",
                "test_size": args.test_size,
                "threads_1_process": args.threads,
                "threads_per_process_2_processes": 1,
                "repeats": args.repeats,
                "bf16": False,
            },
            "machine": machine(),
        },
    )
    print(f"wrote {path}")
    if differing:
        sys.exit(1)


if __name__ == "__main__":
    main()
