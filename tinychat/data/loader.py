"""Batches for pretraining: fixed-length windows packed from the token shards, resumable and rank-disjoint.

Packing: the split's shards are one virtual stream of tokens (documents separated by the end token).
Sequence i is the window stream[i*T : i*T + T + 1], so x = window[:-1] and y = window[1:] and every
token except the very first is a target exactly once per epoch. Windows cross document boundaries:
the end token tells the model a new text starts (nanoGPT / GPT-2 style packing).

Order: epoch e uses a permutation of all sequence ids drawn from numpy's Generator seeded with
(seed, e). Global step s of epoch e = s // steps_per_epoch takes the next B * W ids of that
permutation; rank r of world size W takes the r-th slice of B. Consequences:
  * deterministic: a batch is a pure function of (seed, step, rank, world_size) and the data;
  * resumable: the whole state is (seed, step); restoring it reproduces the same batches;
  * disjoint: ranks never share a sequence within a step, nor steps within an epoch;
  * the few sequences that do not fill a last global batch are skipped that epoch (a different
    few each epoch, since the permutation changes).

The validation iterator walks the val split in order, unshuffled, so every evaluation sees the same
batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from tinychat.data.shards import TokenIndex
from tinychat.errors import UserError


class PackedLoader:
    """(x, y) LongTensor batches of shape (B, T) from a tokenized directory's split.

    loader = PackedLoader("runs/x/data/tokens", batch_size=8, seq_len=256, seed=0, rank=0, world_size=1)
    for x, y in loader: ...                         # infinite; loader.step counts batches served
    state = loader.state_dict()                    # {"seed", "step"}; load_state_dict(state) resumes
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        batch_size: int,
        seq_len: int,
        *,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
    ):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size and seq_len must be at least 1, got {batch_size} and {seq_len}.")
        if not 0 <= rank < world_size:
            raise UserError(f"rank must be in [0, world_size), got rank {rank} of {world_size}.")
        self.index = TokenIndex.load(data_dir)
        self.maps = self.index.memmaps(split)
        self.offsets = np.cumsum([0] + [len(m) for m in self.maps])  # shard k covers [offsets[k], offsets[k+1])
        self.total_tokens = int(self.offsets[-1])
        self.B, self.T, self.split = batch_size, seq_len, split
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.device = torch.device(device)
        self.n_seqs = max(0, (self.total_tokens - 1) // seq_len)
        self.steps_per_epoch = self.n_seqs // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the {split} split of {data_dir} has {self.total_tokens:,} tokens, fewer than one global "
                f"batch needs ({batch_size} x {world_size} ranks x {seq_len + 1} tokens); "
                "use more data or smaller batches."
            )
        self.step = 0
        self._cached: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))

    # -- order

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self.step // self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:  # one permutation per epoch, computed once
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(self.n_seqs)
                if self.shuffle
                else np.arange(self.n_seqs)
            )
            self._cached = (epoch, order)
        return self._cached[1]

    def seq_ids(self, step: int) -> np.ndarray:
        """The (B,) sequence ids this rank reads at global step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        start = (k * self.world_size + self.rank) * self.B
        return self._order(epoch)[start : start + self.B]

    # -- data

    def window(self, seq_id: int) -> np.ndarray:
        """Tokens [seq_id*T, seq_id*T + T + 1) of the virtual stream, read across shard boundaries."""
        lo, hi = seq_id * self.T, seq_id * self.T + self.T + 1
        k = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        parts = []
        while lo < hi:
            end = min(hi, int(self.offsets[k + 1]))
            parts.append(self.maps[k][lo - self.offsets[k] : end - self.offsets[k]])
            lo, k = end, k + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (B, T) int64, for global step `step` (does not change self.step)."""
        w = np.stack([self.window(int(i)) for i in self.seq_ids(step)]).astype(np.int64)  # (B, T+1)
        t = torch.from_numpy(w)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            t = t.to(self.device)
        return t[:, :-1], t[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            b = self.batch(self.step)
            self.step += 1
            yield b

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch(self.step)
        self.step += 1
        return b

    # -- resume

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise UserError(f"loader state has seed {state['seed']}, this loader was built with seed {self.seed}.")
        self.step = int(state["step"])


def val_batches(
    data_dir: str | os.PathLike,
    batch_size: int,
    seq_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
    split: str = "val",
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation batches: the split in order, unshuffled, disjoint across ranks, one pass."""
    loader = PackedLoader(
        data_dir,
        batch_size,
        seq_len,
        split=split,
        rank=rank,
        world_size=world_size,
        shuffle=False,
        device=device,
    )
    n = loader.steps_per_epoch if max_batches is None else min(max_batches, loader.steps_per_epoch)
    for step in range(n):
        yield loader.batch(step)
