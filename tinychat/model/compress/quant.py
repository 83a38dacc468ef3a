"""Weight-only quantization: int8 per output channel and int4 per group, stored and run as integers.

Why weight-only: batch-1 decoding on a CPU is memory-bound (every weight is read once per token), so
reading 1 byte (int8) or half a byte (int4) per weight instead of 4 is where the speed comes from, and
activations are not stored quantized, which keeps the quality loss small without calibration data (the
native int8 kernel below rounds them per call, per block of 32, dynamically: no calibration either).

Kernels (measured with bench/quantize.py, torch 2.13 CPU): `aten._weight_int8pack_mm` and
`aten._weight_int4pack_mm_for_cpu` are fast only when the activations are bf16 (with fp32 activations
both fall back to a scalar path 10-100x slower, which is the 7.7 ms the issue measured), so a
QuantLinear casts x to bf16, multiplies with fp32 accumulation inside the kernel and casts back. The
int8 kernel crashes for in_features not divisible by 16 and the int4 kernel needs out_features % 16 == 0
and a group of 32/64/128/256; such layers, and any non-CPU device, take the plain path: dequantize the
layer's weight for that call (correct, not fast; there is no GPU here to tune one).
On AVX2 CPUs int8 layers with K % 32 == 0 run up to NATIVE_ROWS rows (decode steps, short prompts) through
tinychat's own kernel instead (model/native.py, int8_gemv.cpp: activations rounded to int8 per block of 32 and
multiplied in integers, as llama.cpp's q8_0 matmul does): 1.4-2x aten's kernel on a 2-core AVX2 EPYC. int4
layers with N % 32 == 0 run up to NATIVE_ROWS_INT4 rows through int4_gemv.cpp, which reads aten's int4 layout
with fp32 activations: 2.2x aten's kernel for one row there.

Scales are rounded to bf16 *before* the integers are chosen, so the kernel's bf16 scales reproduce the
stored weights exactly and transformers (which dequantizes in fp32) sees the very same numbers.

int4 keeps the (tied) embedding and an untied lm_head at int8: the head is the largest single matrix
of a small model and llama.cpp's q4_0 makes the same choice (its output layer stays at 6+ bits).

On disk the directory is compressed-tensors' format (what vLLM and transformers read):
`*.weight` int8 + `*.weight_scale` (out, 1) for int8 ("int-quantized"), `*.weight_packed` int32
(eight 4-bit values per word, offset by 8) + `*.weight_scale` (out, in/group) + `*.weight_shape` for int4
("pack-quantized"), and config.json's `quantization_config` says which module has which scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.model.compress.common import (
    BLOCK_LINEAR,
    block_linear_names,
    check_paths,
    load_float,
    save_with_tokenizer,
    set_module,
)
from tinychat.model.native import int4_gemv, int8_gemv

INT4_GROUPS = (32, 64, 128, 256)  # what aten's int4 CPU kernel accepts
NATIVE_ROWS = 64  # int8 matmuls of up to this many rows (decode batches, short prompts) take int8_gemv.cpp
# int4 matmuls of up to this many rows take int4_gemv.cpp: 2.2x aten's kernel for one row, even at 4 and behind
# from 16 (it widens each weight once per row, where aten's bf16 kernel shares the work between rows)
NATIVE_ROWS_INT4 = 4


# ---------------------------------------------------------------------------- integer math
def aligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy on a fresh 64-byte-aligned allocation unless `t` already is one. The aten int8
    kernel segfaults on operands that are not (safetensors hands out tensors at any byte offset). Under
    torch.compile the activations reaching it are the compiled graph's own fresh buffers (the allocator's
    64-byte alignment) and a data pointer cannot be read, so only contiguity is asked for."""
    t = t.contiguous()
    if torch.compiler.is_compiling():
        return t
    return t if t.data_ptr() % 64 == 0 else t.clone()


def bf16_exact(s: torch.Tensor, up: bool = False) -> torch.Tensor:
    """Round fp32 scales to values bf16 holds exactly (the kernels read bf16 scales); `up` rounds away
    from zero, so no weight lands beyond the last integer level."""
    b = s.to(torch.bfloat16)
    if up:
        b = torch.where(b.float().abs() < s.abs(), torch.nextafter(b, b * 2), b)
    return b.float()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w (N, K) -> q (N, K) int8 in [-127, 127], scale (N, 1) fp32; w ≈ q * scale."""
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = bf16_exact(torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)), up=True)
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise int4 in llama.cpp's q4_0 way: w (N, K) -> q (N, K) int8 in [-8, 7], scale (N, K/group).

    The scale is the group's largest-magnitude value divided by -8, so that value lands exactly on -8 and
    all 16 levels are used (a max/7 symmetric scale wastes one); w ≈ q * scale, scale may be negative.
    """
    N, K = w.shape
    if K % group:
        raise UserError(f"--group-size {group} does not divide a layer's in_features {K}.")
    g = w.float().reshape(N, K // group, group)
    idx = g.abs().argmax(dim=-1, keepdim=True)
    peak = torch.gather(g, -1, idx)  # (N, K/group, 1) signed
    scale = bf16_exact(torch.where(peak != 0, peak / -8.0, torch.ones_like(peak)), up=True)
    q = torch.round(g / scale).clamp_(-8, 7).to(torch.int8)
    return q.reshape(N, K), scale.squeeze(-1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int values in [-8, 7] -> (N, K/8) int32, value i of a word at bits 4i..4i+3, offset by 8
    (compressed-tensors' pack_to_int32 for 4 bits)."""
    N, K = q.shape
    assert K % 8 == 0, K
    u = (q.to(torch.int32) + 8).reshape(N, K // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return (u << shifts).sum(dim=-1, dtype=torch.int32)  # the bits never overlap, so the sum is an OR


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4: (N, K/8) int32 -> (N, K) int8 in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    u = (packed[..., None] >> shifts) & 0xF  # arithmetic shift, then the low nibble
    return (u.reshape(packed.shape[0], -1)[:, :k] - 8).to(torch.int8)


# ---------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """A Linear whose weight is integers: int8 per output channel, or int4 per `group` input columns.

    Holds only the integer weight (in the kernel's layout), its scales and the optional fp32 bias.
    `disk_tensors()` gives back the compressed-tensors form it was built from.
    """

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, bits: int, group: int = 0, bias: torch.Tensor | None = None
    ):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.quantized_params = q.numel()  # Model.num_params counts these (they are buffers, not parameters)
        self.bits, self.group = bits, group
        self.register_buffer("scale", scale.float(), persistent=False)  # (N, 1) int8; (N, K/group) int4
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        N, K = q.shape
        if bits == 8:
            self.fast = K % 16 == 0
            # native.py's kernel for decode steps (activations quantized per 32, as llama.cpp's q8_0 matmul)
            self.native = int8_gemv() if K % 32 == 0 and int(q.min()) > -128 else None
            self.register_buffer("qweight", aligned(q.to(torch.int8)), persistent=False)  # (N, K)
            self.register_buffer("kscale", aligned(scale.reshape(N).to(torch.bfloat16)), persistent=False)
        else:
            self.fast = group in INT4_GROUPS and N % 16 == 0 and K % group == 0
            # native.py's kernel for decode steps over aten's own layout (below), fp32 activations
            self.native = int4_gemv() if self.fast and N % 32 == 0 else None
            if self.fast:
                # the kernel's layout: (N, K/2) uint8 and per-group (scale, zero) pairs (K/group, N, 2)
                packed = aligned(
                    torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
                )
                sz = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1)
                self.register_buffer("qweight", packed, persistent=False)
                self.register_buffer("kscale", aligned(sz.to(torch.bfloat16)), persistent=False)
            else:
                self.register_buffer("qweight", pack_int4(q), persistent=False)  # (N, K/8) int32
                self.register_buffer("kscale", torch.empty(0), persistent=False)

    @classmethod
    @torch.no_grad()
    def concat(cls, mods: tuple[QuantLinear, ...]) -> QuantLinear | None:
        """One int8 layer whose outputs are `mods`' outputs side by side (q/k/v, gate/up: one kernel call
        instead of three, transformer.py `_fuse_integer`), or None where they cannot share one.

        Each module's integers, scales and bias become views of the fused layer's, so memory does not grow
        and the files (written from the modules themselves) do not change. Only int8 on the fast path fuses,
        and only where every view starts 64-byte aligned, as the kernel needs: int4's packed kernel layout
        does not split by rows."""
        K, with_bias = mods[0].in_features, mods[0].bias is not None
        if any(m.bits != 8 or not m.fast or m.in_features != K or (m.bias is not None) != with_bias for m in mods):
            return None
        starts = [sum(m.out_features for m in mods[:i]) for i in range(len(mods))]
        if any(r * K % 64 or r * 2 % 64 for r in starts):  # qweight rows of K bytes, kscale of 2
            return None
        bias = torch.cat([m.bias for m in mods]) if with_bias else None
        fused = cls(torch.cat([m.qweight for m in mods]), torch.cat([m.scale for m in mods]), 8, 0, bias)
        for m, r in zip(mods, starts):
            rows = slice(r, r + m.out_features)
            m.qweight, m.kscale, m.scale = fused.qweight[rows], fused.kscale[rows], fused.scale[rows]
            if with_bias:
                m.bias = nn.Parameter(fused.bias[rows], requires_grad=False)
        return fused

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight (N, K) these integers stand for: tests and the slow path only."""
        if self.bits == 8:
            return self.qweight.float() * self.scale
        return (self.int_values().float().reshape(self.out_features, -1, self.group) * self.scale[..., None]).reshape(
            self.out_features, self.in_features
        )

    def int_values(self) -> torch.Tensor:
        """(N, K) int8 values: [-127, 127] for int8, [-8, 7] for int4."""
        if self.bits == 8:
            return self.qweight
        if not self.fast:
            return unpack_int4(self.qweight, self.in_features)
        # unpack the kernel layout by multiplying the identity: exact (small integers in bf16), done rarely
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.qweight.device)
        ones = torch.stack(
            [torch.ones_like(self.scale.t()), torch.zeros_like(self.scale.t())], -1
        )  # w = (u - 8) * 1 + 0
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group, ones.to(torch.bfloat16))
        return w.t().round().to(torch.int8)  # (N, K)

    def disk_tensors(self) -> dict[str, torch.Tensor]:
        """compressed-tensors names (relative to the module): weight/weight_scale or weight_packed/..."""
        out: dict[str, torch.Tensor] = {}
        if self.bits == 8:
            out["weight"], out["weight_scale"] = self.qweight, self.scale
        else:
            out["weight_packed"] = pack_int4(self.int_values())
            out["weight_scale"] = self.scale
            out["weight_shape"] = torch.tensor([self.out_features, self.in_features], dtype=torch.int64)
        if self.bias is not None:
            out["bias"] = self.bias.data
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if torch.is_grad_enabled() and x.requires_grad:  # QLoRA: gradients flow to adapters below this layer
            return IntMatmul.apply(x, self)
        return self.int_forward(x)

    def int_forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.numel() // self.in_features
        native_rows = NATIVE_ROWS if self.bits == 8 else NATIVE_ROWS_INT4
        if self.native and rows <= native_rows and x.device.type == "cpu":  # decode steps: int8/int4_gemv.cpp
            x2 = x.reshape(rows, self.in_features).float()
            if self.bits == 8:
                y = self.native(x2, self.qweight, self.scale.reshape(-1).float())
            else:
                y = self.native(x2, self.qweight, self.kscale, self.group)
            y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        elif self.fast and x.device.type == "cpu":
            x2 = aligned(x.reshape(-1, self.in_features).to(torch.bfloat16))
            if self.bits == 8:
                y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.kscale)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group, self.kscale)
            y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}" + (
            f", group={self.group}" if self.bits == 4 else ""
        )


class IntMatmul(torch.autograd.Function):
    """y = QuantLinear(x) through the integer kernel; backward dx = dy W with W dequantized: aten's int8/int4
    matmuls have no derivative, and the frozen integers need none (QLoRA trains adapters around them)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
        ctx.module = module
        return module.int_forward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.module.dequantized().to(grad.dtype), None


class QuantEmbedding(nn.Module):
    """An Embedding stored as int8 rows with one scale per row; with tied embeddings the LM head is a
    QuantLinear over the very same tensors (a row's scale is the head's output-channel scale)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype  # of the rows it returns (the norms' dtype)
        self.quantized_params = q.numel()
        self.register_buffer("qweight", aligned(q.to(torch.int8)), persistent=False)  # (V, d)
        self.register_buffer("scale", scale.float().reshape(-1, 1), persistent=False)  # (V, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, d)
        return (F.embedding(ids, self.qweight).float() * F.embedding(ids, self.scale)).to(self.dtype)

    def tied_head(self) -> QuantLinear:
        head = QuantLinear(self.qweight, self.scale, bits=8)
        head.qweight, head.scale = self.qweight, self.scale  # share, do not copy
        head.quantized_params = 0  # counted once, in the embedding
        return head


# ---------------------------------------------------------------------------- whole models
def check_bits(bits: int, group: int) -> None:
    if bits not in (4, 8):
        raise UserError(f"--bits must be 8 or 4, got {bits}.")
    if bits == 4 and group not in INT4_GROUPS:
        raise UserError(f"--group-size must be one of {', '.join(map(str, INT4_GROUPS))} for int4, got {group}.")


def quantize_blocks(model: nn.Module, bits: int, group: int = 64) -> nn.Module:
    """Replace, in place, every block Linear by an int`bits` QuantLinear (QLoRA's frozen base keeps its
    embeddings and head in floating point)."""
    check_bits(bits, group)
    with torch.no_grad():
        for name in block_linear_names(model):
            lin = model.get_submodule(name)
            q, s = quantize_int8(lin.weight) if bits == 8 else quantize_int4(lin.weight, group)
            set_module(model, name, QuantLinear(q, s, bits, group if bits == 4 else 0, lin.bias))
    return model


def quantize_model(model: nn.Module, bits: int, group: int = 64) -> nn.Module:
    """Replace, in place, every block Linear by an int`bits` QuantLinear and the embedding/head by int8 ones."""
    quantize_blocks(model, bits, group)
    with torch.no_grad():
        tied = model.cfg.tie_embeddings
        emb = QuantEmbedding(*quantize_int8(model.model.embed_tokens.weight))
        model.model.embed_tokens = emb
        model.lm_head = emb.tied_head() if tied else QuantLinear(*quantize_int8(model.lm_head.weight), bits=8)
    model.quantization = quantization_config(bits, group, tied)
    return model


def quantization_config(bits: int, group: int, tied: bool) -> dict[str, Any]:
    """config.json's `quantization_config` in compressed-tensors' schema (transformers' quant_method)."""

    def scheme(targets: list[str], nbits: int, strategy: str, gs: int | None, fmt: str) -> dict[str, Any]:
        weights = {
            "num_bits": nbits,
            "type": "int",
            "symmetric": True,
            "strategy": strategy,
            "group_size": gs,
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
        }
        return {
            "targets": targets,
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
            "format": fmt,
        }

    head = ["Embedding", "re:^lm_head$"]
    if bits == 8:
        groups = {"group_0": scheme([BLOCK_LINEAR, *head], 8, "channel", None, "int-quantized")}
        fmt = "int-quantized"
    else:
        groups = {
            "group_0": scheme([BLOCK_LINEAR], 4, "group", group, "pack-quantized"),
            "group_1": scheme(head, 8, "channel", None, "int-quantized"),
        }
        fmt = "mixed-precision"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "tinychat": {"bits": bits, "group_size": group if bits == 4 else None, "tied_head": tied},
    }


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a quantized model's model.safetensors holds (compressed-tensors names).

    A tied head is written out as its own copy of the int8 embedding (config.json then says
    tie_word_embeddings false): transformers ties the head to the embedding *before* compressed-tensors
    decompresses it, so a tied quantized head would stay int8 there and fail. tinychat shares the copy
    again on load (quantization_config.tinychat.tied_head), so only the file pays for it.
    """
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantEmbedding):
            out[f"{name}.weight"], out[f"{name}.weight_scale"] = mod.qweight, mod.scale
        elif isinstance(mod, QuantLinear):
            out.update({f"{name}.{k}": v for k, v in mod.disk_tensors().items()})
    quantized = {n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    for name, t in model.state_dict().items():
        if name.rpartition(".")[0] not in quantized:  # norms (and anything else left in float)
            out[name] = t.float()
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def load_quantized(
    model: nn.Module,  # a Model on the meta device
    tensors: dict[str, torch.Tensor],
    qcfg: dict[str, Any],
    source: str,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
) -> nn.Module:
    """Build a quantized Model from a directory's tensors: integers stay integers, norms get `dtype`."""
    from tinychat.model.transformer import rope_inv_freq

    info = qcfg.get("tinychat") or {}
    bits, group = info.get("bits"), info.get("group_size") or 0
    if qcfg.get("quant_method") != "compressed-tensors" or bits not in (4, 8):
        raise UserError(
            f"{source}: quantization_config is not one tinychat wrote (compressed-tensors int8/int4 from "
            "`tinychat quantize`); other quantized checkpoints are not supported."
        )
    if (device or "cpu") != "cpu":
        raise UserError(f"{source} is quantized and runs on the CPU only (its int8/int4 kernels); use --device cpu.")

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise UserError(f"{source}: tensor {name} is missing.")
        return tensors.pop(name)

    for name in block_linear_names(model):
        lin = model.get_submodule(name)
        bias = tensors.pop(f"{name}.bias", None)
        scale = take(f"{name}.weight_scale")
        if bits == 8:
            q = take(f"{name}.weight")
        else:
            q = unpack_int4(take(f"{name}.weight_packed"), lin.in_features)
            tensors.pop(f"{name}.weight_shape", None)
        if tuple(q.shape) != (lin.out_features, lin.in_features) or q.dtype != torch.int8:
            raise UserError(
                f"{source}: {name} holds {q.dtype} {tuple(q.shape)}, expected int8 {tuple(lin.weight.shape)}."
            )
        set_module(model, name, QuantLinear(q, scale, bits, group if bits == 4 else 0, bias))
    emb = QuantEmbedding(take("model.embed_tokens.weight"), take("model.embed_tokens.weight_scale"), dtype)
    model.model.embed_tokens = emb
    head_q, head_s = take("lm_head.weight"), take("lm_head.weight_scale")
    if info.get("tied_head"):  # the file's copy of the embedding: share the embedding's tensors instead
        if not (torch.equal(head_q, emb.qweight) and torch.equal(head_s.reshape(-1, 1).float(), emb.scale)):
            raise UserError(
                f"{source}: quantization_config says the head is tied, but lm_head differs from the embedding."
            )
        model.lm_head = emb.tied_head()
    else:
        model.lm_head = QuantLinear(head_q, head_s, bits=8)
    floats = {k for k, v in model.state_dict().items() if v.device.type == "meta"}  # norms
    missing, extra = sorted(floats - set(tensors)), sorted(set(tensors) - floats)
    if missing or extra:
        what = f"tensor {missing[0]} is missing" if missing else f"unexpected tensor {extra[0]}"
        raise UserError(f"{source}: {what}.")
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    model.register_buffer("inv_freq", rope_inv_freq(model.cfg), persistent=False)
    model.quantization = qcfg
    return model.eval()


# ---------------------------------------------------------------------------- sizes
def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each shared tensor counted once (what sits in memory)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------- CLI
@dataclass
class QuantizeConfig:
    model: str = field("", help="model directory (HF layout) to quantize")
    bits: int = field(8, help="8: int8 per output channel; 4: int4 per group (embedding and head stay int8)")
    group_size: int = field(64, help="int4 group along the input dimension (32, 64, 128 or 256)")
    out: str = field("", help="directory to write: config.json with quantization_config, safetensors, tokenizer")


def run(cfg: QuantizeConfig) -> int:
    check_paths(cfg.model, cfg.out)
    check_bits(cfg.bits, cfg.group_size)
    model = load_float(cfg.model)
    before = weight_bytes(model)
    quantize_model(model, cfg.bits, cfg.group_size)
    save_with_tokenizer(model, cfg.model, cfg.out)
    size = sum(f.stat().st_size for f in Path(cfg.out).glob("*.safetensors"))
    print(
        f"wrote {cfg.out}: int{cfg.bits}"
        + (f" group {cfg.group_size}" if cfg.bits == 4 else "")
        + f", weights {before / 2**20:.1f} MiB -> {weight_bytes(model) / 2**20:.1f} MiB in memory, "
        f"model.safetensors {size / 2**20:.1f} MiB"
    )
    return 0
