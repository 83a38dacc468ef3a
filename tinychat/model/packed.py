"""Decode-step matmuls on the CPU over weights packed once: `pack_linears(model)` for inference.

Why: a decode step multiplies a few rows (one per running sequence) by every weight once. F.linear hands
that to MKL's sgemm, which at 1-16 rows on the tiny preset's shapes reached 5-30 GFLOP/s per core when the
weights came from memory; the serving engine's 16-row step spent two thirds of its time in it. The kernel of
packed_linear.cpp reads a weight laid out in 16-column panels with register tiles of up to 6 rows, at
1.4-2.2x aten's speed over a tiny-preset step's 25 matmuls at 1-64 rows (docs/engine.md). Past
`PACKED_ROWS` rows (prefill chunks) MKL's blocking wins, and F.linear runs.

The model knows nothing of this: `pack_linears` swaps, from outside, each fp32 CPU projection a forward
calls (the fused q/k/v and gate/up of `Model.fuse_projections`, o/down and the LM head) for a
`PackedLinear`, an nn.Linear that keeps its weight and bias parameters (state_dict, a tied head and
isinstance checks are unchanged) and holds the packed copy beside them. That copy is the cost: the float
weights' memory again, which is why only inference entry points pack (the serving engine, `tinychat
generate`). A weight changed in place or replaced (`model.to(...)`) afterwards is repacked at the next eager
call; a compiled graph does not check, so pack (or call once eagerly) after such changes. Training, autocast,
other devices and dtypes take F.linear, as does every call that needs gradients.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from tinychat.model import native
from tinychat.model.compress.common import set_module
from tinychat.model.transformer import MLP, Attention

M = TypeVar("M", bound=nn.Module)
PACKED_ROWS = 64  # rows up to which the packed kernel runs (decode batches, short prompts); F.linear above


def _stamp(w: torch.Tensor) -> tuple[int, int]:
    """What tells a weight's packed copy is stale: its storage (a .to() replaces it) and its version counter
    (moved by in-place changes; inference tensors, made under torch.inference_mode, keep none)."""
    return w.data_ptr(), 0 if w.is_inference() else w._version


class PackedLinear(nn.Linear):
    """y = x W^T + b through packed_linear.cpp for up to PACKED_ROWS fp32 rows on the CPU, else F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, op: object) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        # the same parameter objects: no copy
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.op = op
        self.register_buffer("packed", None, persistent=False)
        self.repack()

    @torch.no_grad()
    def repack(self) -> None:
        """Pack the weight as it is now: (ceil(N / 16), K, 16)."""
        w = self.weight
        self.packed = torch.ops.tinychat.pack_linear_weight(w.detach())
        self._packed_from = _stamp(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        w, b = self.weight, self.bias
        rows = x.numel() // self.in_features
        if (
            rows <= PACKED_ROWS
            and x.dtype == w.dtype == self.packed.dtype == torch.float32
            and x.device.type == w.device.type == self.packed.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and not torch.is_autocast_enabled("cpu")
        ):
            if not torch.compiler.is_compiling() and _stamp(w) != self._packed_from:
                self.repack()  # the weight was changed in place, or replaced (.to()), since it was packed
            bias = None if b is None else b.detach()
            y = self.op(x.reshape(rows, self.in_features), self.packed, bias, self.out_features)
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, w, b)


class FusedPackedLinear(PackedLinear):
    """The packed form of a fused projection (`qkv_weight`/`qkv_bias` of an Attention, `gate_up_*` of an MLP).

    It reads the weight and bias from its owner's buffers at every call, so after `model.to(...)`, which
    replaces those buffers but cannot see this module (it sits in a tuple, outside the module tree, as a fused
    int8 layer does), the call runs on the new tensors: F.linear for another dtype or device, a repack at the
    next eager call for a new fp32 CPU tensor."""

    def __init__(self, owner: nn.Module, prefix: str, op: object) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "owner", owner)  # not a submodule: the owner holds this one
        self.prefix, self.op = prefix, op
        self.out_features, self.in_features = self.weight.shape
        self.register_buffer("packed", None, persistent=False)
        self.repack()

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return getattr(self.owner, f"{self.prefix}_weight")

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return getattr(self.owner, f"{self.prefix}_bias")


def _packable(w: torch.Tensor | None) -> bool:
    return w is not None and w.device.type == "cpu" and w.dtype == torch.float32


def pack_linears(model: M) -> M:
    """Swap, in place, every fp32 CPU projection a forward calls for a PackedLinear (see the module docstring),
    and return the model; nothing changes where the kernel cannot run here (no AVX2/FMA or g++,
    TINYCHAT_NATIVE=0).

    Run after `fuse_projections`: a fused q/k/v or gate/up is packed once, and the projections it replaced
    (never called any more) are not. Plain nn.Linear modules only: LoRA-adapted, quantized or
    multi-adapter projections keep their own forward."""
    op = native.packed_linear()
    if op is None:
        return model
    skip: set[int] = set()  # projections a fused matmul computes instead
    for mod in model.modules():
        if isinstance(mod, Attention) and mod.qkv_weight is not None:
            skip.update(id(m) for m in (mod.q_proj, mod.k_proj, mod.v_proj))
            if not mod.qkv_mod and _packable(mod.qkv_weight):
                mod.qkv_mod = (FusedPackedLinear(mod, "qkv", op),)
        elif isinstance(mod, MLP) and mod.gate_up_weight is not None:
            skip.update(id(m) for m in (mod.gate_proj, mod.up_proj))
            if not mod.gate_up_mod and _packable(mod.gate_up_weight):
                mod.gate_up_mod = (FusedPackedLinear(mod, "gate_up", op),)
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and id(mod) not in skip and _packable(mod.weight):
            set_module(model, name, PackedLinear(mod.weight, mod.bias, op))
    return model


def unpack_linears(model: M) -> M:
    """Undo pack_linears in place: each PackedLinear back to an nn.Linear over the same parameters, fused
    projections back to their plain matmul, the packed copies dropped (a copy of a served model made to run in
    another dtype: the serving engine's bf16 prefill weights)."""
    for mod in model.modules():
        if isinstance(mod, Attention):
            mod.qkv_mod = tuple(m for m in mod.qkv_mod if not isinstance(m, FusedPackedLinear))
        elif isinstance(mod, MLP):
            mod.gate_up_mod = tuple(m for m in mod.gate_up_mod if not isinstance(m, FusedPackedLinear))
    for name, mod in list(model.named_modules()):
        if isinstance(mod, PackedLinear):
            plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            plain.weight, plain.bias = mod.weight, mod.bias
            set_module(model, name, plain)
    return model
