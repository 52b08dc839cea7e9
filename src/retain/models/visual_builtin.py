"""The built-in image-text model `smollm2-135m-vision`: the embedded SmolLM2-135M-Instruct with a small
vision encoder trained here, from scratch, on the generated pictures of retain.data.synthetic_visual.

Nothing is downloaded: the model is built once on first use and cached beside the dequantized GGUF
(`<cache>/models/smollm2-135m-vision`), in two stages that follow LLaVA's recipe on a laptop scale:

1. **Vision encoder.** A 4-layer CLIP vision transformer (64 px pictures, 16 px patches: 16 image tokens)
   learns to see the scenes' attributes (colour, kind, side, count, digit) with one linear head per
   attribute over its last layer's patch features, the very features LLaVA hands to the projector.
2. **Alignment** (LLaVA's stage 1, "feature alignment"). The language model is frozen; the projector
   (and the encoder, at a lower rate) learns from generated captions ("A red circle at the left.") to
   turn the patch features into embeddings the language model reads. The captions name every attribute
   but are never a task's question or answer format, so each task still has to be learned.

Every picture of the build comes from the tasks' `train` split (the split hash keeps test scenes out) with
a build seed of its own. The folder is written atomically (temp folder + rename) with `build.json`: the
settings, each stage's time and its final accuracies and losses.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from retain.data.batching import collate
from retain.data.encode import encode_example
from retain.data.formats import Example
from retain.data.images import IMAGE_PLACEHOLDER
from retain.data.synthetic import SYNTHETIC_TASKS
from retain.data.synthetic_visual import COLOURS, IMAGE_SIZE, KINDS, render_scene
from retain.io import atomic_directory
from retain.runtime import bf16_supported

logger = logging.getLogger(__name__)

NAME = "smollm2-135m-vision"
BASE = "smollm2-135m"  # the language model
BUILD_VERSION = "1"  # bump when the recipe changes: the cache folder then no longer matches
IMAGE_TOKEN = "<image>"
SYSTEM = "Answer briefly."  # the quickstart's system prompt: the build sees the layout the tasks use
VISUAL_TASKS = ("shape_colour", "count_shapes", "shape_position", "shape_kind", "digit")
SIDES = ("left", "right", "top", "bottom", "middle")
ALIGN_PROMPTS = ("Describe the picture.", "What is in the picture?", "Describe what you see.")


@dataclass(frozen=True)
class VisionBuildSettings:
    """Sizes and schedule of the build (the defaults make the cached model; tests shrink them)."""

    image_size: int = IMAGE_SIZE
    patch_size: int = 16
    hidden_size: int = 192
    layers: int = 4
    heads: int = 4
    scenes_per_task: int = 1200
    encoder_steps: int = 1000
    encoder_batch: int = 64
    encoder_lr: float = 1e-3
    align_steps: int = 300
    align_batch: int = 16
    align_lr: float = 2e-3
    align_encoder_lr: float = 2e-4
    seed: int = 1234
    bf16: bool | None = None  # None: bf16 autocast where the CPU has it (retain.runtime)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# ---- scenes, labels and captions --------------------------------------------------------------------


def side_of(shape: dict[str, Any]) -> str:
    """Where a shape's centre lies: `middle` within 8 px of the centre, else the side it is nearest to."""
    dx, dy = shape["x"] - IMAGE_SIZE // 2, shape["y"] - IMAGE_SIZE // 2
    if max(abs(dx), abs(dy)) < 8:
        return "middle"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(sorted(COLOURS)),
    "kind": (*KINDS, "digit"),
    "side": SIDES,
    "count": ("1", "2", "3", "4", "5"),
    "digit": tuple(str(d) for d in range(10)),
}


def scene_labels(shapes: list[dict[str, Any]]) -> dict[str, int]:
    """The attribute classes a scene shows (an attribute that does not apply is left out: several shapes
    have no single colour or side, a digit is not counted among shapes)."""
    labels: dict[str, int] = {}
    if len(shapes) == 1:
        shape = shapes[0]
        labels["colour"] = ATTRIBUTES["colour"].index(shape["colour"])
        labels["kind"] = ATTRIBUTES["kind"].index(shape["kind"])
        labels["side"] = SIDES.index(side_of(shape))
        if shape["kind"] == "digit":
            labels["digit"] = shape["digit"]
    if all(shape["kind"] != "digit" for shape in shapes):
        labels["count"] = len(shapes) - 1
    return labels


def _named(shape: dict[str, Any]) -> str:
    if shape["kind"] == "digit":
        return f"a {shape['colour']} digit {shape['digit']}"
    return f"a {shape['colour']} {shape['kind']}"


def caption(shapes: list[dict[str, Any]]) -> str:
    """One sentence naming every attribute of the scene: 'A red circle at the left.', '3 shapes: ...'."""
    if len(shapes) == 1 and (
        shapes[0]["kind"] == "digit" or random.Random(json.dumps(shapes)).random() < 0.7
    ):
        text = _named(shapes[0])
        return f"{text[0].upper()}{text[1:]} at the {side_of(shapes[0])}."
    noun = "shape" if len(shapes) == 1 else "shapes"
    return f"{len(shapes)} {noun}: {', '.join(_named(s) for s in shapes)}."


def build_scenes(settings: VisionBuildSettings) -> list[Example]:
    """The build's pictures: `scenes_per_task` train-split examples of each visual task (on disk in the
    cache, like the tasks' own), shuffled; each keeps its scene in meta['shapes']."""
    examples = [
        example
        for task in VISUAL_TASKS
        for example in SYNTHETIC_TASKS[task].generate(settings.scenes_per_task, settings.seed, "train")
    ]
    random.Random(settings.seed).shuffle(examples)
    return examples


# ---- stage 1: the vision encoder ---------------------------------------------------------------------


def vision_config(settings: VisionBuildSettings) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=settings.hidden_size,
        intermediate_size=4 * settings.hidden_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        image_size=settings.image_size,
        patch_size=settings.patch_size,
        projection_dim=settings.hidden_size,
    )


class AttributeHeads(nn.Module):
    """One linear classifier per attribute over the flattened patch features (position-aware, so the
    patch features themselves must carry where things are)."""

    def __init__(self, settings: VisionBuildSettings) -> None:
        super().__init__()
        width = settings.image_tokens * settings.hidden_size
        self.heads = nn.ModuleDict(
            {name: nn.Linear(width, len(classes)) for name, classes in ATTRIBUTES.items()}
        )

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = patches.flatten(1)
        return {name: head(flat) for name, head in self.heads.items()}


def patch_features(encoder: CLIPVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The last layer's patch features without CLS: what LLaVA's projector reads (feature layer -1,
    strategy 'default')."""
    return encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]


def _label_tensor(scenes: list[list[dict[str, Any]]]) -> dict[str, torch.Tensor]:
    labels = [scene_labels(shapes) for shapes in scenes]
    return {name: torch.tensor([row.get(name, -100) for row in labels]) for name in ATTRIBUTES}


def _autocast(settings: VisionBuildSettings):
    enabled = bf16_supported() if settings.bf16 is None else settings.bf16
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def train_encoder(
    settings: VisionBuildSettings, image_processor: Any, scenes: list[list[dict[str, Any]]]
) -> tuple[CLIPVisionModel, dict[str, float]]:
    """Stage 1: train the vision encoder from scratch on the scenes' attributes; returns the encoder and
    each attribute's accuracy on the last 10% of the scenes (held out of this stage)."""
    torch.manual_seed(settings.seed)
    encoder = CLIPVisionModel(vision_config(settings))
    heads = AttributeHeads(settings)
    held = max(1, len(scenes) // 10)
    train, held_out = scenes[:-held], scenes[-held:]
    params = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.encoder_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.encoder_lr, total_steps=settings.encoder_steps, pct_start=0.1
    )
    rng = random.Random(settings.seed)
    encoder.train()
    for _ in tqdm(range(settings.encoder_steps), desc="vision encoder", unit="step", leave=False):
        batch = rng.sample(train, min(settings.encoder_batch, len(train)))
        pixels = image_processor(images=[render_scene({"shapes": s}) for s in batch], return_tensors="pt")
        labels = _label_tensor(batch)
        with _autocast(settings):
            logits = heads(patch_features(encoder, pixels["pixel_values"]))
        loss = sum(
            nn.functional.cross_entropy(logits[name].float(), labels[name], ignore_index=-100)
            for name in ATTRIBUTES
            if (labels[name] != -100).any()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    encoder.eval()
    return encoder, _attribute_accuracy(encoder, heads, image_processor, held_out, settings)


@torch.no_grad()
def _attribute_accuracy(encoder, heads, image_processor, scenes, settings) -> dict[str, float]:
    pixels = image_processor(images=[render_scene({"shapes": s}) for s in scenes], return_tensors="pt")
    with _autocast(settings):
        logits = heads(patch_features(encoder, pixels["pixel_values"]))
    labels = _label_tensor(scenes)
    accuracy = {}
    for name in ATTRIBUTES:
        known = labels[name] != -100
        if known.any():
            right = logits[name].argmax(-1)[known] == labels[name][known]
            accuracy[name] = round(right.float().mean().item(), 4)
    return accuracy


# ---- stage 2: alignment --------------------------------------------------------------------------------


def make_processor(tokenizer: Any, settings: VisionBuildSettings) -> LlavaProcessor:
    """A LlavaProcessor for the built model: 64 px CLIP-normalised pictures, `<image>` expanded to one
    token per patch (the CLS feature is dropped)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = settings.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=settings.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=tokenizer.chat_template,
    )


def processor_for(base_dir: str, settings: VisionBuildSettings | None = None) -> LlavaProcessor:
    """The built model's processor, made from the language model's tokenizer alone (no build needed)."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    add_image_token(tokenizer)
    return make_processor(tokenizer, settings or VisionBuildSettings())


def add_image_token(tokenizer: Any) -> None:
    """Add `<image>` as a special token (kept whole by the tokenizer; other special tokens untouched)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)


def assemble_llava(
    language_model: nn.Module, tokenizer: Any, encoder: CLIPVisionModel, settings: VisionBuildSettings
) -> LlavaForConditionalGeneration:
    """A LLaVA whose language model and LM head are `language_model`'s (embeddings grown by the `<image>`
    token), whose vision tower is `encoder`, and whose projector is new."""
    text_config = language_model.config
    add_image_token(tokenizer)
    language_model.resize_token_embeddings(len(tokenizer))
    config = LlavaConfig(
        vision_config=encoder.config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=settings.image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(settings.seed + 1)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.model.vision_tower.load_state_dict(encoder.state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def alignment_example(example: Example, rng: random.Random) -> Example:
    """The caption conversation of one build picture (the task's own question and answer are dropped)."""
    messages = [
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{rng.choice(ALIGN_PROMPTS)}"},
        {"role": "assistant", "content": caption(example.meta["shapes"])},
    ]
    return replace(example, messages=messages, system=SYSTEM)


def _caption_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], settings: VisionBuildSettings
) -> torch.Tensor:
    with _autocast(settings):
        return model(**batch).loss.float()


def align(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    examples: list[Example],
    settings: VisionBuildSettings,
) -> dict[str, float]:
    """Stage 2: train the projector (and the encoder at `align_encoder_lr`) on captions with the language
    model frozen; returns the caption loss on held-out pictures before and after."""
    tokenizer = processor.tokenizer
    rng = random.Random(settings.seed + 2)
    features = [
        encode_example(tokenizer, alignment_example(e, rng), 256, processor=processor) for e in examples
    ]
    held = max(1, min(64, len(features) // 10))
    train, held_out = features[:-held], features[-held:]
    pad = tokenizer.pad_token_id
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    projector = list(model.model.multi_modal_projector.parameters())
    encoder = list(model.model.vision_tower.parameters())
    for parameter in projector + encoder:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [
            {"params": projector, "lr": settings.align_lr},
            {"params": encoder, "lr": settings.align_encoder_lr},
        ],
        weight_decay=0.0,
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[settings.align_lr, settings.align_encoder_lr],
        total_steps=settings.align_steps,
        pct_start=0.1,
    )

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [
                _caption_loss(model, collate(held_out[i : i + 16], pad), settings).item()
                for i in range(0, len(held_out), 16)
            ]
        return round(sum(losses) / len(losses), 4)

    before = held_out_loss()
    model.train()
    for _ in tqdm(range(settings.align_steps), desc="alignment", unit="step", leave=False):
        loss = _caption_loss(
            model, collate(rng.sample(train, min(settings.align_batch, len(train))), pad), settings
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector + encoder, 1.0)
        optimizer.step()
        schedule.step()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return {"caption_loss_before": before, "caption_loss_after": held_out_loss()}


# ---- the whole build ---------------------------------------------------------------------------------


def build_visual_model(
    base_dir: str,
    target: str,
    settings: VisionBuildSettings | None = None,
    load_language_model: Callable[[str], tuple[nn.Module, Any]] | None = None,
) -> dict[str, Any]:
    """Build the image-text model from the language model folder `base_dir` into the folder `target`
    (atomically); returns what build.json records."""
    settings = settings or VisionBuildSettings()
    load = load_language_model or _load_language_model
    start = time.perf_counter()
    language_model, tokenizer = load(base_dir)
    language_model.eval()
    processor = make_processor(tokenizer, settings)
    examples = build_scenes(settings)
    scenes = [e.meta["shapes"] for e in examples]
    logger.info("building %s: vision encoder on %d generated pictures", NAME, len(scenes))
    stage = target + f".encoder-{BUILD_VERSION}"  # stage 1's result survives a crash in stage 2
    if os.path.isfile(os.path.join(stage, "encoder.json")):
        encoder = CLIPVisionModel.from_pretrained(stage, local_files_only=True).eval()
        with open(os.path.join(stage, "encoder.json"), encoding="utf-8") as handle:
            saved = json.load(handle)
        accuracy, encoder_seconds = saved["accuracy"], saved["seconds"]
        logger.info("reusing the vision encoder trained earlier in %s", stage)
    else:
        encoder, accuracy = train_encoder(settings, processor.image_processor, scenes)
        encoder_seconds = time.perf_counter() - start
        _save_encoder(encoder, stage, {"accuracy": accuracy, "seconds": round(encoder_seconds, 1)})
    logger.info("vision encoder held-out accuracy: %s", accuracy)
    model = assemble_llava(language_model, tokenizer, encoder, settings)
    processor = make_processor(tokenizer, settings)  # the tokenizer now holds <image>
    losses = align(model, processor, examples, settings)
    logger.info(
        "alignment caption loss %.3f -> %.3f", losses["caption_loss_before"], losses["caption_loss_after"]
    )
    record = {
        "name": NAME,
        "build_version": BUILD_VERSION,
        "settings": asdict(settings),
        "encoder_accuracy": accuracy,
        **losses,
        "encoder_seconds": round(encoder_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    _save(model, processor, target, record)
    shutil.rmtree(stage, ignore_errors=True)
    return record


def _save_encoder(encoder: CLIPVisionModel, stage: str, record: dict[str, Any]) -> None:
    with atomic_directory(stage, prefix=".encoder-") as tmp:
        encoder.save_pretrained(tmp)
        with open(os.path.join(tmp, "encoder.json"), "w", encoding="utf-8") as handle:
            json.dump(record, handle)


def _load_language_model(path: str) -> tuple[nn.Module, Any]:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model, tokenizer


def _save(model: nn.Module, processor: Any, target: str, record: dict[str, Any]) -> None:
    with atomic_directory(target, prefix=".build-") as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "build.json"), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
