"""`tinychat extend-context`: raise a trained model's context window by rescaling its rotary positions.

    tinychat extend-context --model runs/x/checkpoints/pretrain --factor 4 --method yarn --out runs/x/long
    tinychat pretrain --init runs/x/long --train.seq_len 1024 ...     # then a short fine-tune at the new length

Why rescale: a RoPE model has only ever seen rotation angles up to (trained length) x (each frequency);
past that its attention meets angles it never learned and retrieval collapses. The three methods map the
longer window back into angles it knows:
- linear (position interpolation, Chen et al. 2023): every frequency divided by the factor;
- ntk (NTK-aware, bloc97 2023): the base theta raised by factor^(d/(d-2)), so the fastest dimensions keep
  their angles and the slowest are interpolated; written as a new rope_theta (transformers' "dynamic" type
  would recompute it per sequence length, this is the static form Code Llama used);
- yarn (Peng et al. 2023): interpolate only the slow dimensions, keep the fast ones, and sharpen attention
  by 0.1 ln(factor) + 1.
The weights are copied unchanged; only config.json (rope_parameters / rope_theta, max_position_embeddings)
differs, so transformers opens the result with the same scaling (tests/model/test_long_context.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.model.config import ModelConfig

Method = Literal["linear", "ntk", "yarn"]


@dataclass
class ExtendContextConfig:
    model: str = field("", help="model directory (HF layout) to extend")
    out: str = field("", help="directory to write the extended model to (weights and tokenizer copied)")
    factor: float = field(4.0, help="how many times longer the new context window is")
    method: Method = field("yarn", help="linear (position interpolation), ntk (raised rope_theta) or yarn")
    original: int = field(
        0,
        help="the length the model was trained at (0 = its max_position_embeddings); "
        "the speedrun trains 256-token windows of a 512-token window",
    )


def extend_config(cfg: ModelConfig, factor: float, method: str, original: int = 0) -> ModelConfig:
    """The config of the same weights read `factor` times further; see the module docstring for the methods."""
    if factor <= 1:
        raise UserError(f"--factor must be greater than 1, got {factor}.")
    if cfg.position != "rope":
        raise UserError("an ALiBi model has no rotary positions to rescale; raise model.max_seq_len instead.")
    if cfg.rope_scaling:
        raise UserError(f"the model already has rope scaling {cfg.rope_scaling}; extend the original model instead.")
    old = original or cfg.max_seq_len
    if old <= 0:
        raise UserError(f"--original must be positive, got {old}.")
    new_len = max(round(old * factor), cfg.max_seq_len)
    if method == "linear":
        return dataclasses.replace(cfg, rope_scaling={"rope_type": "linear", "factor": factor}, max_seq_len=new_len)
    if method == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": old}
        return dataclasses.replace(cfg, rope_scaling=scaling, max_seq_len=new_len)
    if method == "ntk":
        d = cfg.head_dim
        return dataclasses.replace(cfg, rope_theta=cfg.rope_theta * factor ** (d / (d - 2)), max_seq_len=new_len)
    raise UserError(f"--method must be linear, ntk or yarn, got {method!r}.")


def run(cfg: ExtendContextConfig) -> int:
    import torch

    from tinychat.model.hf import copy_tokenizer
    from tinychat.model.transformer import Model

    if not cfg.model or not cfg.out:
        raise UserError("give --model DIR (the model to extend) and --out DIR (where to write it).")
    if Path(cfg.out).resolve() == Path(cfg.model).resolve():
        raise UserError("--out must differ from --model: the original model is kept as it is.")
    model = Model.from_pretrained(cfg.model)
    old_len = cfg.original or model.cfg.max_seq_len
    new = extend_config(model.cfg, cfg.factor, cfg.method, cfg.original)
    model.cfg = new  # only config.json changes: the rotary buffer is derived from it when the directory is read
    dtype = next(model.parameters()).dtype
    model.save_pretrained(cfg.out, dtype=dtype if dtype.is_floating_point else torch.float32)
    copy_tokenizer(cfg.model, Path(cfg.out))
    what = {"linear": "linear interpolation", "ntk": f"rope_theta {new.rope_theta:,.0f}", "yarn": "YaRN"}[cfg.method]
    print(f"wrote {cfg.out}: context {old_len} -> {new.max_seq_len} tokens ({what})")
    return 0
