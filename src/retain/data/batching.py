"""Batches of encoded examples: left padding, the single ignore label, the dataset wrapper.

Batches are left-padded so that every example's response ends in the last column: the training
forward (retain.models.forward) then applies the LM head to one final window of positions only.

An example of an image-text model also holds its processor's image inputs (retain.data.encode): per-token
ones (PER_TOKEN_KEYS, as long as input_ids) are left-padded with 0 like the ids, per-image ones
(pixel_values, image_sizes, image_grid_thw, ...) are concatenated along dim 0 in example order, which is
the order the model reads the image tokens of the batch in.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100  # the label of a position that is not learned (PyTorch's cross-entropy default)
# Image inputs with one value per token (Qwen2-VL's mm_token_type_ids: 1 on image tokens); every other
# key beside the text ones is per image.
PER_TOKEN_KEYS = ("mm_token_type_ids",)
TEXT_KEYS = ("input_ids", "labels", "attention_mask")


def image_batch(features: list[dict[str, Any]], length: int) -> dict[str, torch.Tensor]:
    """The image inputs of left-padded examples (`length` columns): per-token keys left-padded with 0,
    per-image keys concatenated along dim 0 in example order; empty when no example has images."""
    keys = dict.fromkeys(key for f in features for key in f if key not in TEXT_KEYS)
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        if key in PER_TOKEN_KEYS:
            values = torch.zeros((len(features), length), dtype=torch.long)
            for i, f in enumerate(features):
                if key in f:
                    value = torch.as_tensor(f[key], dtype=torch.long)
                    values[i, length - len(value) :] = value
            batch[key] = values
        else:
            batch[key] = torch.cat([torch.as_tensor(f[key]) for f in features if key in f], dim=0)
    return batch


def collate(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad input_ids/labels/attention_mask, derive position_ids that skip the padding, and batch
    the image inputs of image examples (`image_batch`)."""
    length = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(features), length), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, length - n :] = torch.tensor(f["input_ids"])
        labels[i, length - n :] = torch.tensor(f["labels"])
        attention[i, length - n :] = 1
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention,
        "position_ids": position_ids,
        **image_batch(features, length),
    }


class FeatureDataset(torch.utils.data.Dataset):
    """A list of encoded examples."""

    def __init__(self, features: list[dict[str, Any]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]
