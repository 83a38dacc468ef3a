"""IA3 (Liu et al. 2022, "(IA)^3"): learned vectors that rescale activations, in PEFT's file format.

Why IA3: the smallest adapter there is (one number per channel of the adapted projections: ~0.01-0.1% of
the model), starts exactly at the base (vectors of ones), and merges into the weights for free.
Following PEFT: an attention projection (k, v, ...) scales its *output*, y = (W x + b) * l with l (out, 1);
a feed-forward module (down_proj, PEFT's `feedforward_modules`) scales its *input*, y = W (x * l) + b with
l (1, in). Both merge into W (rows or columns times l); an output scale also scales the bias.

File format: keys `base_model.model.<module>.ia3_l`, adapter_config.json with peft_type IA3,
target_modules and feedforward_modules (PEFT opens ours and we open PEFT's).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinychat.errors import UserError
from tinychat.model.peft import common
from tinychat.model.peft.common import replace_modules, switched_off
from tinychat.model.peft.lora import TARGETS, target_leaves

DEFAULT_TARGETS = ["k", "v", "down"]  # the paper's keys, values and feed-forward activations
FEEDFORWARD = ("down_proj",)


class IA3Linear(nn.Module):
    """A frozen nn.Linear whose output (attention) or input (feed-forward) is rescaled by a trained vector."""

    def __init__(self, base: nn.Linear, feedforward: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: names unchanged
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)  # PEFT's shapes
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=base.weight.dtype))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        scale = self.ia3_l.flatten().to(x.dtype)
        if self.feedforward:
            return F.linear(x * scale, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) * scale

    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        w, b = merge_weights(self.weight, self.bias, self.ia3_l)
        lin.weight = nn.Parameter(w)
        if b is not None:
            lin.bias = nn.Parameter(b)
        return lin


def merge_weights(w: torch.Tensor, b: torch.Tensor | None, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # noqa: E741
    """(W * l, b * l for an output scale): l (out, 1) scales rows, l (1, in) scales columns."""
    with torch.no_grad():
        merged_w = (w.float() * l.float()).to(w.dtype)
        if b is None:
            return merged_w, None
        return merged_w, (b.float() * l.float().flatten()).to(b.dtype) if l.shape[1] == 1 else b.detach().clone()


def apply_ia3(model: nn.Module, targets: list[str], feedforward: tuple[str, ...] = FEEDFORWARD) -> int:
    """Freeze `model` and wrap its target projections in IA3Linear; returns how many were wrapped."""
    leaves = target_leaves(targets, "--peft.targets")
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in leaves and isinstance(child, nn.Linear) and ".layers." in f".{name}.":
                setattr(mod, child_name, IA3Linear(child, child_name in feedforward))
                n += 1
    if n == 0:
        raise UserError(f"--peft.targets {','.join(targets)} matched no projection of this model.")
    return n


def has_ia3(model: nn.Module) -> bool:
    return any(isinstance(m, IA3Linear) for m in model.modules())


def merge_ia3(model: nn.Module) -> nn.Module:
    return replace_modules(model, IA3Linear, lambda m: m.merged())


def ia3_disabled(model: nn.Module) -> contextlib.AbstractContextManager:
    return switched_off(model, (IA3Linear,))


def is_ia3_key(key: str) -> bool:
    return key.endswith(".ia3_l")


def merge_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An IA3 model's state dict as plain weights (W * l, and b * l for output scales)."""
    out = {k: v for k, v in state.items() if not is_ia3_key(k)}
    for key, l in state.items():  # noqa: E741
        if is_ia3_key(key):
            prefix = key[: -len(".ia3_l")]
            w, b = merge_weights(out[prefix + ".weight"], out.get(prefix + ".bias"), l)
            out[prefix + ".weight"] = w
            if b is not None:
                out[prefix + ".bias"] = b
    return out


def save_ia3(path: str | Path, state: dict[str, torch.Tensor], base_model: str | Path, task_type: str) -> None:
    """PEFT's IA3 format: target_modules and feedforward_modules read off the vectors' shapes."""
    tensors = {common.PEFT_PREFIX + k: v for k, v in state.items() if is_ia3_key(k)}
    leaves = sorted({k.split(".")[-2] for k in tensors})
    ff = sorted({k.split(".")[-2] for k, v in tensors.items() if v.shape[0] == 1})
    config = {
        "peft_type": "IA3",
        "task_type": task_type,
        "base_model_name_or_path": common.base_path(base_model),
        "target_modules": leaves,
        "feedforward_modules": ff,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_ia3_weights": True,
        "modules_to_save": None,
        "exclude_modules": None,
    }
    common.write_adapter(path, config, tensors)


def load_ia3(model: nn.Module, path: str | Path, d: dict[str, Any] | None = None) -> list[str]:
    """Wrap `model` with the IA3 adapter at `path` and load its vectors; returns its target leaf names."""
    d = d or common.read_adapter_config(path, ("IA3",))
    src = str(Path(path) / common.ADAPTER_WEIGHTS)
    targets, ff = d.get("target_modules"), d.get("feedforward_modules") or []
    leaf_to_short = {v.split(".")[-1]: k for k, v in TARGETS.items()}
    if not isinstance(targets, list) or any(t not in leaf_to_short for t in targets) or not isinstance(ff, list):
        raise UserError(f"{path}: IA3 target_modules must list projections tinychat has, got {targets!r}.")
    if d.get("fan_in_fan_out"):
        raise UserError(f"{path}: fan_in_fan_out IA3 adapters are not supported.")
    apply_ia3(model, [leaf_to_short[t] for t in targets], tuple(ff))
    own = dict(model.named_parameters())
    tensors = common.read_adapter_weights(path)
    missing = sorted(k for k in own if is_ia3_key(k) and k not in tensors)
    if missing:
        raise UserError(f"{src}: tensor {missing[0]} is missing ({len(missing)} in all).")
    for name, v in tensors.items():
        common.copy_into(own, name, v, src)
    return list(targets)
