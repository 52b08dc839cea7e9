"""Pseudo-sample generation: seconds per 100 samples for LAMOL and SSR, as they run before a new task.

The model (`--model`, LoRA-wrapped as in a run: rank 8, all-linear) is untrained; task 1 is
`synthetic:parity`, task 2 `synthetic:capital_letters`, with the quickstart's system prompt, cutoff 128
and eval batch size (`--batch-size`, what both methods generate with), bf16 autocast when the machine
supports it. Timed, after an untimed warm-up on a few prompts:

- **lamol**: `LAMOL.generate_pseudo` with gen_ratio 1: `--samples` sequences sampled after task 1's
  `__gen_parity__` marker (top-k 20, temperature 1, up to `--max-new-tokens`) and parsed;
- **ssr**: `SSR.synthesize` for task 1 from 2 stored demonstrations: `--samples` in-context inputs from
  the base model (adapters off), features + k-means selection of half of them, greedy refinement of
  the selected outputs by the LoRA model.

Reported: seconds per 100 generated samples (candidates, whether or not they parse) and the fraction kept.
The untrained model decides how long each generation runs (until its end token or the limit), so compare
numbers only for the same model and settings.

    .venv/bin/python benchmarks/pseudo_generation.py                      # smollm2-135m, 200 samples
    .venv/bin/python benchmarks/pseudo_generation.py --model tiny-random --samples 8 --batch-size 4 \\
        --max-new-tokens 8                                                # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from _common import machine, median, print_table, quiet_libraries, write_json

from retain.config import config_from_dict
from retain.data.streams import build_stream
from retain.methods.base import MethodContext
from retain.methods.common import pseudo
from retain.methods.lamol import LAMOL, LAMOLConfig
from retain.methods.ssr import SSR, SSRConfig
from retain.models.adapters import apply_finetuning
from retain.models.loading import load_model
from retain.runtime import bf16_supported, use_bf16


def context(args: argparse.Namespace) -> MethodContext:
    """A MethodContext at the start of task 2, as the loop builds it."""
    raw = {
        "model": {"name_or_path": args.model, "lora_rank": 8, "lora_alpha": 16, "lora_target": "all-linear"},
        "stream": {
            "train_size": 16,
            "test_size": 4,
            "system": "Answer briefly.",
            "tasks": ["synthetic:parity", "synthetic:capital_letters"],
        },
        "train": {"cutoff_len": 128, "bf16": "auto"},
        "eval": {"batch_size": args.batch_size},
        "output_dir": os.path.join("benchmarks", "out", "pseudo_generation_run"),
        "seed": args.seed,
    }
    config = config_from_dict(raw)
    model, tokenizer, _ = load_model(args.model)
    model = apply_finetuning(model, config.model)
    if torch.cuda.is_available():
        model = model.cuda()
    return MethodContext.create(
        model, tokenizer, config, build_stream(config), task_index=2, bf16=use_bf16(config)
    )


def run_lamol(ctx: MethodContext, samples: int, max_new_tokens: int) -> tuple[float, float]:
    method = LAMOL(LAMOLConfig(gen_ratio=1.0, max_new_tokens=max_new_tokens))
    method.systems = {task.name: task.train[0].system for task in ctx.tasks}
    start = time.perf_counter()
    kept = method.generate_pseudo(ctx, ctx.tasks[1], samples)
    return time.perf_counter() - start, len(kept) / samples


def run_ssr(ctx: MethodContext, samples: int, max_new_tokens: int) -> tuple[float, float]:
    config = SSRConfig(
        candidates_per_task=samples,
        memory_per_task=max(1, samples // 2),
        n_clusters=min(20, max(1, samples // 2)),
        max_new_tokens=max_new_tokens,
        output_max_new_tokens=max_new_tokens,
    )
    method = SSR(config)
    task = ctx.tasks[0]
    method.demos[task.name] = pseudo.pick_demos(task.train, config.num_shots, ctx.rng("benchmark"))
    start = time.perf_counter()
    records = method.synthesize(ctx, task.name)
    return time.perf_counter() - start, sum(r["status"] == "kept" for r in records) / samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-random or a local dir")
    parser.add_argument("--samples", type=int, default=200, help="pseudo samples generated per method")
    parser.add_argument("--batch-size", type=int, default=48, help="generation batch size (eval.batch_size)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method (alternating); median")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="pseudo_generation", help="JSON file name in benchmarks/out")
    args = parser.parse_args(argv)
    if min(args.samples, args.batch_size, args.max_new_tokens, args.repeats) < 1:
        parser.error("--samples, --batch-size, --max-new-tokens and --repeats must be 1 or more")

    quiet_libraries()
    ctx = context(args)
    print(
        f"model {args.model}, {args.samples} samples per method, batch {args.batch_size}, "
        f"max_new_tokens {args.max_new_tokens}, bf16 autocast: {bf16_supported()}, "
        f"torch threads: {torch.get_num_threads()}",
        file=sys.stderr,
    )
    runs = {"lamol": run_lamol, "ssr": run_ssr}
    for run in runs.values():  # warm-up (untimed): lazy initialisation, kernel selection
        run(ctx, min(4, args.samples), min(8, args.max_new_tokens))
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    kept: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            elapsed, kept[name] = run(ctx, args.samples, args.max_new_tokens)
            seconds[name].append(elapsed)
            print(f"  repeat {repeat + 1}: {name} {elapsed:.2f}s", file=sys.stderr)

    per_100 = {name: 100 * median(values) / args.samples for name, values in seconds.items()}
    print_table(
        [("method", "s / 100 samples", "seconds (median)", "kept")]
        + [
            (name, f"{per_100[name]:.2f}", f"{median(seconds[name]):.2f}", f"{kept[name]:.0%}")
            for name in runs
        ]
    )
    path = write_json(
        args.output,
        {
            "benchmark": "pseudo_generation",
            "model": args.model,
            "samples": args.samples,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "bf16": bf16_supported(),
            "seconds_per_100_samples": per_100,
            "seconds": seconds,
            "kept_fraction": kept,
            "machine": machine(),
            "note": "the untrained model decides how long generations run; compare only like with like",
        },
    )
    print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
