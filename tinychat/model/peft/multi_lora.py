"""Several LoRA adapters over one shared base, served in the same batch (multi-LoRA, as in S-LoRA, Punica, vLLM).

Why: merging an adapter into the weights (lora.merge_lora) gives one model per adapter, so a server with four
fine-tunes would hold four copies of the base and could batch only requests of the same one. Here the base
weights stay shared and unmerged; each targeted projection keeps every adapter's A and B stacked, and each
row of a forward call adds the update of its own adapter: y = W x + b + s_k B_k A_k x for the row's adapter k
(slot 0 is the base: no update). One forward then serves a batch that mixes adapters and base rows.

Which adapter each row uses is passed explicitly to the forward call (`Model.forward(..., adapters=rows)`,
an `AdapterRows` built by the caller, like the attention metadata), never kept in the modules between calls.
Two ways to compute the batched update, the same numbers (tested) and a choice per server:
  * "mask": x A_all for all n adapters at once (one matmul, n*r columns), zero the columns of the other
    adapters with a per-row mask, then one matmul with B_all. Fewest kernels; the work grows with n.
  * "gather": each row's A_k and B_k gathered from the stacks (index_select), two batched matmuls (bgmv,
    Punica's kernel in plain PyTorch). Work independent of n, but a copy of the adapters per row.
A call whose rows all use the same adapter (a single sequence, a prefill) takes that adapter's two plain
matmuls, and a call of base rows only takes none (the caller passes no `AdapterRows`).

Adapters are read from PEFT's LoRA format (lora.read_adapter_config, common.read_adapter_weights); ranks
may differ (each is zero-padded to the largest), as may their targets (a projection an adapter does not
target holds zeros for it). DoRA, modules_to_save and the other methods are refused: serve them merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tinychat.errors import UserError
from tinychat.model.peft import lora
from tinychat.model.peft.common import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_weights

Mode = Literal["mask", "gather"]
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # projections Model.fuse_projections joins
MODES = ("mask", "gather")


@dataclass
class AdapterRows:
    """Which adapter each row of one forward call uses (slot 0: the base), built before the call."""

    index: torch.Tensor  # (B,) long: the slot of each row
    uniform: int | None  # every row uses this slot (plain matmuls); None: a mixed batch
    mode: Mode
    n: int  # adapters served (slots 1..n)
    dtype: torch.dtype  # the masks' dtype (the activations')
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)  # memo of this call only

    def mask(self, width: int) -> torch.Tensor:
        """(B, 1, width): 1.0 on the columns of each row's adapter, the columns adapter-major (n blocks)."""
        m = self._masks.get(width)
        if m is None:
            col = torch.arange(width, device=self.index.device) // (width // self.n) + 1  # each column's slot
            m = self._masks[width] = (col[None, :] == self.index[:, None]).to(self.dtype)[:, None, :]
        return m


class MultiLoRALinear(nn.Module):
    """A base projection (its own weight and bias, shared) with n LoRA adapters stacked beside it.

    lora_A (n + 1, r, in) and lora_B (n + 1, out, r), slot 0 all zeros and each adapter's scale folded into
    its B, kept as non-persistent buffers: the module's state dict is the base's, unchanged. Without `rows`
    it is the base projection; `delta(x, rows)` is the per-row update alone, and with `group` (projections of
    the same input whose outputs sit side by side: fused q/k/v, gate/up) the update of all of them at once."""

    def __init__(self, base: nn.Linear, n: int, rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.n, self.rank = base.in_features, base.out_features, n, rank
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: names and fusion unchanged
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A: torch.Tensor
        self.lora_B: torch.Tensor
        self.register_buffer("lora_A", torch.zeros(n + 1, rank, self.in_features, device=dev, dtype=dt), False)
        self.register_buffer("lora_B", torch.zeros(n + 1, self.out_features, rank, device=dev, dtype=dt), False)
        self.has = [False] * (n + 1)  # slots whose adapter targets this projection
        self._stacks: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}  # per group, built on first use

    @torch.no_grad()
    def set_adapter(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Put one adapter's A (r_k, in) and B (out, r_k) into `slot` (1..n), zero-padded to the stack's rank."""
        r = a.shape[0]
        assert 1 <= slot <= self.n and r <= self.rank
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r] = a.to(self.lora_A)
        self.lora_B[slot, :, :r] = (b.float() * scaling).to(self.lora_B)
        self.has[slot] = True
        self._stacks.clear()

    def stacks(self, group: tuple[MultiLoRALinear, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The group's adapters side by side: A (n + 1, G*r, in); B_all (out_total, n*G*r), adapter-major
        columns, block-diagonal within each adapter (the "mask" mode's); B (n + 1, G*r, out_total) per slot."""
        key = tuple(id(m) for m in group)
        if key not in self._stacks:
            n, R, G = self.n, self.rank, len(group)
            a = torch.cat([m.lora_A for m in group], dim=1)  # (n + 1, G*r, in)
            outs = [m.out_features for m in group]
            b = torch.zeros(n + 1, G * R, sum(outs), device=a.device, dtype=a.dtype)
            row = 0
            for g, m in enumerate(group):
                b[:, g * R : (g + 1) * R, row : row + outs[g]] = m.lora_B.transpose(1, 2)
                row += outs[g]
            b_all = b[1:].reshape(n * G * R, -1).t().contiguous()  # (out_total, n*G*r)
            self._stacks[key] = (a, b_all, b)
        return self._stacks[key]

    def delta(
        self, x: torch.Tensor, rows: AdapterRows, group: tuple[MultiLoRALinear, ...] | None = None
    ) -> torch.Tensor | None:
        """The update (B, T, out_total) of each row's adapter for x (B, T, in); None when there is none to add."""
        group = group or (self,)
        a, b_all, b = self.stacks(group)
        if rows.uniform is not None:
            k = rows.uniform
            if not any(m.has[k] for m in group):
                return None
            return F.linear(F.linear(x, a[k]), b[k].t())  # (B, T, G*r) -> (B, T, out_total)
        if rows.mode == "mask":
            h = F.linear(x, a[1:].view(-1, self.in_features)) * rows.mask(b_all.shape[1])  # (B, T, n*G*r)
            return F.linear(h, b_all)
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        h = torch.bmm(x.to(dt), a.index_select(0, rows.index).transpose(1, 2).to(dt))  # (B, T, G*r)
        return torch.bmm(h, b.index_select(0, rows.index).to(dt))  # (B, T, out_total)

    def forward(self, x: torch.Tensor, rows: AdapterRows | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        d = None if rows is None else self.delta(x, rows)
        return y if d is None else y + d.to(y.dtype)


@dataclass
class AdapterSet:
    """The adapters a model serves: names in slot order (slot i + 1), their directories, the stacked rank."""

    names: list[str]
    dirs: list[Path]
    rank: int
    mode: Mode = "mask"

    def slot(self, name: str) -> int:
        """The slot of an adapter name ("" is the base, slot 0); KeyError for an unknown name."""
        return 0 if name == "" else self.names.index(name) + 1

    def rows(self, slots: list[int], device: torch.device, dtype: torch.dtype) -> AdapterRows | None:
        """The forward call's `adapters` argument for rows using `slots`; None when every row is the base."""
        first = slots[0]
        uniform = first if all(s == first for s in slots) else None
        if uniform == 0:
            return None
        return AdapterRows(torch.tensor(slots, device=device), uniform, self.mode, len(self.names), dtype)


def _read(path: Path) -> tuple[lora.LoraConfig, dict[str, torch.Tensor]]:
    """One LoRA adapter directory's config and tensors, refused (UserError) where it is not a plain LoRA."""
    d = lora.read_adapter_config(path)
    source = str(path / ADAPTER_CONFIG)
    if d["peft_type"] != "LORA":
        raise UserError(
            f"{source}: only LoRA adapters can share a batch, this one is {d['peft_type']}; serve it alone."
        )
    if d.get("use_dora"):
        raise UserError(f"{source}: DoRA adapters cannot share a batch; merge it (tinychat merge) and serve it alone.")
    if d.get("modules_to_save"):
        raise UserError(f"{source}: it replaces whole modules ({d['modules_to_save']}); serve it merged and alone.")
    cfg = lora.config_from_adapter(d, source)
    return cfg, read_adapter_weights(path)


def _projections(model: nn.Module) -> dict[str, nn.Module]:
    """Every projection an adapter may target, by its HF path (model.layers.<i>.self_attn.q_proj, ...)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for sub in lora.TARGETS.values():
            parent_name, leaf = sub.split(".")
            parent = getattr(layer, parent_name)
            if hasattr(parent, leaf):  # a mixture of experts has no mlp.gate_proj: its experts are not served
                out[f"model.layers.{i}.{sub}"] = getattr(parent, leaf)
    return out


def serve_adapters(model: nn.Module, adapters: dict[str, str | Path], mode: Mode = "mask") -> AdapterSet:
    """Wrap the projections any of `adapters` ({name: PEFT LoRA directory}) targets in MultiLoRALinear and
    load each adapter into its slot; returns the AdapterSet the engine selects from. The base is unchanged
    for rows of slot 0. Every problem (a missing or non-LoRA directory, a tensor the base has no projection
    for, a shape that does not match) is one UserError naming the file."""
    if mode not in MODES:
        raise UserError(f"the adapter batching mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if not adapters:
        raise UserError("serve_adapters needs at least one adapter.")
    loaded = {name: (Path(p), *_read(Path(p))) for name, p in adapters.items()}
    rank = max(cfg.rank for _, cfg, _ in loaded.values())
    projs = _projections(model)
    wanted: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
    for slot, (path, cfg, tensors) in enumerate(loaded.values(), 1):
        wfile = path / ADAPTER_WEIGHTS
        pairs = [k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")]
        if not pairs:
            raise UserError(f"{wfile} holds no lora_A/lora_B tensors.")
        for prefix in pairs:
            mod = projs.get(prefix)
            b = tensors.get(prefix + ".lora_B.weight")
            if mod is None:
                raise UserError(
                    f"{wfile}: tensor {prefix}.lora_A.weight does not match any projection of the base model."
                )
            if b is None:
                raise UserError(f"{wfile}: tensor {prefix}.lora_B.weight is missing.")
            a = tensors[prefix + ".lora_A.weight"]
            if not isinstance(mod, nn.Linear | MultiLoRALinear):
                raise UserError(f"{wfile}: {prefix} of the base is not a float linear layer (a quantized base?).")
            want = ((cfg.rank, mod.in_features), (mod.out_features, cfg.rank))
            if (tuple(a.shape), tuple(b.shape)) != want:
                raise UserError(
                    f"{wfile}: {prefix} has A {tuple(a.shape)} and B {tuple(b.shape)}, expected {want[0]} and "
                    f"{want[1]} (is this the base the adapter was trained on?)."
                )
            wanted.setdefault(prefix, []).append((slot, a, b, cfg.scaling))
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise UserError("this model already serves adapters; load them all in one serve_adapters call.")
    for prefix in list(wanted):  # wrap whole fused groups (q/k/v, gate/up): one update for the fused matmul
        layer, leaf = prefix.rsplit(".", 1)
        for group in FUSED:
            if leaf in group:
                for other in group:
                    if f"{layer}.{other}" in projs:
                        wanted.setdefault(f"{layer}.{other}", [])
    for prefix, items in wanted.items():
        parent_path, leaf = prefix.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        wrapped = MultiLoRALinear(getattr(parent, leaf), len(loaded), rank)
        for slot, a, b, s in items:
            wrapped.set_adapter(slot, a, b, s)
        setattr(parent, leaf, wrapped)
    return AdapterSet(list(loaded), [p for p, _, _ in loaded.values()], rank, mode)
