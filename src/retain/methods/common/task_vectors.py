"""Task vectors and the edits built on them: LiNeS layer-increasing scaling and model merging.

A task vector is what fine-tuning added to the pre-trained weights, tau = theta_t - theta_0 (Ilharco et
al., 2023). For a LoRA adapter it is, per adapted linear layer, Delta W = s B A (PEFT's
`get_delta_weight`); for full fine-tuning it is the difference of the weights. Vectors here are dicts
name -> fp32 tensor (the module name for LoRA, the parameter name for full fine-tuning).

- LiNeS (Wang et al., ICLR 2025; reference wang-kee/LiNeS `LiNeS_scaling`): lambda(l) = alpha +
  beta * l / (L - 1) for a parameter of block l of L, alpha for parameters outside the blocks. On a LoRA
  adapter scaling B by lambda(l) scales its Delta W exactly.
- Task arithmetic: tau = lam * sum_t w_t tau_t.
- TIES (Yadav et al., 2023; reference `ties_merging`): trim each tau_t to its top-`density` magnitudes
  over the whole vector, elect per entry the sign of the sum of the trimmed vectors (an entry whose sum is
  0 takes the sign of the sum of all elected signs), and average the trimmed entries that agree with it.
- DARE (Yu et al., 2024, "Language Models are Super Mario"): drop each entry with probability p, rescale
  the survivors by 1 / (1 - p); then sum (dare_linear) or TIES sign election and disjoint mean
  (dare_ties), as PEFT's `dare_linear` / `dare_ties`.

Merged LoRA vectors are written back as one adapter. Task arithmetic uses PEFT's
`add_weighted_adapter(combination_type="cat")`, which is exact (the rank is the sum of the ranks).
TIES and DARE are computed on the dense Delta W: PEFT's `ties` / `dare_*` merge the A and B factors
separately, which is not the merge of the products, and its `*_svd` variants trim within each tensor
rather than over the whole vector as the reference does. Their result is stored exactly as a LoRA of rank
min(out, in) (B = I, A = Delta W or B = Delta W, A = I), so the evaluated model is the merged weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from retain.errors import RetainError
from retain.models.adapters import peft_model, unwrap

Vector = dict[str, torch.Tensor]
MergeHow = Literal["task_arithmetic", "ties", "dare_linear", "dare_ties"]
MERGE_HOWS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")

_BLOCK = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")
_ANY_INDEX = re.compile(r"\.(\d+)\.")


# --- extraction -----------------------------------------------------------------------------------------


def lora_layers(model: nn.Module, adapter: str) -> dict[str, LoraLayer]:
    """Module name -> LoRA layer of every linear layer that holds `adapter`."""
    inner = peft_model(model)
    return {
        name: module
        for name, module in inner.named_modules()
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {})
    }


def lora_task_vector(model: nn.Module, adapter: str) -> Vector:
    """Delta W = s B A of every layer `adapter` adapts, fp32, by module name."""
    layers = lora_layers(model, adapter)
    if not layers:
        raise RetainError(f"the model has no LoRA adapter named '{adapter}'")
    with torch.no_grad():
        return {name: layer.get_delta_weight(adapter).detach().float() for name, layer in layers.items()}


def full_task_vector(model: nn.Module, base: Mapping[str, torch.Tensor]) -> Vector:
    """theta - theta_0 for every parameter in `base` (a snapshot of the pre-trained weights)."""
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        return {n: params[n].detach().float() - b.to(params[n].device).float() for n, b in base.items()}


# --- LiNeS ----------------------------------------------------------------------------------------------


def block_index(name: str) -> int | None:
    """The transformer block a parameter or module belongs to (".layers.<l>." and similar), else None."""
    match = _BLOCK.search(name) or _ANY_INDEX.search(name)
    return int(match.group(1)) if match else None


def num_blocks(model: nn.Module) -> int:
    """L, the number of transformer blocks (the language model's, for an image-text model)."""
    config = getattr(unwrap(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise RetainError("LiNeS needs the model's number of layers (config.num_hidden_layers)")
    return count


def lines_factor(name: str, blocks: int, alpha: float, beta: float) -> float:
    """lambda = alpha + beta * l / (L - 1) for block l of L (l / 1 when L = 1); alpha outside blocks."""
    index = block_index(name)
    if index is None:
        return alpha
    if index >= blocks:
        raise RetainError(f"LiNeS: '{name}' is in block {index}, but the model has {blocks} blocks")
    return alpha + beta * index / max(blocks - 1, 1)


def lines_scale_vector(vector: Mapping[str, torch.Tensor], blocks: int, alpha: float, beta: float) -> Vector:
    """The LiNeS-scaled task vector (a new dict)."""
    return {name: value * lines_factor(name, blocks, alpha, beta) for name, value in vector.items()}


@torch.no_grad()
def lines_scale_lora(
    model: nn.Module, adapters: Sequence[str], alpha: float, beta: float
) -> dict[str, float]:
    """Scale each adapter's B of block l by lambda(l), in place, which scales its Delta W exactly.

    Returns module name -> factor (for logging and tests)."""
    blocks = num_blocks(model)
    factors: dict[str, float] = {}
    for adapter in adapters:
        for name, layer in lora_layers(model, adapter).items():
            factor = lines_factor(name, blocks, alpha, beta)
            layer.lora_B[adapter].weight.mul_(factor)
            factors[name] = factor
    return factors


@torch.no_grad()
def lines_scale_full(
    model: nn.Module, base: Mapping[str, torch.Tensor], alpha: float, beta: float
) -> dict[str, float]:
    """theta <- theta_0 + lambda(l) (theta - theta_0) for every parameter in `base`, in place."""
    blocks = num_blocks(model)
    params = dict(unwrap(model).named_parameters())
    factors = {}
    for name, theta0 in base.items():
        param = params[name]
        factor = lines_factor(name, blocks, alpha, beta)
        start = theta0.to(param.device, torch.float32)
        param.copy_((start + factor * (param.float() - start)).to(param.dtype))
        factors[name] = factor
    return factors


# --- merging --------------------------------------------------------------------------------------------


def _check_same_keys(vectors: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    if not vectors:
        raise RetainError("merging needs at least one task vector")
    keys = list(vectors[0])
    for i, vector in enumerate(vectors[1:], 2):
        if set(vector) != set(keys):
            raise RetainError(
                f"task vector {i} covers other layers than task vector 1: they cannot be merged"
            )
    return keys


def _flat(vectors: Sequence[Mapping[str, torch.Tensor]], keys: list[str]) -> torch.Tensor:
    """(T, d): one row per task, the tensors in `keys` order."""
    return torch.stack([torch.cat([v[k].reshape(-1).float() for k in keys]) for v in vectors])


def _unflat(flat: torch.Tensor, like: Mapping[str, torch.Tensor], keys: list[str]) -> Vector:
    out, start = {}, 0
    for key in keys:
        size = like[key].numel()
        out[key] = flat[start : start + size].reshape(like[key].shape).clone()
        start += size
    return out


def trim_top_k(flat: torch.Tensor, density: float) -> torch.Tensor:
    """Keep, in each row, the k = int(d * density) entries of largest magnitude (at least 1; entries tied
    with the k-th are kept too); the rest become 0. The reference `topk_values_mask` thresholds at the
    (d - k)-th smallest magnitude, which keeps one entry more than k: negligible for a model's d."""
    if not 0.0 < density <= 1.0:
        raise RetainError(f"TIES density must be in (0, 1], got {density}")
    d = flat.shape[1]
    keep = max(int(d * density), 1)
    if keep >= d:
        return flat.clone()
    # the k-th largest magnitude is the (d - k + 1)-th smallest
    threshold = flat.abs().kthvalue(d - keep + 1, dim=1, keepdim=True).values
    return flat * (flat.abs() >= threshold)


def elect_sign(flat: torch.Tensor) -> torch.Tensor:
    """sign(sum over tasks) per entry; an entry whose sum is 0 takes the majority (the sign of the sum of
    the elected signs), as the reference `resolve_sign`."""
    signs = torch.sign(flat.sum(dim=0))
    majority = torch.sign(signs.sum())
    return torch.where(signs == 0, majority if majority != 0 else torch.ones_like(majority), signs)


def disjoint_mean(flat: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Mean, per entry, of the non-zero values whose sign agrees with the elected one (0 if none)."""
    agree = torch.where(signs > 0, flat > 0, flat < 0)
    selected = flat * agree
    count = agree.sum(dim=0).float()
    return selected.sum(dim=0) / count.clamp(min=1.0)


def dare(flat: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability p and rescale the rest by 1 / (1 - p) (seeded: same on resume)."""
    if not 0.0 <= drop_rate < 1.0:
        raise RetainError(f"DARE drop_rate must be in [0, 1), got {drop_rate}")
    keep = torch.rand(flat.shape, generator=generator) >= drop_rate
    return flat * keep.to(flat.device) / (1.0 - drop_rate)


def merge_task_vectors(
    vectors: Sequence[Mapping[str, torch.Tensor]],
    how: MergeHow,
    *,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
    density: float = 0.2,
    drop_rate: float = 0.5,
    seed: int = 0,
) -> Vector:
    """lam * merge(w_1 tau_1, ..., w_T tau_T) by `how` (module docstring); dense, fp32."""
    keys = _check_same_keys(vectors)
    weights = [1.0] * len(vectors) if weights is None else list(weights)
    if len(weights) != len(vectors):
        raise RetainError(
            f"merging {len(vectors)} task vectors needs {len(vectors)} weights, got {len(weights)}"
        )
    flat = _flat(vectors, keys) * torch.tensor(weights, dtype=torch.float32).unsqueeze(1)
    if how == "task_arithmetic":
        merged = flat.sum(dim=0)
    elif how == "ties":
        trimmed = trim_top_k(flat, density)
        merged = disjoint_mean(trimmed, elect_sign(trimmed))
    elif how in ("dare_linear", "dare_ties"):
        dropped = dare(flat, drop_rate, torch.Generator().manual_seed(seed))
        merged = dropped.sum(dim=0) if how == "dare_linear" else disjoint_mean(dropped, elect_sign(dropped))
    else:
        raise RetainError(f"unknown merge '{how}'; use one of {', '.join(MERGE_HOWS)}")
    return _unflat(lam * merged, vectors[0], keys)


# --- writing a merged vector as an adapter --------------------------------------------------------------


def _delete(inner: nn.Module, name: str) -> None:
    """Delete adapter `name` if present, keeping the other adapters' activity and trainability."""
    if name not in inner.peft_config:
        return
    flags = {n: p.requires_grad for n, p in inner.named_parameters()}
    active = [a for a in inner.active_adapters if a != name] or [
        next(a for a in inner.peft_config if a != name)
    ]
    inner.base_model.set_adapter(active)  # PEFT warns when the active adapter is deleted
    inner.delete_adapter(name)
    for n, p in inner.named_parameters():
        p.requires_grad_(flags.get(n, False))


def _relative(inner: nn.Module, name: str) -> str:
    """A module name as PEFT's rank_pattern matches it (inside the base model)."""
    return name.removeprefix("base_model.model.")


@torch.no_grad()
def unit_scale_lora_config(like: Any, ranks: dict[str, int], **changes: Any) -> Any:
    """`like` (a PEFT LoraConfig) for an adapter whose factors already hold their scaling: alpha equal to
    the rank everywhere (scaling 1), per-layer ranks from `ranks` (module-name patterns -> rank; the
    largest is the default r), no dropout, no rsLoRA or DoRA, for inference."""
    top = max(ranks.values())
    pattern = {name: rank for name, rank in ranks.items() if rank != top}
    return dataclasses.replace(
        like,
        r=top,
        lora_alpha=top,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        use_rslora=False,
        use_dora=False,
        inference_mode=True,
        **changes,
    )


def add_dense_adapter(model: nn.Module, name: str, vector: Mapping[str, torch.Tensor], like: str) -> None:
    """Add LoRA adapter `name` whose Delta W equals `vector` exactly, on the layers adapter `like` adapts.

    Each layer gets rank min(out, in) and scaling 1: B = I, A = Delta W when out <= in, else
    B = Delta W, A = I; the product is Delta W with no rounding."""
    inner = peft_model(model)
    layers = lora_layers(model, like)
    if set(layers) != set(vector):
        raise RetainError(f"the merged vector does not cover the layers of adapter '{like}'")
    ranks = {re.escape(_relative(inner, n)): min(vector[n].shape) for n in layers}
    config = unit_scale_lora_config(inner.peft_config[like], ranks)
    _delete(inner, name)
    inner.add_adapter(name, config)
    for module_name, layer in lora_layers(model, name).items():
        delta = vector[module_name]
        out_features, in_features = delta.shape
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if out_features <= in_features:
            b.copy_(torch.eye(out_features, dtype=b.dtype))
            a.copy_(delta.to(a.dtype))
        else:
            a.copy_(torch.eye(in_features, dtype=a.dtype))
            b.copy_(delta.to(b.dtype))
        if layer.scaling[name] != 1.0:
            raise RetainError(f"internal: merged adapter scaling is {layer.scaling[name]}, not 1")
    for param in (p for n, p in inner.named_parameters() if f".{name}." in n):
        param.requires_grad_(False)


def merge_adapters(
    model: nn.Module,
    adapters: Sequence[str],
    how: MergeHow,
    name: str = "merged",
    *,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
    density: float = 0.2,
    drop_rate: float = 0.5,
    seed: int = 0,
) -> None:
    """Add adapter `name` = the merge of `adapters`' task vectors; it is left inactive and frozen."""
    inner = peft_model(model)
    missing = [a for a in adapters if a not in inner.peft_config]
    if missing:
        raise RetainError(
            f"the model has no adapter {', '.join(missing)} (it has {', '.join(inner.peft_config)})"
        )
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise RetainError(
            f"merging {len(adapters)} adapters needs {len(adapters)} weights, got {len(weights)}"
        )
    _delete(inner, name)
    if how == "task_arithmetic":
        # Exact: the adapters' A (times weight and scaling) and B are concatenated, rank = sum of ranks.
        inner.add_weighted_adapter(list(adapters), [lam * w for w in weights], name, combination_type="cat")
        for param in (p for n, p in inner.named_parameters() if f".{name}." in n):
            param.requires_grad_(False)
        return
    vectors = [lora_task_vector(model, a) for a in adapters]
    merged = merge_task_vectors(
        vectors, how, weights=weights, lam=lam, density=density, drop_rate=drop_rate, seed=seed
    )
    add_dense_adapter(model, name, merged, like=adapters[0])


def save_adapter(model: nn.Module, name: str, path: str) -> None:
    """Write adapter `name` as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors),
    loadable with `PeftModel.from_pretrained(base_model, path)`."""
    import os

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    inner = peft_model(model)
    os.makedirs(path, exist_ok=True)
    config = dataclasses.replace(inner.peft_config[name], inference_mode=True)
    config.save_pretrained(path)
    state = get_peft_model_state_dict(inner, adapter_name=name)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        os.path.join(path, "adapter_model.safetensors"),
    )
