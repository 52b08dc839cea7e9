"""Evaluation generation: batched `generate` vs `generate_one_by_one` on the same prompts.

Prompts are the test splits of three retain synthetic tasks, encoded with retain.data.encode.encode_prompt
(what evaluation feeds the model). The same model answers them with
retain.evaluation.generate.generate(batch_size=B) and with generate_one_by_one (greedy, same
max_new_tokens, same bf16 autocast flag as evaluation: retain.runtime.bf16_supported()). Both are
warmed up first on a few prompts; with --repeats > 1 the two alternate and the median is reported. The
result is the ratio of prompts/s, batched over one-by-one, measured in this one run, plus whether the
two give identical predictions.

    python benchmarks/generation.py                              # smollm2-135m, 3 x 48 prompts, batch 48
    python benchmarks/generation.py --model tiny-random --prompts-per-task 4 --batch-size 4   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
from _common import machine, median, print_table, quiet_libraries, write_json

from retain.data.encode import encode_prompt
from retain.data.synthetic import load_synthetic
from retain.evaluation.generate import generate, generate_one_by_one
from retain.models.loading import load_model
from retain.runtime import bf16_supported

TASKS = ["synthetic:arithmetic", "synthetic:reverse", "synthetic:parity"]


def timed(fn, *args, **kwargs) -> tuple[list[str], float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-random or a local dir")
    parser.add_argument("--prompts-per-task", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side (alternating); median")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic test prompts")
    parser.add_argument("--target", type=float, default=5.0, help="ratio batched/one-by-one to reach")
    parser.add_argument("--output", default="generation", help="name of the JSON file in benchmarks/out")
    args = parser.parse_args(argv)
    if min(args.prompts_per_task, args.batch_size, args.max_new_tokens, args.repeats) < 1:
        parser.error("--prompts-per-task, --batch-size, --max-new-tokens and --repeats must be 1 or more")

    quiet_libraries()
    bf16 = bf16_supported()
    model, tokenizer, _ = load_model(args.model)
    prompts: list[list[int]] = []
    for task in TASKS:
        examples = load_synthetic(task, args.prompts_per_task, seed=args.seed, split="test")
        prompts += [encode_prompt(tokenizer, example) for example in examples]
    common = {"max_new_tokens": args.max_new_tokens, "progress": False}
    print(
        f"model {args.model}, {len(prompts)} prompts ({', '.join(TASKS)}), batch {args.batch_size}, "
        f"max_new_tokens {args.max_new_tokens}, bf16 autocast: {bf16}, "
        f"torch threads: {torch.get_num_threads()}",
        file=sys.stderr,
    )

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    seconds: dict[str, list[float]] = {"batched": [], "one_by_one": []}
    with autocast:
        # Warm-up (untimed): first calls pay for lazy initialisation and kernel selection.
        warm = prompts[:: max(1, len(prompts) // 4)][:4]
        generate(model, tokenizer, warm, batch_size=len(warm), **common)
        generate_one_by_one(model, tokenizer, warm[:2], **common)
        for repeat in range(args.repeats):
            batched, t_batched = timed(
                generate, model, tokenizer, prompts, batch_size=args.batch_size, **common
            )
            single, t_single = timed(generate_one_by_one, model, tokenizer, prompts, **common)
            seconds["batched"].append(t_batched)
            seconds["one_by_one"].append(t_single)
            print(
                f"  repeat {repeat + 1}: batched {t_batched:.2f}s, one-by-one {t_single:.2f}s",
                file=sys.stderr,
            )

    rate = {side: len(prompts) / median(values) for side, values in seconds.items()}
    ratio = rate["batched"] / rate["one_by_one"]
    mismatches = [k for k, (a, b) in enumerate(zip(batched, single, strict=True)) if a != b]
    print_table(
        [
            ("side", "prompts/s", "seconds (median)"),
            (
                f"batched (batch {args.batch_size})",
                f"{rate['batched']:.2f}",
                f"{median(seconds['batched']):.2f}",
            ),
            ("one by one", f"{rate['one_by_one']:.2f}", f"{median(seconds['one_by_one']):.2f}"),
        ]
    )
    verdict = "OK" if ratio >= args.target else "BELOW TARGET"
    print(f"\nratio batched/one-by-one (prompts/s): {ratio:.2f}  (target >= {args.target}: {verdict})")
    print(
        f"identical predictions: {len(prompts) - len(mismatches)}/{len(prompts)}"
        + (f" (first differing prompt: {mismatches[0]})" if mismatches else "")
    )
    path = write_json(
        args.output,
        {
            "benchmark": "generation",
            "model": args.model,
            "tasks": TASKS,
            "prompts": len(prompts),
            "prompt_tokens": sum(len(p) for p in prompts),
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "bf16": bf16,
            "ratio_batched_over_one_by_one": ratio,
            "target": args.target,
            "meets_target": ratio >= args.target,
            "prompts_per_s": rate,
            "seconds": seconds,
            "identical_predictions": not mismatches,
            "identical_count": len(prompts) - len(mismatches),
            "mismatches": [
                {"index": k, "batched": batched[k], "one_by_one": single[k]} for k in mismatches[:10]
            ],
            "machine": machine(),
            "note": "ratios measured in one run; absolute numbers depend on the machine",
        },
    )
    print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
