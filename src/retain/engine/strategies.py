"""What each training strategy (retain.runtime.Strategy) asks of the Trainer, and the whole weights after it.

- `strategy_arguments`: TrainingArguments' `fsdp` / `fsdp_config` / `deepspeed` / `use_cpu` for the
  strategy, from `train.fsdp` / `train.fsdp_config` / `train.deepspeed` or accelerate launch's environment.
- Two fixes for CPU-only hosts, where accelerate (1.16) drops both sharding strategies without a word:
  `promote_cpu_fsdp` (accelerate takes FSDP only for GPU-like process groups, so a CPU run would train
  under DDP) and `fix_cpu_deepspeed` (accelerate sees one process while deepspeed.comm sees the world, so
  DeepSpeed's batch check fails on the "auto" batch sizes HF filled in for one process).
- `full_weights`: a context in which every process holds every parameter whole (FSDP2 unshard, DeepSpeed
  ZeRO-3 GatheredParameters), for writing a checkpoint or loading one.

Only FSDP2 (torch's `fully_shard`, accelerate's fsdp_version 2) runs on CPU: FSDP1 refuses CPU parameters
("sync_module_states=True is not supported on cpu", then "Inconsistent compute device and device_id").
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from retain.errors import RetainError
from retain.runtime import Strategy

# retain's FSDP default: FSDP2, which also runs on CPU; a user's fsdp_config file overrides any key.
DEFAULT_FSDP_CONFIG: dict[str, Any] = {"fsdp_version": 2, "reshard_after_forward": True}
DEFAULT_FSDP = "full_shard auto_wrap"


def _read_fsdp_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)  # YAML reads JSON too
    except OSError as exc:
        raise RetainError(f"config: train.fsdp_config {path} cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise RetainError(f"config: train.fsdp_config {path} is neither JSON nor YAML ({exc})") from None
    if not isinstance(data, dict):
        raise RetainError(f"config: train.fsdp_config {path} must hold a mapping of fsdp_config keys")
    return data


def _accelerate_deepspeed(env: Mapping[str, str]) -> dict[str, Any]:
    """accelerate launch's DeepSpeed settings as a DeepSpeed config: its config file, or a ZeRO section
    built from ACCELERATE_DEEPSPEED_ZERO_STAGE and the offload devices ("auto" batch sizes: HF fills them)."""
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path and path.lower() != "none":
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    zero: dict[str, Any] = {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0"))}
    for key in ("offload_optimizer", "offload_param"):
        device = env.get(f"ACCELERATE_DEEPSPEED_{key.upper()}_DEVICE", "none").lower()
        if device not in ("none", ""):
            zero[key] = {"device": device}
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }


def deepspeed_config(train, env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The DeepSpeed config a run trains under: `train.deepspeed`'s JSON, else accelerate launch's.

    On a host without a GPU DeepSpeed runs on its CPU accelerator; unless the file says otherwise, the
    optimizer then stays the Trainer's torch AdamW (`zero_force_ds_cpu_optimizer: false`), since
    DeepSpeedCPUAdam would be compiled with a C++ toolchain first."""
    if train.deepspeed:
        with open(train.deepspeed, encoding="utf-8") as handle:
            config = json.load(handle)
    else:
        config = _accelerate_deepspeed(env)
    if not torch.cuda.is_available():
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


def strategy_arguments(train, strategy: Strategy, env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """TrainingArguments keywords for `strategy` (`train`: the run's TrainConfig)."""
    cuda = torch.cuda.is_available()
    if strategy.zero_stage is not None:
        if not cuda:
            # DeepSpeed picks its accelerator when first imported; on a CPU host that is its CPU one.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # use_cpu would make accelerate drop DeepSpeed (it never pairs DeepSpeed with cpu=True).
        return {"deepspeed": deepspeed_config(train, env), "use_cpu": False}
    arguments: dict[str, Any] = {"use_cpu": not cuda}
    if strategy.name == "fsdp" and train.fsdp.strip():
        fsdp_config = dict(DEFAULT_FSDP_CONFIG)
        if train.fsdp_config:
            fsdp_config.update(_read_fsdp_config(train.fsdp_config))
        arguments.update(fsdp=train.fsdp, fsdp_config=fsdp_config)
    # FSDP from accelerate launch (ACCELERATE_USE_FSDP, no train.fsdp): accelerate reads its environment.
    return arguments


def fix_cpu_deepspeed(args) -> None:
    """Under DeepSpeed on a CPU host, make accelerate's process state and HF's DeepSpeed config count every
    process (no-op elsewhere).

    accelerate's PartialState finds no accelerator backend and records one process, while deepspeed.comm
    joined all of them: HF then fills DeepSpeed's "auto" train_batch_size for one process and DeepSpeed
    refuses it ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size").
    The state takes the process group's numbers, and HF's DeepSpeed config and accelerate's plugin are
    rebuilt from the original settings under them."""
    state = args.distributed_state
    if torch.cuda.is_available() or not args.deepspeed or not dist.is_initialized():
        return
    if state.num_processes == dist.get_world_size():
        return
    from accelerate.utils import DeepSpeedPlugin, DistributedType
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    state.num_processes = dist.get_world_size()
    state.process_index = dist.get_rank()
    state.local_process_index = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    state.distributed_type = DistributedType.DEEPSPEED
    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(copy.deepcopy(args.deepspeed))
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)
    args.deepspeed_plugin.set_mixed_precision(args.mixed_precision)
    args.deepspeed_plugin.set_deepspeed_weakref()


def promote_cpu_fsdp(trainer) -> None:
    """Make the Trainer's accelerator shard with FSDP on a CPU host when FSDP was asked for (no-op
    elsewhere). accelerate 1.16 sets DistributedType.FSDP only for GPU-like process groups: on MULTI_CPU it
    keeps DDP, with no warning, and the run would train unsharded."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin_args = trainer.args.fsdp_plugin_args
    from_env = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if plugin_args is None and not from_env:
        return
    plugin = FullyShardedDataParallelPlugin(**(plugin_args or {}))
    if plugin.fsdp_version != 2:
        raise RetainError(
            "FSDP on a CPU-only machine runs as FSDP2 only (torch's FSDP1 refuses CPU parameters); set "
            "fsdp_version: 2 in train.fsdp_config (retain's default) or in the accelerate config"
        )
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def _dtensor_parameters(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(module, name, parameter) for every parameter FSDP2 holds as a DTensor shard."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return []
    return [
        (module, name, param)
        for module in model.modules()
        for name, param in module._parameters.items()
        if isinstance(param, DTensor)
    ]


def _zero3_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are split over processes (FSDP2, DeepSpeed ZeRO-3) right now."""
    return bool(_dtensor_parameters(model) or _zero3_parameters(model))


@contextlib.contextmanager
def full_weights(model: nn.Module, *, write: bool = False) -> Iterator[None]:
    """Every parameter whole on every process inside the block; a no-op for an unsharded model.

    Collective: every process enters and leaves it together. FSDP2: each DTensor parameter is replaced by
    its all-gathered whole (`DTensor.full_tensor()`; tied parameters stay tied) and put back on exit, so
    `state_dict()` and `save_pretrained` see plain tensors; what is written inside is lost on exit (the
    shards are the parameters' storage), so `write` is refused. DeepSpeed ZeRO-3:
    `deepspeed.zero.GatheredParameters`; with `write`, rank 0's changes are scattered back on exit.
    """
    fsdp = _dtensor_parameters(model)
    zero3 = _zero3_parameters(model)
    if fsdp and write:
        raise RetainError(
            "loading weights into an FSDP-sharded model is not supported; the run loads checkpoints before "
            "the first task of a session shards the model (a resumed run starts in a new process)"
        )
    if fsdp:
        whole: dict[int, nn.Parameter] = {}
        for module, name, param in fsdp:  # the same order on every process: the gathers pair up
            if id(param) not in whole:
                whole[id(param)] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
            module._parameters[name] = whole[id(param)]
        try:
            yield
        finally:
            for module, name, param in fsdp:
                module._parameters[name] = param
    elif zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if write else None):
            yield
    else:
        yield
