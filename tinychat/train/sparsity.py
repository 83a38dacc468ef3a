"""Keep a magnitude-pruned model sparse while it trains (the recovery fine-tune of `tinychat prune`).

Why: magnitude pruning zeroes the smallest |w| of each block Linear but keeps the dense shape, so the
ordinary loop would regrow every zero on the first AdamW step (the gradient of a zero weight is not
zero) and the "recovered" model would no longer be sparse. The fix is the standard one (Han et al.
2015, "Learning both Weights and Connections"): remember where the zeros are and write them back after
every optimiser step. The mask is read from the weights themselves, so the pruned directory needs no
side file; a trained dense model has no exact zeros in its block Linears and gets no mask.

Works wherever each rank holds whole parameters (one process, DDP); FSDP and tensor parallelism shard
them, so the loop refuses the combination.
"""

from __future__ import annotations

import torch
from torch import nn


class SparsityMask:
    """The zero pattern of every block Linear weight that has zeros; `apply()` restores it in place."""

    def __init__(self, model: nn.Module) -> None:
        self.masks: list[tuple[nn.Parameter, torch.Tensor]] = []
        for name, p in model.named_parameters():
            # block Linears only: embeddings and norms are never pruned; ".layers." holds every block
            if p.dim() == 2 and ".layers." in f".{name}" and bool((p == 0).any()):
                self.masks.append((p, p != 0))  # (out, in) bool: True where the weight survives

    def __bool__(self) -> bool:
        return bool(self.masks)

    @torch.no_grad()
    def apply(self) -> None:
        for p, keep in self.masks:
            p.mul_(keep)

    def sparsity(self) -> float:
        """Fraction of zeros over the masked weights."""
        total = sum(k.numel() for _, k in self.masks)
        return 1.0 - sum(int(k.sum()) for _, k in self.masks) / total if total else 0.0
