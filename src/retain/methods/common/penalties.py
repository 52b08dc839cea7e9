"""Penalties on LoRA adapters: the overlap of a new adapter's input subspace with earlier ones (O-LoRA,
ABSCL) and the norms that keep an adapter small."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from retain.errors import RetainError
from retain.models.adapters import adapter_state, unwrap


def lora_a_overlap_pairs(
    model: nn.Module, reference: list[str], new: str
) -> list[tuple[list[torch.Tensor], nn.Parameter]]:
    """Per LoRA layer holding `new`: (the `reference` adapters' A matrices, detached; the new adapter's A).

    The references are detached views of the parameters, so they follow in-place updates (a reference
    adapter that keeps training) without carrying gradient. Build the pairs once per task and pass them
    to `a_overlap_l1` every step: the model is scanned here only.
    """
    pairs = []
    for module in unwrap(model).modules():
        if isinstance(module, LoraLayer) and new in module.lora_A:
            refs = [module.lora_A[r].weight.detach() for r in reference if r != new and r in module.lora_A]
            if refs:
                pairs.append((refs, module.lora_A[new].weight))
    return pairs


def a_overlap_l1(pairs: list[tuple[list[torch.Tensor], nn.Parameter]]) -> torch.Tensor:
    """sum over layers and reference adapters of |A_ref A_new^T|_1 (O-LoRA's orthogonality term), in fp32.

    Computed with autocast off: the term is small to compute and its scale is what users tune.
    """
    if not pairs:
        raise RetainError("a_overlap_l1: no LoRA layer holds both the new adapter and a reference one")
    with torch.autocast(pairs[0][1].device.type, enabled=False):
        total = torch.zeros((), device=pairs[0][1].device)
        for refs, new in pairs:
            new32 = new.float()
            for ref in refs:
                total = total + torch.mm(ref.float(), new32.T).abs().sum()
    return total


def norm_of(params: list[torch.Tensor], squared: bool = False) -> torch.Tensor:
    """sum over the tensors of their Frobenius norm (squared: of their sum of squares), in fp32."""
    if not params:
        raise RetainError("norm_of: no parameters")
    if squared:
        return sum(p.float().pow(2).sum() for p in params)
    return sum(p.float().norm() for p in params)


def adapter_norm(model: nn.Module, name: str, squared: bool = False) -> torch.Tensor:
    """sum over adapter `name`'s A and B matrices of their Frobenius norms (squared: sums of squares).

    Scans the model; per-step callers keep `list(adapter_state(model, name).values())` and use `norm_of`.
    """
    return norm_of(list(adapter_state(model, name).values()), squared)
