"""What every adapter method shares: PEFT's file names and prefix, reading and writing an adapter directory.

An adapter directory is PEFT's: adapter_config.json (its `peft_type` says which method) and
adapter_model.safetensors. Writing is atomic (a temporary sibling, then rename), reading turns every
malformed file into one UserError sentence naming the file.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tinychat.errors import UserError

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# peft_type values tinychat reads and writes (PEFT's own names), and tinychat's own methods PEFT lacks
PEFT_TYPES = ("LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "HOULSBY", "PARALLEL", "MAM", "UNIPELT")


def is_adapter_dir(path: str | Path) -> bool:
    """An adapter directory without a model of its own (no config.json beside adapter_config.json)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def adapter_base(adapter_dir: Path) -> Path:
    """The base model an adapter's adapter_config.json names: a directory (absolute, or relative to the adapter)
    or a Hugging Face id such as PEFT writes."""
    from tinychat.model.hub import hub_id, resolve_model_dir

    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path; pass --base.")
    p = Path(base)
    if p.is_absolute() or p.is_dir():
        return p
    if (adapter_dir / p).is_dir() or hub_id(base) is None:
        return adapter_dir / p
    return resolve_model_dir(base)


def read_adapter_config(path: str | Path, types: tuple[str, ...] = PEFT_TYPES) -> dict[str, Any]:
    """adapter_config.json as a dict; a UserError if it is missing, not JSON, or of a method not in `types`."""
    from tinychat.model.hf import read_json_object

    p = Path(path) / ADAPTER_CONFIG
    cfg = read_json_object(p, f"an adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    if cfg.get("peft_type") not in types:
        raise UserError(f"{p}: peft_type is {cfg.get('peft_type')!r}; tinychat reads {', '.join(types)} adapters.")
    return cfg


def replace_modules(model: nn.Module, cls: type, make: Callable[[Any], nn.Module]) -> nn.Module:
    """Replace, in place, every child module of type `cls` by make(child) (merging adapters into Linears)."""
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, cls):
                setattr(mod, child_name, make(child))
    return model


@contextlib.contextmanager
def switched_off(model: nn.Module, classes: tuple[type, ...]) -> Iterator[None]:
    """Set `enabled = False` on every module of `classes` for the duration: the base model alone."""
    mods = [m for m in model.modules() if isinstance(m, classes)]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors, PEFT's prefix and in-memory `.default` adapter name stripped from the keys."""
    wfile = Path(path) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(wfile))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{wfile} is not a readable safetensors file ({e}).") from None
    return {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v for k, v in tensors.items()}


def write_adapter(path: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write adapter_config.json + adapter_model.safetensors into `path` atomically."""
    from tinychat.model.hf import write_files_atomically

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_files_atomically(
        path,
        {
            ADAPTER_CONFIG: (json.dumps(config, indent=2) + "\n").encode(),
            ADAPTER_WEIGHTS: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        },
    )


def base_path(base_model: str | Path) -> str | None:
    """What base_model_name_or_path holds: an absolute directory, or None for an adapter with no base dir."""
    return str(Path(base_model).absolute()) if base_model else None


def copy_into(own: dict[str, torch.Tensor], name: str, value: torch.Tensor, source: str) -> None:
    """Copy an adapter tensor into the model's parameter of the same name, checking its shape."""
    if name not in own:
        raise UserError(f"{source}: tensor {name} does not match any adapted module of the base model.")
    if tuple(value.shape) != tuple(own[name].shape):
        raise UserError(f"{source}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(own[name].shape)}.")
    with torch.no_grad():
        own[name].copy_(value)
