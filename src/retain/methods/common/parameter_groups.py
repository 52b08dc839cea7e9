"""The trainable weight matrices of a model, grouped by transformer layer and block.

A group is one linear layer of a decoder layer (q_proj, up_proj, ...) with the weights the optimizer
updates for it: the layer's own weight and bias under full fine-tuning, its trainable LoRA A and B under
LoRA. Groups are sorted by name, so a selection drawn from a seeded generator is the same on every rank
and on resume. Methods that act per layer (HFT's half freezing, OSFT's subspace constraint) share this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft.tuners.lora import LoraLayer
from torch import nn

from retain.models.adapters import unwrap

# "model.layers.3.self_attn.q_proj": the layer is "model.layers.3", the block the path after it.
_LAYER = re.compile(r"^(.*?\.\d+)\.(.+)$")
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass
class Group:
    """One linear layer of a decoder layer and its trainable weights."""

    layer: str  # the decoder layer's path, e.g. "model.layers.3"
    block: str  # "attention" or "feed_forward"
    name: str  # the linear layer's path, e.g. "model.layers.3.self_attn.q_proj"
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)

    @property
    def short(self) -> str:
        """The linear layer's name within its layer, e.g. "self_attn.q_proj"."""
        return self.name[len(self.layer) + 1 :]

    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


def _owner(name: str) -> tuple[str, str] | None:
    """(layer, block) of a linear layer inside a numbered layer, or None (LM head, projector, ...)."""
    match = _LAYER.match(name)
    if match is None:
        return None
    return match.group(1), "attention" if _ATTENTION.search(match.group(2)) else "feed_forward"


_LORA_FACTOR = re.compile(r"\.lora_[AB]\.[^.]+\.weight$")


def linear_of(param_name: str) -> tuple[str, str, str] | None:
    """(layer, block, linear layer) of a parameter of a block's linear layer (its weight, or a LoRA factor),
    from the name alone: how the dry run's estimates group the block matrices without a model."""
    module = _LORA_FACTOR.sub("", param_name)
    if module == param_name:
        module = param_name.rsplit(".", 1)[0]
    owner = _owner(module)
    return None if owner is None else (*owner, module)


def block_linears(
    names: list[str], shapes: list[tuple[int, int]]
) -> list[tuple[tuple[str, str, str], tuple[int, int]]] | None:
    """Each named block matrix (RunSizes.block_matrix_names, .block_matrices) with its (layer, block, linear
    layer); None when the names are missing or one is outside a block's linear layers."""
    if not names or len(names) != len(shapes):
        return None
    linears = [linear_of(name) for name in names]
    if any(linear is None for linear in linears):
        return None
    return list(zip(linears, shapes, strict=True))


def layer_groups(model: nn.Module) -> list[Group]:
    """Every linear layer inside a numbered (decoder) layer that has trainable weights, sorted by name.

    With LoRA, a group's weights are the trainable lora_A and lora_B of the wrapped layer; otherwise the
    nn.Linear's trainable weight and bias. Linear layers outside numbered layers (the LM head) are left
    out: they are not part of any layer's attention or feed-forward block.
    """
    inner = unwrap(model)
    modules = dict(inner.named_modules())
    lora = {n: m for n, m in modules.items() if isinstance(m, LoraLayer)}
    groups = []
    for name, module in sorted(lora.items() if lora else modules.items()):
        if not lora and not isinstance(module, nn.Linear):
            continue
        owner = _owner(name)
        if owner is None:
            continue
        if lora:
            params = [
                (f"{name}.{part}.{adapter}.weight", sub.weight)
                for part in ("lora_A", "lora_B")
                for adapter, sub in sorted(getattr(module, part).items())
                if isinstance(sub, nn.Linear) and sub.weight.requires_grad
            ]
        else:
            params = [
                (f"{name}.{n}", p) for n, p in module.named_parameters(recurse=False) if p.requires_grad
            ]
        if params:
            groups.append(Group(layer=owner[0], block=owner[1], name=name, params=params))
    return groups


def other_trainable(model: nn.Module, groups: list[Group]) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters in no group (embeddings, norms, LM head, an image-text projector)."""
    grouped = {id(p) for g in groups for _, p in g.params}
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad and id(p) not in grouped]
