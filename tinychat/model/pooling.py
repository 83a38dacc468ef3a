"""Sentence embeddings from a tinychat model: the mean of its final hidden states, L2-normalised.

Why one function: the server's /v1/embeddings (tinychat.infer.engine) and the RAG embedder
(tinychat.rag.embed.TinychatEmbedder) must give the same vector for the same tokens, so both call this.
Why mean pooling with right padding and no attention mask: the model is causal, so pad tokens after a
sequence never influence its real positions; masking them out of the mean is all that is needed, and
the batch runs as one plain forward pass without a KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool(
    model: torch.nn.Module, batch_ids: list[list[int]], device: torch.device | str, batch_size: int = 16
) -> torch.Tensor:
    """(N, d_model) float32: the L2-normalised mean final hidden state of each (non-empty) token list.

    Lists are run `batch_size` at a time, each batch right-padded to its longest list; the caller keeps
    every list within the model's context window.
    """
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for i in range(0, len(batch_ids), batch_size):
            part = batch_ids[i : i + batch_size]
            T = max(len(ids) for ids in part)
            x = torch.zeros(len(part), T, dtype=torch.long, device=device)
            mask = torch.zeros(len(part), T, 1, device=device)
            for j, ids in enumerate(part):
                x[j, : len(ids)] = torch.tensor(ids, device=device)
                mask[j, : len(ids)] = 1
            h = model.hidden_states(x).float()  # causal: right padding never leaks into real tokens
            pooled = (h * mask).sum(1) / mask.sum(1)
            out.append(F.normalize(pooled, dim=-1))
    if not out:
        return torch.zeros(0, model.cfg.d_model)
    return torch.cat(out)
