"""torchrun integration: process groups, DDP / FSDP2 wrapping, and the few collectives the loop needs.

The model code knows nothing of this (torchtitan's rule): the trainer wraps the model from the outside.
One process without torchrun is simply world size 1 and every collective is a no-op.

With `--train.mesh` (tensor or pipeline parallelism, train/parallel.py) several ranks read the same
sequences, so `DistInfo.rank` and `world` are the *data-parallel* coordinates: what an objective shards
its batches by and what the loop's loss normalisation counts. `all_reduce_sum` sums over the data-parallel
ranks only (tensor-parallel ranks hold the same numbers; pipeline stages are summed by the loop).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from tinychat.device import compiler_missing, pick_device
from tinychat.train.parallel import apply_fsdp, apply_tp, build_mesh, parse_mesh
from tinychat.train.pipeline import split_stage


@dataclass
class DistInfo:
    rank: int  # data-parallel rank: which share of each batch this process reads
    world: int  # data-parallel ranks
    local_rank: int
    device: torch.device
    global_rank: int = -1  # torchrun's RANK (-1: the same as rank)
    devices: int = 0  # torchrun's WORLD_SIZE (0: the same as world)
    mesh: DeviceMesh | None = None  # the pp x dp x tp mesh of --train.mesh (None: plain DDP/FSDP)

    def __post_init__(self) -> None:
        self.global_rank = self.rank if self.global_rank < 0 else self.global_rank
        self.devices = self.devices or self.world

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0


_DATA_GROUP: dist.ProcessGroup | None = None  # the data-parallel ranks all_reduce_sum sums over (None: all)


def init_distributed(device_pref: str = "auto", mesh: str = "") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL on CUDA), and lay the
    ranks out as `mesh` (train/parallel.py) when it asks for tensor or pipeline parallelism."""
    global _DATA_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    shape = parse_mesh(mesh, world) if mesh else None
    if world <= 1:
        return DistInfo(0, 1, 0, pick_device(device_pref))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if shape is None or shape.trivial:
        _DATA_GROUP = None
        return DistInfo(rank, world, local_rank, device)
    dmesh = build_mesh(shape, device.type)
    _DATA_GROUP = dmesh["dp"].get_group()
    return DistInfo(dmesh["dp"].get_local_rank(), shape.dp, local_rank, device, rank, world, dmesh)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel ranks (every rank when there is no --train.mesh)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=_DATA_GROUP)
    return x


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap_model(
    model: torch.nn.Module, info: DistInfo, mode: str, activation_checkpointing: bool, compile: bool
) -> torch.nn.Module:
    """Apply tensor parallelism (--train.mesh), activation checkpointing, compile, then FSDP2 (fully_shard
    per block, then the root) or DDP: torchtitan's order, so each wrapper sees the modules it expects."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if info.mesh is not None and info.mesh["pp"].size() > 1:
        split_stage(model, info.mesh["pp"].get_local_rank(), info.mesh["pp"].size())
    if info.mesh is not None and info.mesh["tp"].size() > 1:
        apply_tp(model, info.mesh["tp"])
    if activation_checkpointing and layers is not None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for key, block in list(layers._modules.items()):  # by key: a pipeline stage's keys are not 0..n-1
            layers._modules[key] = checkpoint_wrapper(block)
    if compile:
        missing = compiler_missing(info.device)
        if missing:  # the same training, only slower: say so rather than fail at the first step
            if info.is_main:
                print(f"note: --train.compile is off for this run: {missing}.", flush=True)
        else:
            model = torch.compile(model)
    if info.mesh is not None:
        if info.mesh["dp"].size() > 1:
            apply_fsdp(model, info.mesh["dp"])  # beside tp/pp, data parallelism is always FSDP2
        return model
    if info.world <= 1:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in layers or []:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
