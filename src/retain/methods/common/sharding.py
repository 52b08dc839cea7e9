"""Full gradients and parameters of trainable tensors, whatever the training strategy splits them into.

Methods that read or change gradients and parameters (EWC's Fisher, GEM / A-GEM projections, MIGU's masks,
LCIA's DEMA, I-LoRA's EMA) need the whole tensor, but a sharding strategy leaves each process a piece:
- plain tensors (one process, DDP, DeepSpeed ZeRO-0, FSDP's no_shard): the tensor is whole; the helpers
  return it as it is and communicate nothing.
- FSDP2 (`torch.distributed.fsdp.fully_shard`, what accelerate's fsdp_version 2 applies): parameters and
  their `.grad` are DTensors sharded on dim 0 (torch.distributed.tensor); `DTensor.full_tensor()`
  all-gathers the whole value, and a whole value goes back as this rank's shard with
  `distribute_tensor(..., src_data_rank=None)` (each rank slices its own copy, no communication).
- DeepSpeed ZeRO (when `deepspeed` is importable): `deepspeed.utils.safe_get_full_grad` /
  `safe_set_full_grad` / `safe_get_full_fp32_param` / `safe_set_full_fp32_param`, DeepSpeed's documented
  accessors for partitioned gradients and parameters ("Debugging" in the DeepSpeed ZeRO docs). Not run
  here (no DeepSpeed in this environment); methods that would rely on it refuse DeepSpeed strategies.

Every gathering call is a collective: all ranks must call it for the same tensors in the same order.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from types import ModuleType

import torch

try:  # torch >= 2.4; DTensor is what FSDP2 shards parameters into
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
except ImportError:  # pragma: no cover - older torch: nothing can be a DTensor
    DTensor = None  # type: ignore[assignment,misc]


def _is_dtensor(tensor: torch.Tensor | None) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


@functools.cache
def _deepspeed_utils() -> ModuleType | None:
    """deepspeed.utils, or None when DeepSpeed is not installed (imported once, on first use)."""
    try:
        import deepspeed.utils as utils
    except ImportError:
        return None
    return utils


def _deepspeed_managed(param: torch.Tensor) -> bool:
    """Whether DeepSpeed partitions this parameter (ZeRO-3: `ds_id`) or its gradient and optimizer state
    (ZeRO-1/2 keep a `_hp_mapping` to the fp32 partition)."""
    if not (hasattr(param, "ds_id") or getattr(param, "_hp_mapping", None) is not None):
        return False
    return _deepspeed_utils() is not None


def is_sharded(param: torch.Tensor) -> bool:
    """Whether `param` (or its gradient) is split over processes, so reading it needs these helpers."""
    if _is_dtensor(param):
        return any(not isinstance(p, Replicate) for p in param.placements)
    return _deepspeed_managed(param)


def full_gradient(param: torch.Tensor) -> torch.Tensor | None:
    """The whole gradient of `param` (None if it has none): all-gathered from the shards under FSDP2,
    assembled by DeepSpeed under ZeRO; `.grad` itself otherwise. Collective when sharded."""
    if _is_dtensor(param.grad):
        return param.grad.full_tensor()
    if param.grad is None and _deepspeed_managed(param):
        return _deepspeed_utils().safe_get_full_grad(param)
    return param.grad


def full_gradients(params: Iterable[torch.Tensor]) -> list[torch.Tensor | None]:
    """`full_gradient` of each parameter, in order."""
    return [full_gradient(p) for p in params]


def set_full_gradient(param: torch.Tensor, full: torch.Tensor) -> None:
    """Make `full` (the whole gradient, the same on every rank) the gradient of `param`: this rank keeps
    its shard under FSDP2, DeepSpeed scatters it under ZeRO; written in place otherwise."""
    grad = param.grad
    if _is_dtensor(grad):
        local = distribute_tensor(full.to(grad.dtype), grad.device_mesh, grad.placements, src_data_rank=None)
        grad.to_local().copy_(local.to_local())
    elif grad is None and _deepspeed_managed(param):
        _deepspeed_utils().safe_set_full_grad(param, full)
    elif grad is None:
        param.grad = full.detach().to(param.dtype).clone()
    else:
        grad.copy_(full)


def full_parameter(param: torch.Tensor) -> torch.Tensor:
    """The whole value of `param`, detached: all-gathered under FSDP2, DeepSpeed's fp32 copy under ZeRO-3;
    the parameter itself (detached, no copy) otherwise. Collective when sharded."""
    if _is_dtensor(param):
        return param.detach().full_tensor()
    if hasattr(param, "ds_id") and _deepspeed_managed(param):
        return _deepspeed_utils().safe_get_full_fp32_param(param)
    return param.detach()


def full_parameters(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """`full_parameter` of each parameter, in order."""
    return [full_parameter(p) for p in params]


@torch.no_grad()
def set_full_parameter(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole value `full` (the same on every rank) into `param`, each rank into its own shard."""
    if _is_dtensor(param):
        local = distribute_tensor(
            full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
        param.to_local().copy_(local.to_local())
    elif hasattr(param, "ds_id") and _deepspeed_managed(param):
        _deepspeed_utils().safe_set_full_fp32_param(param, full)
    else:
        param.copy_(full.to(param.dtype))


# Reasons shared by the methods' refused_strategies (methods/base.py), each completing
# "<method> is refused under <strategy>: ...".
DEEPSPEED_GRADIENTS = (
    "no run has checked this method under DeepSpeed, and it reads and changes "
    "each step's gradient, which DeepSpeed keeps in its own buffers (partitioned from ZeRO-1 on), not in "
    "param.grad"
)
DEEPSPEED_UNVERIFIED = "no run has checked this method's state under DeepSpeed"
EXTRA_BACKWARD_SHARDED = (
    "it takes extra gradients with torch.autograd.grad outside the Trainer's backward, which FSDP's and "
    "ZeRO-3's gather and reduce-scatter hooks do not serve"
)
