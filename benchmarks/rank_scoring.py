"""Rank evaluation vs generation: `rank_labels` against `generate` on the same classification prompts.

Data: the first --n examples of EasyCL's SST-2 test split (alpaca JSON; the outputs are the labels, the
label set is every distinct output of the file, sorted) when ../shared/data/easycl_benchmarks is there,
otherwise synthetic:parity test prompts with the label set {even, odd} (said so in the output). The same
model answers every prompt twice, as evaluation would in each eval.mode:

- generate: `encode_prompt` + retain.evaluation.generate.generate (greedy, --max-new-tokens 8,
  --batch-size prompts per batch);
- rank: retain.evaluation.rank.rank_labels as evaluation runs it (each (prompt, label) pair encoded as
  training does; each batch of --batch-size prompts is one forward, then one short forward per label on
  its KV cache);
- rank_pairs: the same with share_prompt=False (every pair run in full, --batch-size pairs per forward),
  for context: the straightforward way, which costs one prompt pass per label.

Both under the evaluation's bf16 autocast flag (retain.runtime.bf16_supported()), warmed up first
on a few prompts; with --repeats > 1 the two alternate and the median is reported. The result is the
ratio of seconds, generate over rank, measured in this one run (and generate over rank_pairs), and each
mode's accuracy against the references (the `accuracy` scorer).

    python benchmarks/rank_scoring.py                                  # smollm2-135m, 96 prompts, batch 48
    python benchmarks/rank_scoring.py --model tiny-random --n 8 --batch-size 4           # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
from _common import machine, median, print_table, quiet_libraries, write_json

from retain.data.encode import encode_prompt
from retain.data.formats import Example, parse_alpaca
from retain.data.synthetic import load_synthetic
from retain.evaluation.generate import generate
from retain.evaluation.rank import rank_labels
from retain.evaluation.scoring import accuracy
from retain.models.loading import load_model
from retain.runtime import bf16_supported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.join(
    ROOT, "..", "shared", "data", "easycl_benchmarks", "benchmark", "LNT", "SST-2", "SST-2_test.json"
)


def load_data(path: str, n: int) -> tuple[list[Example], list[str], str]:
    """(examples, label set, description): SST-2 when the file exists, else synthetic parity prompts."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
        labels = sorted({str(record["output"]) for record in records})
        examples = [parse_alpaca(record, {}, "SST-2_test", i) for i, record in enumerate(records[:n])]
        return examples, labels, f"EasyCL SST-2 test, first {len(examples)} examples"
    examples = load_synthetic("synthetic:parity", n, seed=0, split="test")
    return examples, ["even", "odd"], f"SYNTHETIC fallback ({path} not found): synthetic:parity test"


def run_generate(
    model, tokenizer, examples: list[Example], batch_size: int, max_new_tokens: int
) -> list[str]:
    prompts = [encode_prompt(tokenizer, example) for example in examples]
    return generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False
    )


def run_rank(
    model, tokenizer, examples: list[Example], labels: list[str], batch_size: int, share_prompt: bool = True
) -> list[str]:
    return rank_labels(
        model, tokenizer, examples, labels, batch_size=batch_size, progress=False, share_prompt=share_prompt
    )[0]


def timed(fn, *args) -> tuple[list[str], float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-random or a local dir")
    parser.add_argument("--data", default=SST2, help="alpaca JSON test file (outputs are the labels)")
    parser.add_argument("--n", type=int, default=96, help="prompts: the first n examples")
    parser.add_argument("--batch-size", type=int, default=48, help="prompts per batch (rank_pairs: pairs)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side (alternating); median")
    parser.add_argument("--output", default="rank_scoring", help="name of the JSON file in benchmarks/out")
    args = parser.parse_args(argv)
    if min(args.n, args.batch_size, args.max_new_tokens, args.repeats) < 1:
        parser.error("--n, --batch-size, --max-new-tokens and --repeats must be 1 or more")

    quiet_libraries()
    bf16 = bf16_supported()
    model, tokenizer, _ = load_model(args.model)
    examples, labels, data = load_data(args.data, args.n)
    references = [example.reference for example in examples]
    print(
        f"model {args.model}, {data}, labels {labels}, batch {args.batch_size}, "
        f"max_new_tokens {args.max_new_tokens}, bf16 autocast: {bf16}, "
        f"torch threads: {torch.get_num_threads()}",
        file=sys.stderr,
    )

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    modes = ("generate", "rank", "rank_pairs")
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    predictions: dict[str, list[str]] = {}
    with autocast:
        # Warm-up (untimed): first calls pay for lazy initialisation and kernel selection.
        warm = examples[:4]
        run_generate(model, tokenizer, warm, len(warm), args.max_new_tokens)
        run_rank(model, tokenizer, warm, labels, len(warm))
        run_rank(model, tokenizer, warm, labels, len(warm), False)
        runs = {
            "generate": (run_generate, model, tokenizer, examples, args.batch_size, args.max_new_tokens),
            "rank": (run_rank, model, tokenizer, examples, labels, args.batch_size),
            "rank_pairs": (run_rank, model, tokenizer, examples, labels, args.batch_size, False),
        }
        for repeat in range(args.repeats):
            for mode in modes:
                predictions[mode], elapsed = timed(*runs[mode])
                seconds[mode].append(elapsed)
            took = ", ".join(f"{mode} {seconds[mode][-1]:.2f}s" for mode in modes)
            print(f"  repeat {repeat + 1}: {took}", file=sys.stderr)

    ratio = median(seconds["generate"]) / median(seconds["rank"])
    ratio_pairs = median(seconds["generate"]) / median(seconds["rank_pairs"])
    acc = {
        mode: sum(accuracy(p, r) for p, r in zip(predictions[mode], references, strict=True))
        / len(references)
        for mode in modes
    }
    agree = sum(a == b for a, b in zip(predictions["rank"], predictions["rank_pairs"], strict=True))
    off_label = sum(not any(accuracy(p, label) for label in labels) for p in predictions["generate"])

    print_table(
        [
            ("mode", "seconds (median)", "prompts/s", "accuracy"),
            *(
                (
                    mode,
                    f"{median(seconds[mode]):.2f}",
                    f"{len(examples) / median(seconds[mode]):.1f}",
                    f"{acc[mode]:.3f}",
                )
                for mode in modes
            ),
        ]
    )
    print(f"\nratio generate/rank (seconds): {ratio:.2f}   (generate/rank_pairs: {ratio_pairs:.2f})")
    print(f"rank and rank_pairs agree on {agree}/{len(examples)} predictions")
    print(f"generated answers outside the label set: {off_label}/{len(examples)}")
    path = write_json(
        args.output,
        {
            "benchmark": "rank_scoring",
            "model": args.model,
            "data": data,
            "labels": labels,
            "prompts": len(examples),
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "bf16": bf16,
            "ratio_generate_over_rank": ratio,
            "ratio_generate_over_rank_pairs": ratio_pairs,
            "seconds": seconds,
            "accuracy": acc,
            "rank_pairs_agreement": agree,
            "generated_off_label": off_label,
            "examples": [
                {"reference": r, "generate": g, "rank": k}
                for r, g, k in list(
                    zip(references, predictions["generate"], predictions["rank"], strict=True)
                )[:10]
            ],
            "machine": machine(),
            "note": "ratio measured in one run; absolute numbers depend on the machine",
        },
    )
    print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
