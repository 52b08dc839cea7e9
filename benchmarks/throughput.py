"""Training throughput: retain's training step vs a plain PEFT + transformers Trainer script.

Both sides train the same model (a fresh copy per run, loaded with retain.models.loading.load_model and
wrapped with the same seeded LoRA: rank 8, alpha 16, all-linear) on the same token ids (a retain synthetic
task encoded with retain.data.encode.encode_dataset), with the same batch size, learning rate, precision
(bf16 autocast when retain.runtime.bf16_supported()), seed and number of steps:

- ours: retain.engine.trainer.ContinualTrainer with the "sequential" method, retain's left-padding
  `collate` and the response-window forward (`response_forward`, LM head on the response positions only);
- plain: transformers.Trainer + DataCollatorForSeq2Seq (right padding, labels -100), default compute_loss
  (the model computes the loss over the full logits).

Each run trains `warmup + steps` optimizer steps; the clock covers the last `steps` of them (from the end
of step `warmup` to the end of the last step). Runs alternate (ours, plain, ours, plain, ...) and the
reported tokens/s is the median over the repeats. Tokens are non-pad tokens of the timed batches (the
same batches on both sides: same data, same seed, same sampler). The result is a ratio, ours/plain,
measured in this one run; absolute tokens/s depend on the machine and are printed only as context.

    python benchmarks/throughput.py                       # smollm2-135m, 20 timed steps, 2 repeats
    python benchmarks/throughput.py --model tiny-random --steps 3 --warmup 1 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from typing import Any

import torch
from _common import machine, median, print_table, quiet_libraries, write_json
from peft import LoraConfig, get_peft_model
from transformers import (
    DataCollatorForSeq2Seq,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from retain.config import RunConfig
from retain.data.batching import FeatureDataset, collate
from retain.data.encode import encode_dataset
from retain.data.synthetic import load_synthetic
from retain.engine.trainer import ContinualTrainer
from retain.methods import create_method
from retain.methods.base import MethodContext
from retain.models.loading import load_model, load_tokenizer
from retain.runtime import bf16_supported

TASK = "synthetic:parity"
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}


class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


class CountingCollator:
    """Wraps a collator; records the non-pad tokens of each batch, in the order the batches are made."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.tokens: list[int] = []

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def training_args(out: str, args: argparse.Namespace, bf16: bool) -> TrainingArguments:
    """The same arguments for both sides."""
    return TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.warmup + args.steps,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def lora_model(name: str, seed: int):
    """A fresh model with the same seeded LoRA init on both sides."""
    model, tokenizer, _ = load_model(name)
    set_seed(seed)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    return model, tokenizer


def build_trainer(side: str, model, tokenizer, features, args, bf16, out, callbacks) -> tuple[Trainer, Any]:
    targs = training_args(out, args, bf16)
    dataset = FeatureDataset(features)
    if side == "ours":
        collator = CountingCollator(functools.partial(collate, pad_token_id=tokenizer.pad_token_id))
        ctx = MethodContext.create(model, tokenizer, RunConfig(), [], task_index=1)
        ctx.collate = collator.collator
        trainer: Trainer = ContinualTrainer(
            model=model,
            args=targs,
            train_dataset=dataset,
            data_collator=collator,
            method=create_method("sequential"),
            ctx=ctx,
            callbacks=callbacks,
        )
    else:
        tokenizer.padding_side = "right"
        collator = CountingCollator(
            DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
        )
        trainer = Trainer(
            model=model, args=targs, train_dataset=dataset, data_collator=collator, callbacks=callbacks
        )
    trainer.remove_callback(PrinterCallback)  # the end-of-training metrics line; the timings are ours
    return trainer, collator


def run_side(side: str, features, args, bf16: bool) -> dict[str, float]:
    model, tokenizer = lora_model(args.model, args.seed)
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="retain-bench-") as out:
        trainer, collator = build_trainer(side, model, tokenizer, features, args, bf16, out, [clock])
        result = trainer.train()
    steps = args.warmup + args.steps
    if len(clock.ends) != steps:
        raise RuntimeError(f"{side}: expected {steps} optimizer steps, saw {len(clock.ends)}")
    seconds = clock.ends[-1] - clock.ends[args.warmup - 1]
    tokens = sum(collator.tokens[args.warmup : steps])
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "steps_per_s": args.steps / seconds,
        "train_loss": float(result.training_loss),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-random or a local dir")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side (alternating); median taken")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.95, help="ratio ours/plain to reach")
    parser.add_argument("--output", default="throughput", help="name of the JSON file in benchmarks/out")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1 or args.batch_size < 1:
        parser.error("--steps, --warmup, --repeats and --batch-size must be 1 or more")

    quiet_libraries()
    bf16 = bf16_supported()
    tokenizer = load_tokenizer(args.model)
    # Exactly one epoch of data per run: every timed step sees a full batch and both sides see the same ones.
    n = args.batch_size * (args.warmup + args.steps)
    examples = load_synthetic(TASK, n, seed=0, split="train")
    features = encode_dataset(tokenizer, examples, args.cutoff_len, source=TASK)

    print(
        f"model {args.model}, {TASK} x {n}, batch {args.batch_size}, {args.warmup} warmup + {args.steps} "
        f"timed steps, {args.repeats} repeat(s), bf16 autocast: {bf16}, "
        f"torch threads: {torch.get_num_threads()}",
        file=sys.stderr,
    )
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "plain": []}
    for repeat in range(args.repeats):
        for side in ("ours", "plain"):
            stats = run_side(side, features, args, bf16)
            runs[side].append(stats)
            print(
                f"  repeat {repeat + 1} {side:5s}: {stats['tokens_per_s']:8.1f} tokens/s "
                f"({stats['seconds']:.2f}s, loss {stats['train_loss']:.4f})",
                file=sys.stderr,
            )

    summary = {side: median([r["tokens_per_s"] for r in runs[side]]) for side in runs}
    ratio = summary["ours"] / summary["plain"]
    step_ratio = median([r["steps_per_s"] for r in runs["ours"]]) / median(
        [r["steps_per_s"] for r in runs["plain"]]
    )
    print_table(
        [
            ("side", "tokens/s (median)", "steps/s (median)", "train loss"),
            *[
                (
                    side,
                    f"{summary[side]:.1f}",
                    f"{median([r['steps_per_s'] for r in runs[side]]):.3f}",
                    f"{median([r['train_loss'] for r in runs[side]]):.4f}",
                )
                for side in ("ours", "plain")
            ],
        ]
    )
    verdict = "OK" if ratio >= args.target else "BELOW TARGET"
    print(f"\nratio ours/plain (tokens/s): {ratio:.3f}  (target >= {args.target}: {verdict})")
    path = write_json(
        args.output,
        {
            "benchmark": "throughput",
            "model": args.model,
            "task": TASK,
            "examples": n,
            "batch_size": args.batch_size,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "repeats": args.repeats,
            "learning_rate": args.learning_rate,
            "cutoff_len": args.cutoff_len,
            "seed": args.seed,
            "lora": LORA,
            "bf16": bf16,
            "ratio_ours_over_plain": ratio,
            "ratio_steps_per_s": step_ratio,
            "target": args.target,
            "meets_target": ratio >= args.target,
            "median_tokens_per_s": summary,
            "runs": runs,
            "machine": machine(),
            "note": "ratios measured in one run; absolute numbers depend on the machine",
        },
    )
    print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
