"""Sharded training: FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy``.

``trainer=fsdp`` selects :class:`FSDP2Strategy`; both LightningModules call :func:`shard_module` from their
``configure_model`` hook, which Lightning runs once the process group and device mesh exist. What it does,
and where it differs from DDP:

- **Units.** Every transformer block of the encoder, decoder or classifier (an instance of
  :func:`block_types`: timm ViT / BEiT / Swin blocks, MixMIM and HiViT blocks; a new model registers its
  block class with :func:`register_block_type`) becomes its own ``fully_shard`` unit, then the method's model
  is the root unit (embeddings, heads, norms, tokens). Blocks are found by type, so no method is named here.
- **Frozen parts** (iTPN-CLIP's teacher, the sin-cos position tables, a linear probe's encoder) are passed as
  ``ignored_params``: kept whole on every rank, not sharded, not all-gathered, never in the optimizer; a
  block whose parameters are all frozen is not a unit. The teacher's weights stay out of checkpoints because
  the model's ``state_dict`` hook drops them, which the distributed state dict goes through as well.
- **Same start on every rank.** Before sharding, rank 0's parameters and buffers are broadcast (as DDP does
  when it wraps), so a rank that initialised differently cannot mix shards of two models.
- **Mixed precision.** On the GPU with a bf16 trainer precision, a ``MixedPrecisionPolicy`` keeps fp32 master
  shards, all-gathers bf16 parameters and reduces gradients in fp32; the trainer's bf16 autocast still decides
  the dtype of each op, so the numerics follow DDP's bf16-mixed (only the all-gather bandwidth halves).
- **Activation checkpointing** per block (``activation_checkpointing=true``) uses the composable
  ``torch.distributed._composable.checkpoint``: parameter names and checkpoint keys do not change.
- **CPU offload** (``cpu_offload=true``): sharded parameters, gradients and the optimizer step live in CPU
  memory (``CPUOffloadPolicy``); the optimizer is then not the fused CUDA AdamW.
- **Data parallel size.** Every process holds a different part of the batch, so the data-parallel size is the
  world size (``devices x num_nodes``), which the lr rule counts as with DDP. ``hybrid_shard=true`` shards
  within a node and replicates across nodes (HSDP): less inter-node traffic, more memory per GPU.
  Tensor parallelism is not implemented (the models do not split their layers).
- **Checkpoints** are torch distributed checkpoint folders (``<name>.ckpt/``: one ``__<rank>_0.distcp`` shard
  file per rank, DCP's ``.metadata`` index, and ``meta.pt`` with the loops, callbacks, hyper-parameters and
  config), written to a temporary folder beside the target and renamed onto it only when complete
  (:meth:`FSDP2Strategy.save_checkpoint`). :func:`mim_lightning.checkpoints.sharded.load_sharded` reads one on a single process (export,
  ``finetune pretrained=<folder>``) into the same ``state_dict`` a DDP checkpoint holds.
"""

from __future__ import annotations

import os
import secrets
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from mim_lightning.errors import ConfigError

#: Block classes that become their own FSDP unit (dotted paths, imported lazily).
BLOCK_TYPE_PATHS = [
    "timm.models.vision_transformer.Block",
    "timm.models.beit.Block",
    "timm.models.swin_transformer.SwinTransformerBlock",
    "mim_lightning.models.backbones.mixmim.MixMIMBlock",
    "mim_lightning.models.backbones.hivit.HiViTBlock",
]
MIXED_PRECISION_OPTIONS = ("auto", "bf16", "none")
#: Checkpoint keys holding sharded tensors besides the model and optimizers (written to the shards, not meta.pt).
SHARDED_KEYS = ("ema_state_dict",)


def register_block_type(cls: type | str) -> None:
    """Make ``cls`` (a class or its dotted path) an FSDP unit wherever it appears in a model."""
    path = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    if path not in BLOCK_TYPE_PATHS:
        BLOCK_TYPE_PATHS.append(path)


def block_types() -> tuple[type, ...]:
    import importlib

    classes = []
    for path in BLOCK_TYPE_PATHS:
        module, _, name = path.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    return tuple(classes)


def shard_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of ``model`` that become FSDP units: instances of :func:`block_types` with a trainable
    parameter, outermost first (a block inside another block stays part of the outer one)."""
    types = block_types()
    units: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, types) or any(name.startswith(outer + ".") for outer, _ in units):
            continue
        if any(p.requires_grad for p in module.parameters()):
            units.append((name, module))
    return units


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` for FSDP2 data parallelism, with the sharding options.

    Args:
        data_parallel_size: ``auto`` (every process: ``devices x num_nodes``) or that number; the batch is
            split over these processes and the lr rule counts them (as DDP's world size).
        hybrid_shard: shard within each node and replicate across nodes (HSDP) instead of sharding across all.
        activation_checkpointing: recompute each block's activations in backward (less memory, ~30% slower).
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.
        mixed_precision: ``auto`` (bf16 parameters / fp32 reductions on the GPU when the trainer precision is
            bf16, none otherwise), ``bf16`` or ``none``.
        reshard_after_forward: free the gathered parameters after each unit's forward (ZeRO-3, default) or keep
            them until backward (ZeRO-2-like: faster, more memory). The root unit keeps them either way.
        save_distributed_checkpoint: sharded checkpoint folders (default) or one consolidated file on rank 0.
    """

    strategy_name = "fsdp2"

    def __init__(self, data_parallel_size: str | int = "auto", hybrid_shard: bool = False,
                 activation_checkpointing: bool = False, cpu_offload: bool = False, mixed_precision: str = "auto",
                 reshard_after_forward: bool = True, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout) -> None:
        if mixed_precision not in MIXED_PRECISION_OPTIONS:
            raise ConfigError("trainer.strategy.mixed_precision", mixed_precision, ", ".join(MIXED_PRECISION_OPTIONS))
        if data_parallel_size != "auto" and (isinstance(data_parallel_size, bool)
                                             or not isinstance(data_parallel_size, int) or data_parallel_size < 1):
            raise ConfigError("trainer.strategy.data_parallel_size", data_parallel_size,
                              "auto or the number of processes (devices x num_nodes)")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.hybrid_shard = bool(hybrid_shard)
        self.activation_checkpointing = bool(activation_checkpointing)
        self.cpu_offload = bool(cpu_offload)
        self.mixed_precision = mixed_precision
        self.reshard_after_forward = bool(reshard_after_forward)
        self.shard_mesh = None

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        if self._data_parallel_size == "auto":
            self._data_parallel_size = world
        elif self._data_parallel_size != world:
            raise ConfigError("trainer.strategy.data_parallel_size", self._data_parallel_size,
                              f"auto or {world} (devices x num_nodes)",
                              "every process trains on its own part of the batch; tensor parallelism is not implemented")
        super().setup_environment()
        if self.hybrid_shard and self.num_nodes > 1:
            from torch.distributed.device_mesh import init_device_mesh

            self.shard_mesh = init_device_mesh(self.root_device.type, (self.num_nodes, self.num_processes),
                                               mesh_dim_names=("replicate", "shard"))
        else:
            self.shard_mesh = self.device_mesh["data_parallel"]

    def bf16_policy(self) -> bool:
        if self.mixed_precision != "auto":
            return self.mixed_precision == "bf16"
        return self.root_device.type == "cuda" and "bf16" in str(self.precision_plugin.precision)

    # ------------------------------------------------------------------ atomic sharded checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write the checkpoint folder under a temporary name beside ``filepath`` (every rank its shard, rank 0
        ``meta.pt``), then rename it onto ``filepath``: a save killed midway leaves the previous checkpoint of
        that name intact and a ``.<name>.<random>.tmp`` folder that the next run removes. Replacing an existing
        checkpoint takes two renames (old aside to ``.<name>.<random>.old``, new in place); the old one is
        deleted after, or put back by :func:`mim_lightning.checkpoints.io.remove_temp_files` if a crash came between."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(str(filepath)))
        token = self.broadcast(secrets.token_hex(4))
        temp = target.parent / f".{target.name}.{token}.tmp"
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_save
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        temp.mkdir(parents=True, exist_ok=True)
        sharded = {"state_dict": checkpoint.pop("state_dict")}
        sharded.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        sharded.update({key: checkpoint.pop(key) for key in SHARDED_KEYS if key in checkpoint})
        _distributed_checkpoint_save(sharded, temp)
        if self.global_rank == 0:
            torch.save(checkpoint, temp / _METADATA_FILENAME)
        self.barrier()
        if self.global_rank == 0:
            replace_path(temp, target, token)
        self.barrier()


def replace_path(source: Path, target: Path, token: str | None = None) -> None:
    """Move the complete folder (or file) ``source`` onto ``target``, which may exist (file or folder)."""
    from mim_lightning.checkpoints.io import _fsync_folder

    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.{token or secrets.token_hex(4)}.old"
        os.replace(target, old)
    os.replace(source, target)
    _fsync_folder(target.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


# ------------------------------------------------------------------ configure_model
def sharding_strategy(pl_module: Any) -> FSDP2Strategy | None:
    trainer = getattr(pl_module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    return strategy if isinstance(strategy, ModelParallelStrategy) else None


def data_parallel_size(trainer: Any) -> int:
    """The number of processes that each train on their own part of the batch (the lr rule's device count)."""
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, ModelParallelStrategy) and strategy._device_mesh is not None:
        return int(strategy.device_mesh["data_parallel"].size())
    return int(trainer.world_size)


def optimizer_device(pl_module: Any) -> torch.device:
    """Where the optimizer steps: the CPU under ``cpu_offload``, else the module's device."""
    strategy = sharding_strategy(pl_module)
    return torch.device("cpu") if getattr(strategy, "cpu_offload", False) else pl_module.device


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def broadcast_from_rank0(model: nn.Module, device: torch.device) -> None:
    """Give every rank rank 0's parameters and buffers (what DDP does when it wraps a model)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    model.to(device)
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def shard_module(pl_module: Any, attribute: str = "model") -> None:
    """Shard ``pl_module.<attribute>`` with FSDP2 when the trainer's strategy is a ``ModelParallelStrategy``
    (nothing otherwise; a second call does nothing). See the module docstring for the units and options."""
    strategy = sharding_strategy(pl_module)
    model = getattr(pl_module, attribute)
    if strategy is None or is_sharded(model):
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from lightning.pytorch.callbacks import WeightAveraging

    if any(isinstance(c, WeightAveraging) for c in pl_module.trainer.callbacks):
        raise ConfigError("callbacks.ema._target_", "lightning.pytorch.callbacks.EMAWeightAveraging",
                          "mim_lightning.callbacks.ema.EMA under trainer=fsdp",
                          "Lightning's weight averaging copies the unsharded model and cannot average shards")
    mesh = getattr(strategy, "shard_mesh", None) or strategy.device_mesh["data_parallel"]
    broadcast_from_rank0(model, strategy.root_device)
    frozen = {p for p in model.parameters() if not p.requires_grad}
    use_bf16 = strategy.bf16_policy() if isinstance(strategy, FSDP2Strategy) else False
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16
              else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy() if getattr(strategy, "cpu_offload", False) else OffloadPolicy()
    reshard = getattr(strategy, "reshard_after_forward", True)
    checkpointing = getattr(strategy, "activation_checkpointing", False)
    kwargs = dict(mesh=mesh, mp_policy=policy, offload_policy=offload, ignored_params=frozen or None)
    for _, block in shard_units(model):
        if checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(block)
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)  # the root's parameters are needed right after


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank must call it), any other tensor unchanged."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


# ------------------------------------------------------------------ reading a sharded checkpoint on one process
