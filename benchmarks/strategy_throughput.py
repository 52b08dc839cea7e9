"""Training throughput of the strategies: optimizer steps per second, 1 process vs DDP and FSDP on 2.

Each side trains a randomly initialised Llama (retain.models.tiny, widened with --hidden / --layers) with
LoRA on every linear layer, through the Trainer as the loop builds it (retain.engine.strategies'
arguments, the CPU FSDP switch of ContinualTrainer), for --steps steps of --batch examples per step
(global: 2 processes take half each), sequences of --length tokens, fp32. The clock runs over the steps
after --warmup warm-up steps, on rank 0, from a barrier to a barrier.

- single: `python strategy_throughput.py --worker single`, torch with --threads threads (default 2);
- ddp / fsdp: `torchrun --nproc_per_node 2 strategy_throughput.py --worker ddp|fsdp`, 1 thread each.

Printed: steps/s per side and its ratio to the single process (> 1: faster). On a shared or 2-core
machine the ratios move from run to run; the JSON under benchmarks/out/ records the machine.

    python benchmarks/strategy_throughput.py                                  # hidden 256, 4 layers
    python benchmarks/strategy_throughput.py --hidden 64 --layers 2 --steps 4 --warmup 1    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from _common import launch, machine, print_table, quiet_libraries, write_json

SIDES = ("single", "ddp", "fsdp")


class _Timer:
    """A TrainerCallback (built lazily: transformers imports inside the worker) timing steps after warm-up."""

    def __new__(cls, warmup: int):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self) -> None:
                self.start, self.end, self.steps = 0.0, 0.0, 0

            def on_step_end(self, args, state, control, **kwargs):
                _barrier()
                if state.global_step == warmup:
                    self.start = time.perf_counter()
                elif state.global_step > warmup:
                    self.end, self.steps = time.perf_counter(), state.global_step - warmup

        return Timer()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def worker(args: argparse.Namespace) -> None:
    quiet_libraries()
    from transformers import TrainingArguments

    from retain.config import config_from_dict
    from retain.engine.strategies import strategy_arguments
    from retain.engine.trainer import ContinualTrainer
    from retain.methods.base import ContinualMethod, MethodContext
    from retain.models.adapters import apply_finetuning
    from retain.models.tiny import tiny_model, tiny_tokenizer
    from retain.runtime import Strategy, batch_layout, process_state

    torch.set_num_threads(args.threads)
    processes = process_state()
    raw = {
        "model": {"name_or_path": "tiny-random", "lora_rank": 8, "lora_alpha": 16},
        "train": {
            "global_batch_size": args.batch,
            "per_device_train_batch_size": args.batch,
            "bf16": "false",
        },
        "stream": {"tasks": ["synthetic:parity"]},  # not read: the data is random tokens
        "output_dir": os.path.join(args.out, "run"),
    }
    if args.worker == "fsdp":
        raw["train"]["fsdp"] = "full_shard auto_wrap"
    config = config_from_dict(raw)
    tokenizer = tiny_tokenizer()
    heads = max(1, args.hidden // 32)
    model = tiny_model(
        tokenizer,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    model = apply_finetuning(model, config.model)
    batch = batch_layout(config.train, processes.num_processes)
    strategy = Strategy(args.worker, processes.num_processes)
    steps = args.warmup + args.steps
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (steps * args.batch, args.length), generator=generator)
    positions = torch.arange(args.length)
    data = [
        {
            "input_ids": row,
            "labels": row.clone(),
            "attention_mask": torch.ones_like(row),
            "position_ids": positions,
        }
        for row in ids
    ]
    training = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"),
        per_device_train_batch_size=batch.per_device,
        gradient_accumulation_steps=batch.accumulation,
        max_steps=steps,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        **strategy_arguments(config.train, strategy),
    )
    ctx = MethodContext.create(model, tokenizer, config, [], rank=processes.process_index)
    timer = _Timer(args.warmup)
    trainer = ContinualTrainer(
        model=model, args=training, train_dataset=data, method=ContinualMethod(), ctx=ctx, callbacks=[timer]
    )
    trainer.train()
    if processes.is_main_process:
        result = {"side": args.worker, "steps_per_s": timer.steps / (timer.end - timer.start)}
        result["fsdp_sharded"] = trainer.is_fsdp_enabled
        print("RESULT " + json.dumps(result), flush=True)


def _run_side(side: str, args: argparse.Namespace) -> dict:
    script = os.path.abspath(__file__)
    options = ["--worker", side, "--out", os.path.join(args.out, side)]
    for name in ("hidden", "layers", "steps", "warmup", "batch", "length"):
        options += [f"--{name}", str(getattr(args, name))]
    processes, threads = (1, args.threads) if side == "single" else (2, 1)
    proc = launch(processes, threads, [script, *options, "--threads", str(threads)], side, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        sys.exit(f"{side} printed no RESULT line:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join("/tmp", "retain-strategy-throughput"))
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the Llama")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=8, help="examples per optimizer step (global)")
    parser.add_argument("--length", type=int, default=128, help="tokens per example")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the single process")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {side: _run_side(side, args) for side in SIDES}
    base = results["single"]["steps_per_s"]
    rows = [("side", "steps/s", "vs 1 process")]
    for side, result in results.items():
        rows.append((side, f"{result['steps_per_s']:.2f}", f"{result['steps_per_s'] / base:.2f}x"))
    print_table(rows)
    settings = {k: getattr(args, k) for k in ("hidden", "layers", "steps", "warmup", "batch", "length")}
    path = write_json("strategy_throughput", {"settings": settings, "results": results, "machine": machine()})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
