"""Batches of encoded examples: left padding, the single ignore label, the dataset wrapper.

Batches are left-padded so that every example's response ends in the last column: the training
forward (retain.models.forward) then applies the LM head to one final window of positions only.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of a position that is not learned (PyTorch's cross-entropy default)


def collate(features: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad input_ids/labels/attention_mask and derive position_ids that skip the padding."""
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
    }


class FeatureDataset(torch.utils.data.Dataset):
    """A list of encoded examples."""

    def __init__(self, features: list[dict[str, list[int]]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]
