"""Bottleneck adapters PEFT lacks: Houlsby (serial), the parallel adapter and the MAM adapter, in tinychat's format.

- Houlsby et al. 2019 (serial): after each sublayer (attention, MLP) its output h passes through a small
  bottleneck, h + up(relu(down(h))), before the residual add.
- He et al. 2022 (parallel): the bottleneck reads the sublayer's *input* x and its output is added beside the
  sublayer's, sublayer(x) + s * up(relu(down(x))); "Towards a unified view" found this placement better.
- MAM ("mix-and-match", He et al. 2022): prefix tuning at the attention (a few virtual tokens, model/peft/
  prompt.py) plus a parallel adapter at the MLP with a larger bottleneck and scale s = 4.
`up` starts at zero, so step 0 is exactly the base. None of these merge into the weights (relu): they run
unmerged, like the virtual-token methods, and a stage trained with one is an adapter directory.

From outside the model: each adapter is a child module `adapter` of the sublayer it adapts
(`model.layers.0.mlp.adapter.down.weight`; HF names of the base are unchanged) and a forward hook on that
sublayer adds its output, so Attention/MLP code is not touched.

tinychat's format (PEFT has no such peft_type): the same two files as PEFT's. adapter_config.json:
{"peft_type": "HOULSBY" | "PARALLEL" | "MAM", "tinychat_format": 1, "task_type", "base_model_name_or_path",
"adapter_dim": r, "adapter_scale": s, "placement": {"self_attn": "serial"|"parallel", "mlp": ...},
and for MAM PEFT's prefix-tuning fields (num_virtual_tokens, token_dim, num_layers, num_attention_heads)};
adapter_model.safetensors: `base_model.model.model.layers.<i>.<self_attn|mlp>.adapter.<down|up>.<weight|bias>`
(down (r, d_model), up (d_model, r)), and for MAM PEFT's `prompt_embeddings` (n, n_layer * 2 * kv_dim).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinychat.errors import UserError
from tinychat.model.peft import prompt
from tinychat.model.peft.common import (
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    base_path,
    copy_into,
    read_adapter_config,
    read_adapter_weights,
    write_adapter,
)

PLACEMENTS = {
    "houlsby": {"self_attn": "serial", "mlp": "serial"},
    "parallel": {"self_attn": "parallel", "mlp": "parallel"},
    "mam": {"mlp": "parallel"},
    "unipelt": {"mlp": "serial"},  # model/peft/unipelt.py: gated, after the feed-forward sublayer
}
TYPES = {"houlsby": "HOULSBY", "parallel": "PARALLEL", "mam": "MAM"}


class Bottleneck(nn.Module):
    """up(relu(down(h))) * scale: d_model -> r -> d_model, up zero-initialised (the identity at step 0).
    `gated` (UniPELT): times sigmoid(gate(h)), one learned gate per token."""

    def __init__(self, d: int, r: int, scale: float, serial: bool, gated: bool = False) -> None:
        super().__init__()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.gate = nn.Linear(d, 1) if gated else None
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=0.02)
            nn.init.zeros_(self.gate.bias)
        self.scale, self.serial, self.enabled = scale, serial, True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.up(F.relu(self.down(h))) * self.scale
        return out if self.gate is None else out * torch.sigmoid(self.gate(h))


def _adapter_hook(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted sublayer: serial reads its output, parallel its input (x, the first argument)."""
    a: Bottleneck = module.adapter
    if not a.enabled:
        return out
    src = out if a.serial else (args[0] if args else kwargs["x"])
    return out + a(src.to(a.down.weight.dtype)).to(out.dtype)  # (a bf16 base keeps fp32 adapters)


def apply_adapters(
    model: nn.Module, method: str, dim: int, scale: float, freeze: bool = True, gated: bool = False
) -> int:
    """Add bottleneck adapters at the sublayers PLACEMENTS[method] names (and freeze the rest of `model`
    unless `freeze` is False: MAM's and UniPELT's other parts were attached first); returns how many."""
    if dim <= 0:
        raise UserError(f"--peft.adapter_dim must be > 0 for --peft.method {method}.")
    for p in model.parameters() if freeze else ():
        p.requires_grad_(False)
    dev, d, n = model.model.norm.weight.device, model.cfg.d_model, 0
    for layer in model.model.layers:
        for sub, how in PLACEMENTS[method].items():
            mod = getattr(layer, sub)
            mod.adapter = Bottleneck(d, dim, scale if how == "parallel" else 1.0, how == "serial", gated).to(dev)
            mod.register_forward_hook(_adapter_hook, with_kwargs=True)
            n += 1
    return n


def bottlenecks(model: nn.Module) -> list[Bottleneck]:
    return [m for m in model.modules() if isinstance(m, Bottleneck)]


def is_adapter_key(key: str) -> bool:
    return ".adapter.down." in key or ".adapter.up." in key or ".adapter.gate." in key


def save_adapters(
    path: str | Path,
    model: nn.Module,
    state: dict[str, torch.Tensor],
    method: str,
    base_model: str | Path,
    task_type: str,
) -> None:
    """Write tinychat's bottleneck-adapter format (module docstring) atomically into `path`."""
    first = bottlenecks(model)[0]
    cfg = model.cfg
    tensors = {PEFT_PREFIX + k: v for k, v in state.items() if is_adapter_key(k)}
    scale = next((b.scale for b in bottlenecks(model) if not b.serial), 1.0)
    config: dict[str, Any] = {
        "peft_type": TYPES[method],
        "tinychat_format": 1,
        "task_type": task_type,
        "base_model_name_or_path": base_path(base_model),
        "adapter_dim": first.down.out_features,
        "adapter_scale": scale,
        "placement": PLACEMENTS[method],
        "num_layers": cfg.n_layer,
        "inference_mode": True,
    }
    if method == "mam":
        vt = model.virtual_tokens
        tensors["prompt_embeddings"] = prompt.export_prompts(model, state)
        config.update(num_virtual_tokens=vt.spec.n, token_dim=vt.token_dim, num_attention_heads=cfg.n_kv_head)
    write_adapter(path, config, tensors)


def load_adapters(model: nn.Module, path: str | Path, d: dict[str, Any] | None = None) -> str:
    """Attach the HOULSBY/PARALLEL/MAM adapter at `path` to `model` (frozen, for inference); returns the method."""
    d = d or read_adapter_config(path, tuple(TYPES.values()))
    method = {v: k for k, v in TYPES.items()}[d["peft_type"]]
    src = Path(path) / ADAPTER_WEIGHTS
    if d.get("placement") != PLACEMENTS[method] or d.get("num_layers") != model.cfg.n_layer:
        raise UserError(f"{Path(path) / 'adapter_config.json'}: placement/num_layers do not match a {method} adapter.")
    apply_adapters(model, method, int(d["adapter_dim"]), float(d.get("adapter_scale", 1.0)))
    tensors = read_adapter_weights(path)
    own = dict(model.named_parameters())
    missing = sorted(k for k in own if is_adapter_key(k) and k not in tensors)
    if missing:
        raise UserError(f"{src}: tensor {missing[0]} is missing ({len(missing)} in all).")
    for name, v in tensors.items():
        if name != "prompt_embeddings":
            copy_into(own, name, v, str(src))
    if method == "mam":
        spec = prompt.PromptSpec(kind="prefix", n=int(d.get("num_virtual_tokens", 0)), trained=False)
        prompt.place_prompts(prompt.attach_virtual_tokens(model, spec), tensors, path)
    model.requires_grad_(False)
    return method
