"""Several LoRA adapters over one shared base, served in the same batch (multi-LoRA, as in S-LoRA, Punica, vLLM).

Why: merging an adapter into the weights (lora.merge_lora) gives one model per adapter, so a server with four
fine-tunes would hold four copies of the base and could batch only requests of the same one. Here the base
weights stay shared and unmerged; each targeted projection keeps every adapter's A and B stacked, and each
row of a forward call adds the update of its own adapter: y = W x + b + s_k B_k A_k x for the row's adapter k
(slot 0 is the base: no update). One forward then serves a batch that mixes adapters and base rows.

Which adapter each row uses is passed explicitly to the forward call (`Model.forward(..., adapters=rows)`,
an `AdapterRows` built by the caller, like the attention metadata), never kept in the modules between calls.
Three ways to compute the batched update, the same numbers (tested) and a choice per server:
  * "mask": x A_all for all n adapters at once (one matmul, n*r columns), zero the columns of the other
    adapters with a per-row mask, then one matmul with B_all. Fewest kernels; the work grows with n.
  * "gather": each row's A_k and B_k gathered from the stacks (index_select), two batched matmuls (BGMV,
    Punica's kernel in plain PyTorch). Work independent of n, but a copy of the adapters per row.
  * "group": rows ordered by adapter (the engine sorts its decode batch), two plain matmuls per run of
    rows with one adapter (PEFT's mixed-batch inference, S-LoRA's grouping). Kernels grow with the runs.
A call whose rows all use the same adapter (a single sequence, a prefill) takes that adapter's two plain
matmuls, and a call of base rows only takes none (the caller passes no `AdapterRows`). The projections a
fused matmul joins (q/k/v, gate/up) are wrapped together and updated as one group (Stacks).

Adapters are read from PEFT's LoRA format (lora.read_adapter_config, common.read_adapter_weights); ranks
may differ (each is zero-padded to the largest), as may their targets (a projection an adapter does not
target holds zeros for it). DoRA, modules_to_save and the other methods are refused: serve them merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from tinychat.errors import UserError
from tinychat.model.peft import lora
from tinychat.model.peft.common import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_weights

Mode = Literal["mask", "gather", "group"]
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # projections Model.fuse_projections joins
MODES: tuple[Mode, ...] = get_args(Mode)


@dataclass
class AdapterRows:
    """Which adapter each row of one forward call uses (slot 0: the base), built before the call."""

    index: torch.Tensor  # (B,) long: the slot of each row
    uniform: int | None  # every row uses this slot (plain matmuls); None: a mixed batch
    mode: Mode
    n: int  # adapters served (slots 1..n)
    dtype: torch.dtype  # the masks' dtype (the activations')
    runs: list[tuple[int, int, int]]  # (slot, first row, end row) of each run of rows with the same adapter
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)  # memo of this call only

    def mask(self, width: int) -> torch.Tensor:
        """(B, 1, width): 1.0 on the columns of each row's adapter (Stacks.a_all: n blocks, adapter-major)."""
        m = self._masks.get(width)
        if m is None:
            col = torch.arange(width, device=self.index.device) // (width // self.n) + 1  # each column's slot
            m = self._masks[width] = (col[None, :] == self.index[:, None]).to(self.dtype)[:, None, :]
        return m


@dataclass
class Stacks:
    """A group's adapters (projections of one input, outputs side by side) in the layouts the batchings read.
    Within a slot the group's B is block-diagonal (zeros outside each projection's own outputs): one matmul
    for the group costs a few wasted multiplies, and far fewer kernels than one per projection."""

    a_t: torch.Tensor  # (n + 1, in, G*r): each slot's A, transposed (gather)
    b: torch.Tensor  # (n + 1, G*r, out_total): each slot's B (gather)
    a_all: torch.Tensor  # (in, n*G*r): slots 1..n side by side, adapter-major (mask)
    b_all: torch.Tensor  # (n*G*r, out_total) (mask)
    a_k: list[torch.Tensor]  # a_t[k] and b[k] per slot, as ready views (uniform batches, group)
    b_k: list[torch.Tensor]


def _as(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in like's dtype; no call at all when it is already (a decode step counts its kernels)."""
    return t if t.dtype == like.dtype else t.to(like.dtype)


class MultiLoRALinear(nn.Module):
    """A base projection (its own weight and bias, shared) with n LoRA adapters stacked beside it.

    lora_A (n + 1, r, in) and lora_B (n + 1, out, r), slot 0 all zeros and each adapter's scale folded into
    its B, kept as non-persistent buffers: the module's state dict is the base's, unchanged. Without `rows`
    it is the base projection; `add_to(y, x, rows)` adds the per-row update to a base output, and with `group`
    (projections of the same input whose outputs sit side by side: fused q/k/v, gate/up) that of all of them."""

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
        self._stacks: dict[tuple[int, ...], Stacks] = {}  # per group, built on first use

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

    @torch.no_grad()
    def clear_adapter(self, slot: int) -> None:
        """Empty `slot` (an adapter unloaded): zeros, so a row of that slot would get no update."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.has[slot] = False
        self._stacks.clear()

    def stacks(self, group: tuple[MultiLoRALinear, ...]) -> Stacks:
        """The group's adapters in the layouts of `Stacks` (built on first use, kept until an adapter changes)."""
        key = tuple(id(m) for m in group)
        if key not in self._stacks:
            n, R, G = self.n, self.rank, len(group)
            outs = [m.out_features for m in group]
            b = torch.zeros(n + 1, G * R, sum(outs), device=self.lora_A.device, dtype=self.lora_A.dtype)
            start = 0
            for g, m in enumerate(group):
                b[:, g * R : (g + 1) * R, start : start + outs[g]] = m.lora_B.transpose(1, 2)
                start += outs[g]
            a_t = torch.cat([m.lora_A for m in group], dim=1).transpose(1, 2).contiguous()  # (n + 1, in, G*r)
            a_all = a_t[1:].permute(1, 0, 2).reshape(self.in_features, n * G * R).contiguous()
            self._stacks[key] = Stacks(a_t, b, a_all, b[1:].reshape(n * G * R, -1), list(a_t), list(b))
        return self._stacks[key]

    def add_to(
        self, y: torch.Tensor, x: torch.Tensor, rows: AdapterRows, group: tuple[MultiLoRALinear, ...] | None = None
    ) -> torch.Tensor:
        """y (B, T, out_total), the base output of the group (default: this projection alone) for x (B, T, in),
        plus each row's adapter update, in place (the second matmul and the add are one addmm_/baddbmm_).
        y must be contiguous (a fresh matmul output). Few kernels on purpose: a decode step of a small model
        is mostly per-kernel overhead."""
        group = group or (self,)
        st = self.stacks(group)
        B, T, _ = x.shape
        x2, y2 = x.reshape(B * T, -1), y.view(B * T, -1)
        if rows.uniform is None and rows.mode == "mask":
            h = torch.mm(x2, _as(st.a_all, x))  # (B*T, n*G*r): every adapter's columns
            h.view(B, T, -1).mul_(rows.mask(h.shape[-1]))  # keep those of the row's own adapter
            y2.addmm_(_as(h, y), _as(st.b_all, y))
        elif rows.uniform is None and rows.mode == "gather":
            h = torch.bmm(x, _as(st.a_t.index_select(0, rows.index), x))  # (B, T, G*r)
            y.baddbmm_(_as(h, y), _as(st.b.index_select(0, rows.index), y))  # B picked: (B, G*r, out_total)
        else:  # one adapter per run of rows: every row alike, or "group" (the engine orders rows by adapter)
            for k, s, e in [(rows.uniform, 0, B)] if rows.uniform is not None else rows.runs:
                if any(m.has[k] for m in group):
                    h = torch.mm(x2[s * T : e * T], _as(st.a_k[k], x))  # (rows, G*r)
                    y2[s * T : e * T].addmm_(_as(h, y), _as(st.b_k[k], y))
        return y

    def forward(self, x: torch.Tensor, rows: AdapterRows | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if rows is None else self.add_to(y, x, rows)


@dataclass
class Prepared:
    """One adapter read and checked against the model (any thread), ready to go into a slot (`AdapterSet.install`)."""

    name: str
    path: Path
    rank: int
    updates: list[tuple[str, torch.Tensor, torch.Tensor, float]]  # (projection path, A, B, scaling)


@dataclass
class AdapterSet:
    """The adapters a model serves: a name per slot 1..capacity (None: a free slot), their directories, the
    stacked rank. Slots change only between engine steps (`install`/`unload`, on the engine thread); `loads`
    numbers each slot's loads, so a request admitted under one load never runs with the next one's weights
    and the prefix cache never mixes their keys. Other threads read `index`, a snapshot {name: (slot, load,
    dir)} that install/unload replace whole (one reference assignment), never the lists being changed."""

    names: list[str | None]
    dirs: list[Path | None]
    rank: int
    mode: Mode = "mask"
    modules: dict[str, MultiLoRALinear] = field(default_factory=dict)  # projection path -> its wrapper
    loads: list[int] = field(default_factory=list)  # per slot 1..capacity: the load it holds (0: none)
    updatable: bool = False  # adapters may be loaded and unloaded while serving
    index: dict[str, tuple[int, int, Path]] = field(default_factory=dict)
    _next_load: int = 0

    def __post_init__(self) -> None:
        if not self.loads:
            self.loads = [self._new_load() if n else 0 for n in self.names]
        self._publish()

    def _new_load(self) -> int:
        self._next_load += 1
        return self._next_load

    def _publish(self) -> None:
        self.index = {n: (i + 1, self.loads[i], d) for i, (n, d) in enumerate(zip(self.names, self.dirs)) if n and d}

    @property
    def served(self) -> list[str]:
        """The names served now, in slot order."""
        return list(self.index)

    def slot(self, name: str) -> int:
        """The slot of an adapter name ("" is the base, slot 0); KeyError for an unknown name."""
        return 0 if name == "" else self.index[name][0]

    def load_id(self, slot: int) -> int:
        """Which load slot `slot` holds now (0: the base, or a free slot); engine thread."""
        return 0 if slot == 0 else self.loads[slot - 1]

    def install(self, p: Prepared) -> int:
        """Put a prepared adapter into a free slot (engine thread, between steps); returns the slot."""
        if p.name in self.index:
            raise UserError(f"an adapter named {p.name!r} is already served; unload it first or pick another name.")
        if None not in self.names:
            raise UserError(f"all {len(self.names)} adapter slots are in use (--max_adapters); unload one first.")
        slot = self.names.index(None) + 1
        for m in self.modules.values():  # every module: a fused group's stacks live in its first projection
            m.clear_adapter(slot)
        for prefix, a, b, scaling in p.updates:
            self.modules[prefix].set_adapter(slot, a, b, scaling)
        self.names[slot - 1], self.dirs[slot - 1], self.loads[slot - 1] = p.name, p.path, self._new_load()
        self._publish()
        return slot

    def unload(self, name: str) -> int:
        """Free the slot of `name` (engine thread, between steps; the caller checks nothing still uses it)."""
        slot = self.slot(name)
        for m in self.modules.values():
            m.clear_adapter(slot)
        self.names[slot - 1], self.dirs[slot - 1], self.loads[slot - 1] = None, None, 0
        self._publish()
        return slot

    def prepare(self, name: str, path: str | Path) -> Prepared:
        """Read the LoRA adapter at `path` and check it against the served projections and rank (any thread)."""
        p = Path(path)
        cfg, tensors = _read(p)
        if cfg.rank > self.rank:
            raise UserError(
                f"{p / ADAPTER_CONFIG}: rank {cfg.rank} is above this server's {self.rank} (--max_adapter_rank)."
            )
        return Prepared(name, p, cfg.rank, _updates(p, cfg, tensors, self.modules))

    def rows(self, slots: list[int], device: torch.device, dtype: torch.dtype) -> AdapterRows | None:
        """The forward call's `adapters` argument for rows using `slots`; None when every row is the base."""
        first = slots[0]
        uniform = first if all(s == first for s in slots) else None
        if uniform == 0:
            return None
        runs, start = [], 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[start]:
                runs.append((slots[start], start, i))
                start = i
        index = torch.tensor(slots, device=device)
        return AdapterRows(index, uniform, self.mode, len(self.names), dtype, [r for r in runs if r[0]])


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
    return lora.config_from_adapter(d, source), read_adapter_weights(path)


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


def _updates(
    path: Path, cfg: lora.LoraConfig, tensors: dict[str, torch.Tensor], projs: dict[str, nn.Module]
) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """(projection path, A, B, scaling) of each update in one adapter's tensors, checked against `projs`."""
    wfile = path / ADAPTER_WEIGHTS
    pairs = [k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")]
    if not pairs:
        raise UserError(f"{wfile} holds no lora_A/lora_B tensors.")
    stray = sorted(set(tensors) - {f"{p}.lora_{ab}.weight" for p in pairs for ab in "AB"})
    if stray:
        raise UserError(f"{wfile}: tensor {stray[0]} is not a LoRA update of a projection; serve it merged, alone.")
    out = []
    for prefix in pairs:
        mod = projs.get(prefix)
        b = tensors.get(prefix + ".lora_B.weight")
        if mod is None:
            raise UserError(f"{wfile}: tensor {prefix}.lora_A.weight does not match any projection of the base model.")
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
        out.append((prefix, a, b, cfg.scaling))
    return out


def serve_adapters(
    model: nn.Module,
    adapters: dict[str, str | Path],
    mode: Mode = "mask",
    capacity: int = 0,
    max_rank: int = 0,
) -> AdapterSet:
    """Wrap the projections any of `adapters` ({name: PEFT LoRA directory}) targets in MultiLoRALinear and
    load each adapter into its slot; returns the AdapterSet the engine selects from. The base is unchanged
    for rows of slot 0. Every problem (a missing or non-LoRA directory, a tensor the base has no projection
    for, a shape that does not match) is one UserError naming the file.

    `capacity` > 0 keeps that many slots (free ones beyond `adapters`) of rank max(`max_rank`, the largest
    adapter's) on *every* projection an adapter may target, so adapters can be loaded while serving
    (AdapterSet.prepare/install; vLLM's --max-loras and --max-lora-rank)."""
    if mode not in MODES:
        raise UserError(f"the adapter batching mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if not adapters and capacity <= 0:
        raise UserError("serve_adapters needs at least one adapter, or room for some (capacity).")
    if capacity and len(adapters) > capacity:
        raise UserError(f"{len(adapters)} adapters do not fit in {capacity} slots (--max_adapters); raise it.")
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise UserError("this model already serves adapters; load them all in one serve_adapters call.")
    loaded = {name: (Path(p), *_read(Path(p))) for name, p in adapters.items()}
    rank = max([max_rank, *(cfg.rank for _, cfg, _ in loaded.values())])
    projs = _projections(model)
    wanted: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
    for slot, (path, cfg, tensors) in enumerate(loaded.values(), 1):
        for prefix, a, b, s in _updates(path, cfg, tensors, projs):
            wanted.setdefault(prefix, []).append((slot, a, b, s))
    if capacity:  # room for adapters loaded later: every float projection they may target
        for prefix, mod in projs.items():
            if isinstance(mod, nn.Linear):
                wanted.setdefault(prefix, [])
    for prefix in list(wanted):  # wrap whole fused groups (q/k/v, gate/up): one update for the fused matmul
        layer, leaf = prefix.rsplit(".", 1)
        for group in FUSED:
            if leaf in group:
                for other in group:
                    if isinstance(projs.get(f"{layer}.{other}"), nn.Linear):
                        wanted.setdefault(f"{layer}.{other}", [])
    n = max(capacity, len(loaded))
    modules = {}
    for prefix, items in wanted.items():
        parent_path, leaf = prefix.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        wrapped = MultiLoRALinear(getattr(parent, leaf), n, rank)
        for slot, a, b, s in items:
            wrapped.set_adapter(slot, a, b, s)
        setattr(parent, leaf, wrapped)
        modules[prefix] = wrapped
    names: list[str | None] = [*loaded, *[None] * (n - len(loaded))]
    dirs: list[Path | None] = [*(p for p, _, _ in loaded.values()), *[None] * (n - len(loaded))]
    return AdapterSet(names, dirs, rank, mode, modules, updatable=capacity > 0)
