"""Bits per byte and perplexity of a model on held-out text.

Why bits per byte as the headline: loss per token depends on the tokenizer, loss per UTF-8 byte does not,
so it compares models with different vocabularies and measures the "alignment tax" (how much a
post-trained model forgot about plain text) on one scale. Perplexity (exp of nats per token) is reported
beside it because it is what most papers print.

Input: a tokenized data directory (its val split, as `tinychat data tokenize` wrote it) or JSONL/txt/
Parquet files tokenized here the same way (each document followed by the end-of-text token). The stream
is cut into consecutive windows of seq_len + 1 tokens; every token after the first is predicted exactly
once, with its window's context. Special tokens stand for no bytes (tinychat.tokenizer.bytes), and the
windows are those of the pretraining loader, so on the same tokens and seq_len the number equals the
val_bpb the pretraining evaluation logs.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tinychat.errors import UserError


def token_stream(source: str | Path, tokenizer: Any, max_tokens: int = 0, split: str = "val") -> np.ndarray:
    """The first max_tokens (0 = all) ids of a tokenized directory's split, or of text files tokenized now."""
    p = Path(source)
    if p.is_dir() and (p / "index.json").is_file():
        from tinychat.data.shards import TokenIndex

        index = TokenIndex.load(p)
        data_vocab = index.vocab_size
        if data_vocab != tokenizer.vocab_size:
            raise UserError(
                f"{p} was tokenized with a {data_vocab}-token vocabulary, the model's tokenizer has "
                f"{tokenizer.vocab_size}; give text files instead (they are tokenized with the model's tokenizer)."
            )
        maps = index.memmaps(split)
        parts, have = [], 0
        for m in maps:
            take = len(m) if not max_tokens else min(len(m), max_tokens - have)
            parts.append(np.asarray(m[:take], dtype=np.int64))
            have += take
            if max_tokens and have >= max_tokens:
                break
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    else:
        from tinychat.data.readers import iter_texts

        ids_list: list[int] = []
        batch: list[str] = []

        def flush() -> None:
            for doc in tokenizer.encode_batch(batch):
                ids_list.extend([*doc, tokenizer.eot_id])
            batch.clear()

        for text in iter_texts(p, on_error=lambda err: None):
            batch.append(text)
            if len(batch) == 256:
                flush()
                if max_tokens and len(ids_list) >= max_tokens:
                    break
        flush()
        ids = np.asarray(ids_list[: max_tokens or None], dtype=np.int64)
    if len(ids) < 2:
        raise UserError(f"{p} holds {len(ids)} tokens of {split} text; bits per byte needs at least 2.")
    return ids


@torch.no_grad()
def stream_bpb(
    model: torch.nn.Module,
    ids: np.ndarray,
    token_bytes: torch.Tensor,
    seq_len: int,
    batch_size: int = 8,
    precision: str = "fp32",
) -> dict[str, float]:
    """{bpb, loss (nats/token), ppl, tokens, bytes} of the model over a 1-D token stream."""
    device = next(model.parameters()).device
    T = max(1, min(seq_len, model.cfg.max_seq_len))
    n_pred = len(ids) - 1
    starts = list(range(0, n_pred, T))
    stream = torch.as_tensor(ids, dtype=torch.long)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    nats = n_tok = n_bytes = 0.0
    for b in range(0, len(starts), batch_size):
        chunk = starts[b : b + batch_size]
        lens = [min(T, n_pred - s) for s in chunk]
        x = torch.zeros(len(chunk), max(lens), dtype=torch.long)
        y = torch.full((len(chunk), max(lens)), -100, dtype=torch.long)
        for i, (s, n) in enumerate(zip(chunk, lens)):
            x[i, :n] = stream[s : s + n]
            y[i, :n] = stream[s + 1 : s + 1 + n]
        x, y = x.to(device), y.to(device)
        with amp:
            logits = model(x)
        per_tok = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none")
        real = y.flatten() != -100
        nats += float(per_tok[real].sum())
        n_tok += float(real.sum())
        n_bytes += float(token_bytes[y.flatten()[real]].sum())
    return {
        "bpb": nats / math.log(2) / max(n_bytes, 1.0),
        "loss": nats / n_tok,
        "ppl": math.exp(min(nats / n_tok, 700.0)),
        "tokens": int(n_tok),
        "bytes": int(n_bytes),
        "seq_len": T,
    }


def bits_per_byte(
    model: torch.nn.Module,
    tokenizer: Any,
    source: str | Path,
    seq_len: int = 256,
    max_tokens: int = 16384,
    batch_size: int = 8,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Bits per byte and perplexity on `source` (a tokenized directory's val split, or text files)."""
    from tinychat.tokenizer.bytes import token_byte_lengths

    ids = token_stream(source, tokenizer, max_tokens)
    if int(ids.max()) >= model.cfg.vocab_size:
        raise UserError(f"{source} holds token id {int(ids.max())}, outside the model's {model.cfg.vocab_size} ids.")
    token_bytes = torch.tensor(
        token_byte_lengths(tokenizer), dtype=torch.float32, device=next(model.parameters()).device
    )
    if len(token_bytes) < model.cfg.vocab_size:  # a model vocabulary padded past the tokenizer's: no bytes
        pad = torch.zeros(model.cfg.vocab_size - len(token_bytes), device=token_bytes.device)
        token_bytes = torch.cat([token_bytes, pad])
    out = stream_bpb(model, ids, token_bytes, seq_len, batch_size, precision)
    return {"source": str(source), **out}
