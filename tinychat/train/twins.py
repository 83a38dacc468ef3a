"""Twin tokens share part of their embedding while training: E[" X"] = W[" X"] + S[X] and E["X"] = W["X"] + S[X].

Why: byte-level BPE gives a word two ids, with and without its leading space. Text states a value
mid-sentence (" Lommunyar"), so a fact is stored under the spaced id, while a reply that opens with the
value, a JSON string or a one-word answer needs the bare one, which the text almost never predicts
(docs/speedrun.md, round 8). With a shared row S per pair, whatever a gradient teaches one twin moves
the other as well, through the tied input embedding and output head alike; each twin keeps its own row W
for what tells them apart.

It is a reparametrisation for training only (torch.nn.utils.parametrize, applied from outside: the model
knows nothing of it). The model computes E and never sees W or S, so a checkpoint stores E under the
plain name (an ordinary Hugging Face directory, GGUF-exportable) and a resume splits it again as W = E,
S = 0. That split is exact for AdamW: the gradients of W and S and the weight decay of E (W's decay plus
S's, each the same fraction) depend on E alone, so the optimiser's moments, saved by parameter name,
carry over unchanged. S starts at zero, so applying twins never changes the model's function.

Shapes: W (vocab, d_model), S (n_pairs, d_model), index (vocab,) with n_pairs for ids without a twin
(a zero row).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.nn.utils import parametrize

from tinychat.errors import UserError
from tinychat.tokenizer import Tokenizer

SPACE = "\u0120"  # byte-level BPE's character for the space byte (GPT-2's byte-to-unicode map)
ORIGINAL = "parametrizations.weight.original"
SHARED = "parametrizations.weight.0.shared"


def twin_index(tok: Tokenizer) -> tuple[torch.Tensor, int]:
    """(index, n_pairs): index[id] is the pair row of an id that has a twin, n_pairs for the others."""
    vocab = tok.backend.get_vocab()
    index = torch.full((tok.vocab_size,), -1, dtype=torch.long)
    n = 0
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        bare = vocab.get(token[1:]) if token.startswith(SPACE) and len(token) > 1 else None
        if bare is not None and i < tok.vocab_size and bare < tok.vocab_size:
            index[i] = index[bare] = n
            n += 1
    index[index < 0] = n
    return index, n


class TwinShare(nn.Module):
    """The parametrization: W -> W + S[index] (S padded with a zero row for ids without a twin)."""

    def __init__(self, index: torch.Tensor, n_pairs: int, d_model: int) -> None:
        super().__init__()
        self.register_buffer("index", index, persistent=False)
        self.shared = nn.Parameter(torch.zeros(n_pairs, d_model))

    def forward(self, w: torch.Tensor) -> torch.Tensor:  # (vocab, d_model)
        return w + fold_rows(self.shared, self.index)


def fold_rows(shared: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """S[index] with the zero row: (vocab, d_model)."""
    padded = torch.cat([shared, shared.new_zeros(1, shared.shape[1])])
    return padded[index.to(shared.device)]


def _share(model: nn.Module) -> TwinShare | None:
    return next((m for m in model.modules() if isinstance(m, TwinShare)), None)


def apply_twins(model: nn.Module, tok: Tokenizer) -> int:
    """Register TwinShare on the input embedding and the output head (one shared S when they are tied);
    returns the number of pairs."""
    emb, head = model.model.embed_tokens, model.lm_head
    if not emb.weight.requires_grad:
        raise UserError("--train.twin_tokens needs a trainable embedding (not LoRA or frozen embeddings).")
    index, n = twin_index(tok)
    if len(index) != emb.weight.shape[0]:
        raise UserError(f"--train.twin_tokens: the tokenizer has {len(index)} ids, the model {emb.weight.shape[0]}.")
    share = TwinShare(index, n, emb.weight.shape[1]).to(emb.weight.device)
    tied = head.weight is emb.weight
    parametrize.register_parametrization(emb, "weight", share)
    if tied:  # the head's weight is still the same Parameter, now W: both modules compute the same E
        parametrize.register_parametrization(head, "weight", share)
    elif head.weight.requires_grad:
        other = TwinShare(index, n, head.weight.shape[1]).to(head.weight.device)
        parametrize.register_parametrization(head, "weight", other)
    return n


def fold_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of a twinned model (W and S by name) as the plain model's (E = W + S[index] by name);
    a model without twins gets `sd` back."""
    share = _share(model)
    if share is None:
        return sd
    out = {}
    for k, v in sd.items():
        if k.endswith(ORIGINAL):
            prefix = k[: -len(ORIGINAL)]
            out[prefix + "weight"] = v + fold_rows(sd[prefix + SHARED], share.index)
        elif not k.endswith(SHARED):
            out[k] = v
    return out


def split_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain state dict for a twinned model: W = E, S = 0 (exact: see the module docstring)."""
    share = _share(model)
    if share is None:
        return sd
    out = dict(sd)
    for k in get_model_state_dict(model):
        if k.endswith(ORIGINAL):
            prefix = k[: -len(ORIGINAL)]
            out[k] = out.pop(prefix + "weight")
            out[prefix + SHARED] = torch.zeros(share.shared.shape, dtype=out[k].dtype)
    return out
