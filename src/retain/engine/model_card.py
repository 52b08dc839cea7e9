"""The model card (README.md) `retain export` writes beside an exported model: what it is, where it comes
from, how to load it and generate as retain evaluated it, and the run's scores after the exported task."""

from __future__ import annotations

from typing import Any


def model_card(record: dict[str, Any]) -> str:
    """Markdown for an export, from what export.json records."""
    task = f"task {record['task']} ({record['task_name']})"
    lines = [
        f"# {record['method']} after {task}",
        "",
        f"Exported by retain {record['retain_version']} from the run `{record['run_dir']}`: "
        f"{record['description']}. This is the model retain evaluated after {task}, trained on "
        + ", ".join(record["tasks_trained"])
        + ".",
        "",
        "| | |",
        "|---|---|",
        f"| method | {record['method']} ({record['finetuning_type']} fine-tuning) |",
        f"| base model | {record['model_name_or_path']}"
        + (f" (loads from `{record['base_model']}`) |" if record["kind"] == "adapter" else " |"),
        f"| format | {_format(record)} |",
        f"| stop tokens | {record['eos_token_ids']} |",
        "",
        "## Load it",
        "",
        "```python",
        *_loading_code(record),
        "```",
        "",
        "retain answers each prompt greedily, rendered with the tokenizer's chat template (generation prompt "
        "added, no extra special tokens), and stops at the stop tokens above.",
    ]
    if record["eval"]["bf16_autocast"]:
        lines += [
            "The run evaluated under bf16 autocast; the weights here are as trained, so load under "
            "`torch.autocast(device, dtype=torch.bfloat16)` to answer as it did.",
        ]
    lines += ["", f"## Scores after {task}", ""]
    scores = record.get("scores")
    if scores:
        lines += ["| task | score |", "|---|---|"]
        lines += [f"| {name} | {value:.2f} |" for name, value in scores.items()]
        lines += ["", f"average {sum(scores.values()) / len(scores):.2f} ({record['eval']['mode']} mode)"]
    else:
        lines.append(f"Not evaluated yet: `retain eval {record['run_dir']}` scores it.")
    return "\n".join(lines) + "\n"


def _format(record: dict[str, Any]) -> str:
    if record["kind"] == "adapter":
        return f"PEFT LoRA adapter (rank {record['rank']}); tokenizer saved beside it"
    if record["merged"]:
        return "full model, LoRA merged into the base weights (transformers); tokenizer saved beside it"
    return "full model (transformers); tokenizer saved beside it"


def _loading_code(record: dict[str, Any]) -> list[str]:
    model_class = "AutoModelForImageTextToText" if record["image_text"] else "AutoModelForCausalLM"
    encoder = "AutoProcessor" if record["image_text"] else "AutoTokenizer"
    lines = [f"from transformers import {model_class}, {encoder}"]
    if record["kind"] == "adapter":
        lines += [
            "from peft import PeftModel",
            "",
            f'base = {model_class}.from_pretrained("{record["base_model"]}")',
            f'model = PeftModel.from_pretrained(base, "{record["path"]}").eval()',
        ]
    else:
        lines += ["", f'model = {model_class}.from_pretrained("{record["path"]}").eval()']
    tokenizer = "processor.tokenizer" if record["image_text"] else "tokenizer"
    loaded = "processor" if record["image_text"] else "tokenizer"
    lines += [
        f'{loaded} = {encoder}.from_pretrained("{record["path"]}")',
        'messages = [{"role": "user", "content": "..."}]',
        f"text = {tokenizer}.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
        f'inputs = {tokenizer}(text, add_special_tokens=False, return_tensors="pt")',
        "output = model.generate(",
        f"    **inputs, max_new_tokens={record['eval']['max_new_tokens']}, do_sample=False, "
        f"eos_token_id={record['eos_token_ids']}",
        ")",
        'answer = output[0, inputs["input_ids"].shape[1] :]',
        f"print({tokenizer}.decode(answer, skip_special_tokens=True).strip())",
    ]
    return lines
