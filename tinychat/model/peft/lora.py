"""LoRA and DoRA adapters: a frozen base model plus trainable low-rank updates, in PEFT's file format.

Why LoRA: fine-tuning every weight needs optimiser state for every weight (3x the model in AdamW); a
rank-r update W + (alpha/r) B A of the attention and MLP projections trains ~1% of the parameters, the
base stays shared between stages (DPO/PPO use the base itself as the frozen reference, adapters off), and
the result is a file of a few hundred kilobytes. B starts at zero, so step 0 is exactly the base model.

Why PEFT's format (adapter_model.safetensors + adapter_config.json, keys
`base_model.model.<module>.lora_A.weight`): `peft.PeftModel.from_pretrained(base, dir)`, vLLM and
llama.cpp's converter open it as is, and tinychat opens adapters PEFT trained.

Names: a wrapped projection keeps its own parameter names (`...q_proj.weight`) and adds
`...q_proj.lora_A.weight` / `...q_proj.lora_B.weight`, so a checkpoint of a LoRA run still reads as the
base model plus extra tensors, and `merge_state` turns it into plain HF weights.

QLoRA (Dettmers et al. 2023): the same adapters over a frozen int8/int4 base (tinychat's QuantLinear,
model/compress/quant.py); the integer kernels have no derivative, so QuantLinear's own `IntMatmul` gives the
backward pass dx = dy W from the dequantized weight. The adapter file is plain LoRA: it applies to the float base too.

DoRA (Liu et al. 2024, PEFT's `use_dora`): the merged weight W + sBA is split into a direction, normalised
per output row, and a trained magnitude m (`lora_magnitude_vector`, initialised to the rows' norms):
W' = m / ||W + sBA|| * (W + sBA). The norm is detached in the backward pass, as in the paper and PEFT.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.model.compress.quant import QuantLinear
from tinychat.model.peft.common import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    base_path,
    copy_into,
    read_adapter_weights,
    replace_modules,
    switched_off,
    write_adapter,
)

# short target names -> module path inside a block (HF's names, as PEFT's target_modules uses them)
TARGETS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def target_leaves(targets: list[str], flag: str) -> list[str]:
    """Short target names (`q v`, `q,v`, `all`, or HF's `q_proj`) as HF leaf module names; UserError if unknown."""
    names = [t.strip() for item in targets for t in item.split(",") if t.strip()]
    names = list(TARGETS) if names == ["all"] else names
    out = []
    for t in names:
        short = t.removesuffix("_proj")
        if short not in TARGETS:
            raise UserError(f"{flag}: unknown target {t!r}; use q, k, v, o, gate, up, down or all.")
        out.append(TARGETS[short].split(".")[-1])
    return out


@dataclass
class LoraConfig:
    rank: int = field(0, help="LoRA rank r (0 = train every weight, no adapter)")
    alpha: float = field(16.0, help="the update is scaled by alpha / rank")
    dropout: float = field(0.0, help="dropout on the adapter's input")
    targets: list[str] = field(
        ["q", "k", "v", "o", "gate", "up", "down"], help="projections to adapt: q,k,v,o,gate,up,down or all"
    )
    modules_to_save: list[str] = field(
        [], help="whole modules trained and saved with the adapter (PEFT's modules_to_save), e.g. embed_tokens lm_head"
    )
    use_dora: bool = field(False, help="DoRA: a trained magnitude per output row on top of the update")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def leaf_names(self) -> list[str]:
        """The targets as HF leaf module names (q -> q_proj); a UserError names an unknown one."""
        out = target_leaves(self.targets, "--lora.targets")
        if self.rank < 0 or (self.rank and not out):
            raise UserError("--lora.rank must be >= 0 and --lora.targets must name at least one projection.")
        return out


class LoRALinear(nn.Module):
    """A linear layer W x + b with a low-rank update (alpha/r) B A x; W and b are the base's own (frozen).
    Over a QuantLinear (QLoRA) the integer module is kept as `quant` and W is its dequantized weight."""

    def __init__(
        self,
        base: nn.Linear | QuantLinear,
        rank: int,
        scaling: float,
        dropout: float = 0.0,
        dora: bool = False,
        gated: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quant: QuantLinear | None = None
        if isinstance(base, QuantLinear):
            self.quant, self.bias = base, None  # its integers are buffers; its bias stays inside it
            base.requires_grad_(False)
            dev, dt = base.scale.device, torch.float32
        else:
            self.weight = base.weight  # the same Parameter: names and sharding are unchanged
            self.bias = base.bias
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
            dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default
        nn.init.zeros_(self.lora_B.weight)  # step 0 == the base model
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.lora_magnitude_vector: nn.Parameter | None = None
        # UniPELT (model/peft/unipelt.py): the update is scaled per token by sigmoid(gate(x)), an input-dependent
        # weight that cannot be merged into W
        self.lora_gate = nn.Linear(self.in_features, 1, device=dev, dtype=dt) if gated else None
        if gated:
            nn.init.normal_(self.lora_gate.weight, std=0.02)  # as the adapters library starts its gates
            nn.init.zeros_(self.lora_gate.bias)
        if dora:  # m starts at the rows' norms, so step 0 is still the base model
            self.lora_magnitude_vector = nn.Parameter(self.base_weight().detach().float().norm(dim=1).to(dt))  # (out,)

    def base_weight(self) -> torch.Tensor:
        """W (out, in): the base's own Parameter, or the dequantized integers under QLoRA."""
        return self.weight if self.quant is None else self.quant.dequantized()

    def base_bias(self) -> torch.Tensor | None:
        return self.bias if self.quant is None else self.quant.bias

    def update(self) -> torch.Tensor:
        """The dense update s B A (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def dora_scale(self) -> torch.Tensor:
        """m / ||W + sBA|| per output row (out,), the norm detached (PEFT and the paper)."""
        assert self.lora_magnitude_vector is not None
        w = self.base_weight()
        norm = (w + self.update().to(w.dtype)).norm(dim=1).detach()
        return self.lora_magnitude_vector / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias) if self.quant is None else self.quant(x)
        if not self.enabled:
            return y
        xd = self.dropout(x)
        lora = self.lora_B(self.lora_A(xd)) * self.scaling
        if self.lora_gate is not None:
            lora = lora * torch.sigmoid(self.lora_gate(x))  # (..., 1): one gate per token
        if self.lora_magnitude_vector is None:
            return y + lora
        # DoRA: m/||W'|| (W x + s B A x) + b, written as PEFT writes it (base output plus a correction)
        scale = self.dora_scale().to(y.dtype)
        bias = self.base_bias()
        base = y - bias if bias is not None else y
        if self.training and not isinstance(self.dropout, nn.Identity):
            base = F.linear(xd, self.base_weight())
        return y + (scale - 1) * base + scale * lora

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + (alpha/r) B A (DoRA: rescaled per row; the base's weight is untouched;
        QLoRA: a float layer from the dequantized integers)."""
        if self.lora_gate is not None:
            raise UserError("a gated LoRA update (UniPELT) depends on the input and cannot be merged into the weights.")
        bias = self.base_bias()
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        with torch.no_grad():
            base = self.base_weight()
            w = base.float() + self.update().float()
            if self.lora_magnitude_vector is not None:
                w = w * (self.lora_magnitude_vector.float() / w.norm(dim=1))[:, None]
            lin.weight = nn.Parameter(w.to(base.dtype))
            if bias is not None:
                lin.bias = nn.Parameter(bias.detach().clone())
        return lin


def _targets(model: nn.Module, leaf_names: list[str]) -> Iterator[tuple[nn.Module, str, nn.Linear | QuantLinear]]:
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            linear = isinstance(child, nn.Linear | QuantLinear)
            if child_name in leaf_names and linear and ".layers." in f".{name}.":
                yield mod, child_name, child


def apply_lora(model: nn.Module, cfg: LoraConfig, gated: bool = False, freeze: bool = True) -> int:
    """Freeze every parameter of `model` (unless `freeze` is False: UniPELT's other parts were attached first)
    and wrap its target projections in LoRALinear (`gated`: UniPELT's per-token gate); returns how many.

    Heads an objective adds (a reward score, a value head) are unfrozen by the objective afterwards.
    """
    leaves = cfg.leaf_names()
    if freeze:
        train_only(model, module_names(cfg.modules_to_save), "--lora.modules_to_save")
    n = 0
    for parent, name, lin in _targets(model, leaves):
        setattr(parent, name, LoRALinear(lin, cfg.rank, cfg.scaling, cfg.dropout, cfg.use_dora, gated))
        n += 1
    if n == 0:
        raise UserError(f"--lora.targets {','.join(cfg.targets)} matched no projection of this model.")
    return n


def module_names(items: list[str]) -> list[str]:
    """Module names from a flag given as `a b` or `a,b`."""
    return [t.strip() for item in items for t in item.split(",") if t.strip()]


def matches(path: str, name: str) -> bool:
    """PEFT's rule for modules_to_save: a module matches a name if its dotted path is it or ends with it."""
    return path == name or path.endswith("." + name)


def train_only(model: nn.Module, names: list[str], flag: str = "module names") -> int:
    """Freeze every parameter of `model` except those of the modules `names` match; returns how many train.

    Chinese-LLaMA's stage 1 is train_only(model, ["embed_tokens", "lm_head"]): the new rows are learnt
    while the transformer stays as it was. With tied embeddings both names are the same matrix.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        found = [m for path, m in model.named_modules() if matches(path, name)]
        if not found:
            raise UserError(f"{flag}: this model has no module named {name!r} (e.g. embed_tokens, lm_head).")
        for m in found:
            m.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def has_quantized_base(model: nn.Module) -> bool:
    """QLoRA: some adapter sits over integer weights (a quantized base, in memory or loaded)."""
    return any(isinstance(m, LoRALinear) and m.quant is not None for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear with the merged weight, in place; returns the model."""
    return replace_modules(model, LoRALinear, lambda m: m.merged())


def lora_disabled(model: nn.Module) -> contextlib.AbstractContextManager:
    """Run the base model (every adapter off): the frozen reference of DPO/PPO/GRPO at no memory cost."""
    return switched_off(model, (LoRALinear,))


# ---------------------------------------------------------------------------------------- state dicts


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key or ".lora_gate." in key or key.endswith(".lora_magnitude_vector")


def merge_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A LoRA/DoRA model's state dict as plain weights: W + scaling * B @ A (DoRA: rescaled to m per row),
    adapter tensors dropped."""
    if any(".lora_gate." in k for k in state):
        raise UserError("a gated LoRA update (UniPELT) depends on the input and cannot be merged into the weights.")
    out = {k: v for k, v in state.items() if not is_lora_key(k)}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            b = state[prefix + ".lora_B.weight"]
            w = out[prefix + ".weight"]
            merged = w.float() + scaling * (b.float() @ a.float())
            if (m := state.get(prefix + ".lora_magnitude_vector")) is not None:
                merged = merged * (m.float() / merged.norm(dim=1))[:, None]
            out[prefix + ".weight"] = merged.to(w.dtype)
    return out


def adapter_state(state: dict[str, torch.Tensor], extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names; `extra` names whole modules saved too ("score",
    "embed_tokens": PEFT's file holds them under the module's own path, base_model.model.model.embed_tokens.weight)."""
    out = {}
    for k, v in state.items():
        if is_lora_key(k):
            out[PEFT_PREFIX + k] = v.detach().to("cpu").contiguous()
        elif any(matches(k.rpartition(".")[0], e) for e in extra):
            out[PEFT_PREFIX + k] = v.detach().to("cpu").clone()  # a clone: tied weights share storage
    return out


def saved_modules(state: dict[str, torch.Tensor], names: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    """(`names` plus the other name of a tied matrix (embed_tokens <-> lm_head), whether that happened).

    A tied model's adapter carries both: PEFT copies each module it saves, and one trained copy beside one
    stale one would differ; with both saved (and PEFT's ensure_weight_tying) it computes what we trained.
    """
    out = list(names)
    pair = ("embed_tokens", "lm_head")
    emb, head = state.get("model.embed_tokens.weight"), state.get("lm_head.weight")
    # equal values, not shared storage: a gathered (FSDP, CPU-offloaded) state dict holds two copies
    tied = emb is not None and head is not None and emb.shape == head.shape and torch.equal(emb, head)
    tied = tied and any(n in pair for n in names)
    if tied:
        out += [n for n in pair if n not in out]
    return tuple(out), tied


def save_adapter(
    path: str | Path,
    state: dict[str, torch.Tensor],
    cfg: LoraConfig,
    base_model: str | Path,
    task_type: str = "CAUSAL_LM",
    modules_to_save: tuple[str, ...] = (),
) -> None:
    """Write adapter_model.safetensors + adapter_config.json (PEFT's LoRA format) atomically into `path`."""
    modules_to_save, tied = saved_modules(state, (*modules_to_save, *module_names(cfg.modules_to_save)))
    tensors = adapter_state(state, modules_to_save)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_path(base_model),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(set(cfg.leaf_names())),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": cfg.use_dora,
        "modules_to_save": list(modules_to_save) or None,
        "ensure_weight_tying": tied,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    write_adapter(path, config, tensors)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """A LoRA/DoRA adapter_config.json, refused (UserError) where it uses options tinychat does not implement."""
    from tinychat.model.peft.common import read_adapter_config as read_any

    cfg = read_any(path)
    p = Path(path) / ADAPTER_CONFIG
    if cfg["peft_type"] != "LORA":
        return cfg  # another method: its own module checks it
    if cfg.get("fan_in_fan_out"):
        raise UserError(f"{p}: fan_in_fan_out adapters are not supported.")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("layers_to_transform"):
        raise UserError(f"{p}: per-layer rank_pattern/alpha_pattern/layers_to_transform are not supported.")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"{p}: bias={cfg['bias']!r} adapters are not supported (expected none).")
    return cfg


def config_from_adapter(d: dict[str, Any], source: str) -> LoraConfig:
    """The LoraConfig of a PEFT adapter_config.json (target_modules: a list of leaf names or 'all-linear')."""
    targets = d.get("target_modules")
    if targets == "all-linear":
        names = list(TARGETS)
    elif isinstance(targets, list):
        leaf_to_short = {v.split(".")[-1]: k for k, v in TARGETS.items()}
        unknown = [t for t in targets if t not in leaf_to_short]
        if unknown:
            raise UserError(f"{source}: target module {unknown[0]!r} is not a projection tinychat can adapt.")
        names = [leaf_to_short[t] for t in targets]
    else:
        raise UserError(f"{source}: target_modules must be a list of module names, got {targets!r}.")
    try:
        r, alpha = int(d["r"]), float(d.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: not a valid LoRA config ({type(e).__name__}: {e}).") from None
    if r < 1:
        raise UserError(f"{source}: r must be a positive rank, got {r}.")
    if d.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r): express it as an equivalent alpha
        alpha = alpha * math.sqrt(r)
    return LoraConfig(rank=r, alpha=alpha, dropout=0.0, targets=names, use_dora=bool(d.get("use_dora")))


def load_adapter(model: nn.Module, path: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Wrap `model` with the adapter at `path` and load its weights; returns (config, tensors not used).

    Whole modules the adapter carries (PEFT's modules_to_save: trained embeddings and output layer) replace
    the model's own weights of the same names; tensors the model has no parameter for (a reward model's
    `score` when the model has no head yet) are returned, PEFT-prefix stripped, for the caller to place.
    """
    d = read_adapter_config(path)
    if d["peft_type"] != "LORA":
        raise UserError(f"{Path(path) / ADAPTER_CONFIG}: peft_type is {d['peft_type']!r}, expected LORA.")
    cfg = config_from_adapter(d, str(Path(path) / ADAPTER_CONFIG))
    wfile = Path(path) / ADAPTER_WEIGHTS
    tensors = read_adapter_weights(path)
    apply_lora(model, cfg)
    own = dict(model.named_parameters())
    lora, rest = {}, {}
    for name, v in tensors.items():
        name = name.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")  # PEFT's in-memory name
        (lora if is_lora_key(name) else rest)[name] = v
    missing = sorted(k for k in own if is_lora_key(k) and k not in lora)
    if missing:
        raise UserError(f"{wfile}: tensor {missing[0]} is missing ({len(missing)} in all).")
    for name, v in lora.items():
        copy_into(own, name, v, str(wfile))
    unused = {}
    for name, v in rest.items():
        if name not in own:
            unused[name] = v
        elif tuple(v.shape) != tuple(own[name].shape):
            raise UserError(
                f"{wfile}: tensor {name} has shape {tuple(v.shape)}, but the base model's is {tuple(own[name].shape)} "
                "(is this the base the adapter was trained on?)."
            )
        else:
            with torch.no_grad():
                own[name].copy_(v)
    cfg.modules_to_save = list(d.get("modules_to_save") or [])  # after apply_lora: the model stays frozen
    return cfg, unused
