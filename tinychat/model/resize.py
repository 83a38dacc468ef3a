"""Grow a model's vocabulary to an extended tokenizer: `tinychat model resize-vocab --model DIR --tokenizer NEW
--init mean|random --out DIR`.

Every old row of the input embedding and of the output layer is kept bit for bit, so on text made of
old tokens the resized model computes the same logits over the old ids as before. A new token's rows start
  * mean: as the mean of the rows of the old tokens its text splits into under the old tokenizer (what
    Chinese-LLaMA-Alpaca's maintainers recommend): the model then reads 出生 roughly as it read the
    bytes of 出生, and its first predictions of the token are those of its first pieces; or
  * random: Normal(0, init_std), as a freshly initialised model's rows.
Tied models (one matrix for both) get one set of new rows; untied ones get the mean of each matrix's own
rows. A new id that lies inside an old, padded table (Qwen2 pads its rows past the tokenizer) is
initialised the same way, since its row was never trained.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.model.transformer import Model
from tinychat.tokenizer.extend import check_extends, save_slow_files
from tinychat.tokenizer.tokenizer import Tokenizer

Init = Literal["mean", "random"]


@dataclass
class ResizeVocabConfig:
    model: str = field("", help="model directory or hub id to resize")
    tokenizer: str = field("", help="the extended tokenizer directory (`tinychat tokenizer extend` wrote it)")
    base_tokenizer: str = field("", help="the model's own tokenizer (default: the one in --model)")
    init: Init = field(
        "mean",
        help="new rows: the mean of the old rows of the tokens each new token's text splits into, or random "
        "Normal(0, init_std)",
    )
    seed: int = field(0, help="random seed of --init random")
    out: str = field("", help="directory to write the resized model (HF layout, with the new tokenizer)")


def sub_tokens(old: Tokenizer, new: Tokenizer, ids: list[int]) -> list[list[int]]:
    """For each new id, the old ids its text is made of (the old BPE applied to the token's byte string)."""
    model = old.backend.model
    return [[t.id for t in model.tokenize(new.id_to_token(i) or "")] for i in ids]


@torch.no_grad()
def resize_vocab(
    model: Model, new_ids: list[int], pieces: list[list[int]], rows: int, init: Init = "mean", seed: int = 0
) -> Model:
    """Resize `model` in place to `rows` ids and initialise the rows of `new_ids`; returns the model.

    pieces[k] are the old ids new_ids[k] is made of (used by init="mean"; an empty list falls back to random).
    """
    if init not in ("mean", "random"):
        raise UserError(f"--init must be mean or random, got {init!r}.")
    cfg = model.cfg
    old_rows = cfg.vocab_size
    rows = max(rows, old_rows)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor(new_ids, dtype=torch.long)

    def grown(weight: torch.Tensor) -> torch.Tensor:
        w = torch.empty(rows, weight.shape[1], dtype=torch.float32)  # (rows, d_model)
        w[:old_rows] = weight.detach().float().cpu()
        rand = torch.randn(len(new_ids), weight.shape[1], generator=gen) * cfg.init_std
        w[ids] = rand
        if init == "mean":
            for k, p in enumerate(pieces):
                p = [i for i in p if i < old_rows]
                if p:
                    w[new_ids[k]] = w[p].mean(0)
        return w.to(weight.dtype).to(weight.device)

    if any(i >= rows or i < 0 for i in new_ids):
        raise UserError(f"new token ids must lie below {rows}.")
    emb = nn.Embedding(rows, cfg.d_model, device=model.model.embed_tokens.weight.device)
    emb.weight = nn.Parameter(grown(model.model.embed_tokens.weight))
    head = nn.Linear(cfg.d_model, rows, bias=False, device=emb.weight.device)
    if cfg.tie_embeddings:
        head.weight = emb.weight
    else:
        head.weight = nn.Parameter(grown(model.lm_head.weight))
    model.model.embed_tokens, model.lm_head = emb, head
    model.cfg = replace(cfg, vocab_size=rows)
    return model


def resize_for_tokenizer(
    model: Model, old: Tokenizer, new: Tokenizer, init: Init = "mean", seed: int = 0
) -> tuple[Model, list[int]]:
    """Resize `model` (trained with `old`) for `new`, which must extend `old`; returns (model, the new ids)."""
    new_ids = check_extends(old, new)
    if not new_ids:
        raise UserError("the new tokenizer adds no tokens to the model's own; there is nothing to resize.")
    rows = max(model.cfg.vocab_size, max(new_ids) + 1, new.vocab_size)
    return resize_vocab(model, new_ids, sub_tokens(old, new, new_ids), rows, init, seed), new_ids


def run(cfg: ResizeVocabConfig) -> int:
    from tinychat.model.hub import resolve_model_dir

    if not cfg.model or not cfg.tokenizer or not cfg.out:
        raise UserError("model resize-vocab needs --model DIR, --tokenizer NEW_TOKENIZER_DIR and --out DIR.")
    src = resolve_model_dir(cfg.model)
    base_tok = Path(cfg.base_tokenizer) if cfg.base_tokenizer else src
    if not (base_tok / "tokenizer.json").is_file():
        raise UserError(f"{base_tok} holds no tokenizer.json; pass the model's own tokenizer with --base-tokenizer.")
    old, new = Tokenizer.from_pretrained(base_tok), Tokenizer.from_pretrained(cfg.tokenizer)
    model = Model.from_pretrained(str(src))
    if old.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{base_tok} has {old.vocab_size} tokens but the model only {model.cfg.vocab_size} rows.")
    old_rows = model.cfg.vocab_size
    model, new_ids = resize_for_tokenizer(model, old, new, cfg.init, cfg.seed)
    out = Path(cfg.out)
    model.save_pretrained(str(out))
    new.save_pretrained(out)
    save_slow_files(new, Path(cfg.tokenizer), out)
    print(
        f"resized {src} from {old_rows} to {model.cfg.vocab_size} rows: {len(new_ids)} new tokens "
        f"initialised by {cfg.init} ({'tied' if model.cfg.tie_embeddings else 'untied'} embeddings); wrote {out}"
    )
    return 0
