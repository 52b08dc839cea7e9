"""Batches of encoded examples: left padding, the single ignore label, the dataset wrapper.

Batches are left-padded so that every example's response ends in the last column: the training
forward (retain.models.forward) then applies the LM head to one final window of positions only.

An example of an image-text model also holds its processor's image inputs (retain.data.encode): per-token
ones (PER_TOKEN_KEYS, as long as input_ids) are left-padded with 0 like the ids, per-image ones
(pixel_values, image_sizes, image_grid_thw, ...) are concatenated along dim 0 in example order, which is
the order the model reads the image tokens of the batch in. Images of different sizes can give per-image
tensors of different shapes (LLaVA-NeXT splits an image into as many patches as its aspect ratio needs:
pixel_values (images, patches, 3, H, W)); those are zero-padded to the largest before concatenating,
as the processor pads the images of one call, and the model drops the padding using image_sizes.

The per-image inputs of a training example are usually deferred (DEFERRED_IMAGES, an object whose
`load()` returns them): `FeatureDataset` and `collate` compute them, so only a batch's images are in
memory at once.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100  # the label of a position that is not learned (PyTorch's cross-entropy default)
# Image inputs with one value per token (Qwen2-VL's mm_token_type_ids: 1 on image tokens); every other
# key beside the text ones is per image.
PER_TOKEN_KEYS = ("mm_token_type_ids",)
TEXT_KEYS = ("input_ids", "labels", "attention_mask")
# The key of an example's deferred per-image inputs: an object whose load() returns them
# (retain.data.encode.DeferredImages).
DEFERRED_IMAGES = "deferred_images"


def load_images(feature: dict[str, Any]) -> dict[str, Any]:
    """`feature` with its deferred per-image inputs computed (the feature itself when none are deferred)."""
    if DEFERRED_IMAGES not in feature:
        return feature
    loaded = {key: value for key, value in feature.items() if key != DEFERRED_IMAGES}
    return {**loaded, **feature[DEFERRED_IMAGES].load()}


def concat_images(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-image tensors concatenated along dim 0, each first zero-padded at the end of every other dim
    to the largest size (LLaVA-NeXT's images with different patch counts); equal shapes are only
    concatenated."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for tensor in tensors:
        if list(tensor.shape[1:]) != shape:
            grown = tensor.new_zeros((tensor.shape[0], *shape))
            grown[tuple(slice(0, n) for n in tensor.shape)] = tensor
            tensor = grown
        padded.append(tensor)
    return torch.cat(padded, dim=0)


def image_batch(features: list[dict[str, Any]], length: int) -> dict[str, torch.Tensor]:
    """The image inputs of left-padded examples (`length` columns): per-token keys left-padded with 0,
    per-image keys (deferred ones computed now) concatenated along dim 0 in example order
    (`concat_images`); empty when no example has images."""
    features = [load_images(f) for f in features]
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
            batch[key] = concat_images([torch.as_tensor(f[key]) for f in features if key in f])
    return batch


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token lists left-padded to the longest: every sequence ends in the
    last column, where generation continues."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence) :] = 1
    return ids, mask


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
    """A list of encoded examples; an item's deferred images are computed when it is read, so that
    DataLoader workers, when there are any, do it."""

    def __init__(self, features: list[dict[str, Any]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return load_images(self.features[index])
