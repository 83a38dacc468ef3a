"""Parallel plans applied from outside the model: a device mesh of pipeline, data and tensor ranks.

`--train.mesh pp=2,dp=2,tp=2` lays torchrun's ranks out as a 3-D grid (torch's DeviceMesh), outer to inner
pp, dp, tp: tensor-parallel ranks are neighbours (on one host they share the fastest links), pipeline
stages are the furthest apart (they only pass activations once per micro-batch). Each dimension is one
of the three ways of splitting the work that Megatron-LM and PipeDream describe:

  * tp (tensor parallel, Megatron-LM): every block's q/k/v and gate/up projections are split by output
    columns and o/down by input rows, so a block needs one all-reduce in the forward pass and one in the
    backward pass, and each rank holds 1/tp of the block's weights, heads and MLP width.
  * dp (data parallel, FSDP2 / ZeRO-3): ranks read different sequences; parameters, gradients and AdamW
    moments are sharded over them and gathered per block just in time.
  * pp (pipeline parallel, GPipe / PipeDream-1F1B): consecutive blocks live on different ranks, and a batch
    is cut into micro-batches that flow through the stages so they work at the same time (pipeline.py).

The model code knows nothing of this (torchtitan's rule). The one thing attention must know, its local
head count, is set here from outside: each block's attention gets a copy of the model config whose
n_head/n_kv_head are the local ones, which is what the weights' shapes say after the split.

Not split: the embedding and the (often tied) output head stay whole on every tensor-parallel rank
(Megatron's vocabulary-parallel head with a parallel cross-entropy is the missing piece for large
vocabularies), and the block norms run on replicated activations (no sequence parallelism).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from tinychat.errors import UserError

MESH_DIMS = ("pp", "dp", "tp")  # outer to inner


@dataclass(frozen=True)
class MeshShape:
    pp: int = 1
    dp: int = 1
    tp: int = 1

    @property
    def size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def trivial(self) -> bool:
        """Only data parallelism: the plain DDP / FSDP path of distributed.py does the job."""
        return self.tp == 1 and self.pp == 1

    def __str__(self) -> str:
        return ",".join(f"{d}={getattr(self, d)}" for d in MESH_DIMS)


def parse_mesh(text: str, world: int) -> MeshShape:
    """'dp=2,tp=2' -> MeshShape; a dimension left out is 1, except dp, which takes the ranks left over."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(pp|dp|tp)\s*=\s*(\d+)", part)
        if not m or int(m[2]) < 1 or m[1] in sizes:
            raise UserError(
                f"--train.mesh: cannot read {part!r}; expected comma-separated pp=N, dp=N, tp=N (each once, N >= 1)."
            )
        sizes[m[1]] = int(m[2])
    rest = sizes.get("pp", 1) * sizes.get("tp", 1)
    if "dp" not in sizes:
        if world % rest:
            raise UserError(f"--train.mesh {text}: pp x tp = {rest} does not divide the {world} torchrun ranks.")
        sizes["dp"] = world // rest
    shape = MeshShape(**sizes)
    if shape.size != world:
        raise UserError(f"--train.mesh {text} has {shape.size} ranks (pp x dp x tp) but torchrun started {world}.")
    return shape


def build_mesh(shape: MeshShape, device_type: str) -> DeviceMesh:
    return init_device_mesh(device_type, (shape.pp, shape.dp, shape.tp), mesh_dim_names=MESH_DIMS)


# ------------------------------------------------------------------------------------------ tensor parallel
def block_tp_plan(block: nn.Module) -> dict[str, object]:
    """Megatron's split of one block. Column-parallel layers take the whole (replicated) input and give each
    rank its own heads / MLP columns; the row-parallel layer after them sums the ranks' partial products
    (the one all-reduce) back to a replicated output. Qwen3's per-head q/k norms see only local heads, so
    their gain is a replicated DTensor over a head-sharded input: its gradient is then summed over ranks."""
    plan: dict[str, object] = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    if hasattr(block.self_attn, "q_norm"):  # (B, T, heads, hd): heads are dim 2
        plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def check_mesh(shape: MeshShape, cfg: Any) -> None:
    """A UserError for a model the mesh cannot split (cfg: a tinychat ModelConfig)."""
    for name in ("n_kv_head", "d_ff"):  # n_head is a multiple of n_kv_head
        if getattr(cfg, name) % shape.tp:
            raise UserError(
                f"tensor parallelism: model.{name} ({getattr(cfg, name)}) is not divisible by tp={shape.tp}."
            )
    if shape.pp > 1 and cfg.tie_embeddings:
        raise UserError(
            "pipeline parallelism puts the embedding and the output head on different stages; "
            "train with --model.tie_embeddings false."
        )
    if cfg.n_layer < shape.pp:
        raise UserError(f"pipeline parallelism: {cfg.n_layer} layers cannot fill pp={shape.pp} stages.")


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split every block of `model` (a tinychat Model, or a pipeline stage holding some of its blocks)."""
    tp = tp_mesh.size()
    cfg = model.cfg
    check_mesh(MeshShape(tp=tp), cfg)
    local = dataclasses.replace(cfg, n_head=cfg.n_head // tp, n_kv_head=cfg.n_kv_head // tp)
    for block in model.model.layers:
        if block is None:
            continue
        parallelize_module(block, tp_mesh, block_tp_plan(block))
        block.self_attn.cfg = local  # the attention reshapes by its local head count


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """FSDP2 per block, then the rest (embedding, final norm, head) at the root, over the data ranks."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        if block is not None:
            fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


# ------------------------------------------------------------------------------------------ gradients
def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None) -> float:
    """The global gradient norm, and the gradients scaled to at most `max_norm`, over any mix of plain,
    tensor-sharded, FSDP-sharded and 2-D DTensor gradients (torch's clip_grad_norm_ wants one mesh), summed
    over pipeline stages (each holds different parameters). A DTensor's norm is reduced over its own mesh
    by full_tensor(); a plain gradient is the same on every rank that holds it, so it counts once."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float32)
    for g in grads:
        n = torch.linalg.vector_norm(g, dtype=torch.float32)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        total += n.cpu() ** 2
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    norm = math.sqrt(total.item())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm
