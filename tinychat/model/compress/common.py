"""What quantize, prune and factorize share: which Linears they touch, swapping modules, reading and writing."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from tinychat.errors import UserError

# the attention and MLP projections of every block (compressed-tensors' regex target syntax)
BLOCK_LINEAR = r"re:^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj$"


def block_linear_names(model: nn.Module) -> list[str]:
    pat = re.compile(BLOCK_LINEAR.removeprefix("re:"))
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pat.match(n)]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def check_paths(model: str, out: str) -> None:
    if not model or not out:
        raise UserError("--model DIR and --out DIR are required.")
    if Path(out).resolve() == Path(model).resolve():
        raise UserError("--out must differ from --model (the original would be replaced).")


def load_float(path: str) -> nn.Module:
    from tinychat.model.hf import load_pretrained

    model = load_pretrained(path, dtype=torch.float32)
    if getattr(model, "quantization", None) or getattr(model, "lowrank", None):
        raise UserError(f"{path} is already quantized or factorized; start from the float model.")
    return model


def save_with_tokenizer(model: nn.Module, src: str, out: str) -> None:
    """The compressed model at `out`, with `src`'s tokenizer and its record of how it was trained."""
    from tinychat.model.hf import copy_tokenizer, save_pretrained, training_record

    save_pretrained(model, out, record=training_record(src))
    copy_tokenizer(src, Path(out))
