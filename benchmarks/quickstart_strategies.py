"""The quickstart on 1 process, on 2 processes under DDP and under FSDP: the same matrix, and how fast.

Each side is a whole `retain run examples/quickstart.yaml` (smollm2-135m with LoRA, 3 synthetic tasks,
30 steps of 8 examples each, 48 test prompts per task) in fp32 (`train.bf16=false`) with
`train.global_batch_size=8`, so the 2-process sides take the 1-process side's optimizer steps (4 examples
per process per step):

- single: `retain run`, torch with --threads threads (default 2: both cores to the one process);
- ddp: `torchrun --nproc_per_node 2 -m retain.cli run`, 1 thread each;
- fsdp: the same with `train.fsdp="full_shard auto_wrap"` (FSDP2 on CPU; every rank answers every prompt
  in step, since the parameters are sharded).

Printed: each side's accuracy matrix, its largest difference from the single side's, the share of
prediction lines equal to the single side's, the largest difference of a saved adapter tensor, and
training / evaluation seconds with their ratio to the single side's (from each run's results.json
timings; > 1: faster than one process). Sums taken in another order (gloo's all-reduce, FSDP's
reduce-scatter) differ by float rounding, which 90 Adam steps can lift into a different greedy token
on a few prompts: the matrix is compared within --tolerance.

    python benchmarks/quickstart_strategies.py                               # the quickstart, ~10 min
    python benchmarks/quickstart_strategies.py --model tiny-random --steps 4 --test-size 8   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from _common import launch, machine, print_table, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.yaml")
SIDES = {
    "single": [],
    "ddp": [],
    "fsdp": ["train.fsdp=full_shard auto_wrap"],
}


def run_side(args: argparse.Namespace, side: str, out: str) -> dict:
    """One whole run in fresh processes; returns its results.json."""
    processes = 1 if side == "single" else 2
    threads = args.threads if processes == 1 else 1
    overrides = ["train.bf16=false", "train.global_batch_size=8", f"output_dir={out}", *SIDES[side]]
    if args.model:
        overrides += [f"model.name_or_path={args.model}", "model.lora_layers=all"]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    if args.test_size:
        overrides.append(f"stream.test_size={args.test_size}")
    launch(processes, threads, ["-m", "retain.cli", "run", args.config, *overrides], f"{side} side")
    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        return json.load(handle)


def equal_lines(one: str, other: str) -> tuple[int, int]:
    """(equal, total) prediction lines over every eval file of the two run folders."""
    equal = total = 0
    for folder, _, names in os.walk(os.path.join(one, "eval")):
        for name in names:
            mine = os.path.join(folder, name)
            theirs = os.path.join(other, os.path.relpath(mine, one))
            with open(mine, encoding="utf-8") as a, open(theirs, encoding="utf-8") as b:
                pairs = list(zip(a.read().splitlines(), b.read().splitlines(), strict=True))
            equal += sum(x == y for x, y in pairs)
            total += len(pairs)
    return equal, total


def largest_weight_difference(one: str, other: str) -> float:
    """The largest absolute difference of any saved adapter tensor, over every task's checkpoint."""
    from safetensors.torch import load_file

    largest = 0.0
    for folder, _, names in os.walk(os.path.join(one, "tasks")):
        for name in (n for n in names if n.endswith(".safetensors")):
            mine = load_file(os.path.join(folder, name))
            theirs = load_file(os.path.join(other, os.path.relpath(os.path.join(folder, name), one)))
            for key, tensor in mine.items():
                largest = max(largest, float((tensor.double() - theirs[key].double()).abs().max()))
    return largest


def seconds(results: dict, kind: str) -> float:
    return sum(v for k, v in results["timings"].items() if k.startswith(f"{kind}_s/"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=QUICKSTART)
    parser.add_argument("--model", default="", help="override model.name_or_path (tiny-random: smoke test)")
    parser.add_argument("--steps", type=int, default=0, help="override train.max_steps")
    parser.add_argument("--test-size", type=int, default=0, help="override stream.test_size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the 1-process side")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest matrix difference allowed")
    args = parser.parse_args()

    results: dict[str, dict] = {}
    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="quickstart_strategies_") as folder:
        for side in SIDES:
            results[side] = run_side(args, side, os.path.join(folder, side))
        single = results["single"]
        for side, got in results.items():
            largest = max(
                abs(a - b)
                for row, want_row in zip(got["matrix"], single["matrix"], strict=True)
                for a, b in zip(row, want_row, strict=True)
            )
            equal, total = equal_lines(os.path.join(folder, "single"), os.path.join(folder, side))
            weights = largest_weight_difference(os.path.join(folder, "single"), os.path.join(folder, side))
            report[side] = {
                "matrix": got["matrix"],
                "largest_difference": largest,
                "equal_prediction_lines": [equal, total],
                "largest_weight_difference": weights,
                "train_s": seconds(got, "train"),
                "eval_s": seconds(got, "eval"),
                "strategy": got.get("strategy", {}),
            }
    rows = [("side", "matrix diff", "weights diff", "equal predictions", "train s (x)", "eval s (x)")]
    for side, r in report.items():
        rows.append(
            (
                side,
                f"{r['largest_difference']:.4f}",
                f"{r['largest_weight_difference']:.2g}",
                f"{r['equal_prediction_lines'][0]}/{r['equal_prediction_lines'][1]}",
                f"{r['train_s']:.0f} ({report['single']['train_s'] / r['train_s']:.2f}x)",
                f"{r['eval_s']:.0f} ({report['single']['eval_s'] / r['eval_s']:.2f}x)",
            )
        )
    print_table(rows)
    for side, r in report.items():
        print(f"{side}: " + " | ".join(" ".join(f"{100 * v:5.1f}" for v in row) for row in r["matrix"]))
    worst = max(r["largest_difference"] for r in report.values())
    verdict = "within" if worst <= args.tolerance else "BEYOND"
    print(f"largest matrix difference from the 1-process run: {worst:.4f} ({verdict} {args.tolerance})")
    settings = {"config": os.path.relpath(args.config, ROOT), "model": args.model or "(config)"}
    settings |= {"steps": args.steps or "(config)", "test_size": args.test_size or "(config)", "bf16": False}
    path = write_json(
        "quickstart_strategies",
        {"sides": report, "tolerance": args.tolerance, "settings": settings, "machine": machine()},
    )
    print(f"wrote {path}")
    if worst > args.tolerance:
        sys.exit(1)


if __name__ == "__main__":
    main()
