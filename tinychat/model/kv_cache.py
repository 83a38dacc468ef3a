"""A pre-allocated key/value cache with a length per sequence.

Why per-sequence lengths: a batch of prompts of different lengths then decodes together. Each row
writes its new keys/values at its own positions `lengths[b] + t`; the attention mask lets a query at
position p see exactly the keys at positions <= p of its own row. Rows may be right-padded within
one forward call (give `n_new` per row): the padded slots hold junk that no query can see, because
the next real token of that row is written over them before any query reaches that far.

Memory is allocated once (n_layer x batch x n_kv_head x max_len x head_dim) and reused; nothing is
re-allocated per token. A serving engine reuses rows ("slots") by resetting their length to zero.
"""

from __future__ import annotations

import torch

from tinychat.model.config import ModelConfig


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached per row
        self.batch_size = batch_size
        # set by Model.forward for the duration of one call
        self._positions: torch.Tensor | None = None  # (B, T) absolute positions of the new tokens
        self._span = 0  # number of key positions the current call needs to look at
        self._rows: torch.Tensor | None = None  # which rows the current call feeds (None: all)
        self._start: int | None = None

    def begin(self, n_tokens: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Start a forward call of `n_tokens` new tokens per row; returns their positions (B, T).

        `rows` (B,) selects which cache rows ("slots") this call feeds, so a serving engine can run
        only its active sequences; by default the call feeds every row.
        """
        self._rows = rows
        lengths = self.lengths if rows is None else self.lengths[rows]
        pos = lengths[:, None] + torch.arange(n_tokens, device=self.lengths.device)[None, :]
        lo, hi = int(lengths.min().item()), int(lengths.max().item())
        span = hi + n_tokens
        if span > self.max_len:
            raise ValueError(f"KV cache overflow: {span} positions needed, the cache holds {self.max_len}.")
        self._positions, self._span = pos, span
        self._start = lo if lo == hi else None  # all rows at the same length: plain slices suffice
        return pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values (B, n_kv, T, hd) for one layer; return the cached span (B, n_kv, S, hd)."""
        assert self._positions is not None, "call begin() first"
        ck, cv = self.k[layer], self.v[layer]
        if self._rows is not None:  # a subset of slots: index by (row, position), read the rows back
            r = self._rows[:, None]
            ck[r, :, self._positions] = k.transpose(1, 2).to(ck.dtype)  # (B, T, n_kv, hd) at [row, :, pos]
            cv[r, :, self._positions] = v.transpose(1, 2).to(cv.dtype)
            return ck[self._rows, :, : self._span], cv[self._rows, :, : self._span]
        if self._start is not None:
            s, T = self._start, k.shape[2]
            ck[:, :, s : s + T] = k
            cv[:, :, s : s + T] = v
        else:
            idx = self._positions[:, None, :, None].expand(k.shape)
            ck.scatter_(2, idx, k.to(ck.dtype))
            cv.scatter_(2, idx, v.to(cv.dtype))
        return ck[:, :, : self._span], cv[:, :, : self._span]

    def attention_mask(self) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for scaled_dot_product_attention over the cached span.

        The cheap cases skip the mask: aligned rows decoding one token see every cached key; aligned
        rows prefilling from position 0 are plainly causal. Otherwise a boolean (B, 1, T, S) mask,
        True where a query may attend to a key.
        """
        assert self._positions is not None
        T = self._positions.shape[1]
        if self._start is not None and T == 1:
            return None, False
        if self._start == 0:
            return None, True
        keys = torch.arange(self._span, device=self.lengths.device)
        return keys[None, None, None, :] <= self._positions[:, None, :, None], False

    def advance(self, n_new: torch.Tensor) -> None:
        """Commit the call: row b now holds n_new[b] more real tokens."""
        if self._rows is None:
            self.lengths += n_new.to(self.lengths)
        else:
            self.lengths[self._rows] += n_new.to(self.lengths)
        self._positions, self._rows = None, None

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Forget rows (all by default) so their slots can serve new sequences."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, device=self.lengths.device)] = 0
