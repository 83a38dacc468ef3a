"""Key/value caches and the attention that reads them, with the attention metadata passed explicitly.

Why explicit metadata (vLLM's design): one forward call is described by an object built before the
call (positions of the new tokens, where their keys/values go, which keys each query may see), handed
to `Model.forward(..., meta=)` and read by every layer. The cache holds tensors, not call state, so
nothing couples a layer to what a previous call left behind. Each cache is also the attention
backend for its own layout (`cache.attend`): it writes the new keys/values and runs scaled dot-product
attention over what a query may see, reading the cached span in place whenever the layout allows.

Two layouts:
  * `KVCache`: n_layer x rows x n_kv x max_len x hd, a length per row; batched `generate` (ragged
    prompts, right-padded, one prefill) and RL rollouts. `plan()` builds the call's metadata and
    `commit()` advances the lengths; Model.forward does both when it is given no `meta`.
  * `PagedKVCache`: one pool of fixed-size blocks shared by every sequence of the serving engine; a
    block table per sequence (tinychat.infer.engine.blocks decides which blocks). Keys are stored
    token-major (a positions x n_kv x hd tensor per layer) so the span of a sequence whose blocks are
    consecutive is a plain view; only a scattered span is gathered (one index per layer).

Both keep keys/values in the compute dtype (the caller's autocast dtype, e.g. bf16), so a decode step
never casts the cached span.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tinychat.model import native
from tinychat.model.config import ModelConfig


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, H, T, hd) attention of q over k/v (B, n_kv, S, hd); GQA when the head counts differ.

    `bias` (B, H, T, S), when given, is added to the scores (UniPELT's prefix gate, model/peft/unipelt.py);
    the visibility rule (mask or causal) is folded into it, so SDPA gets one float mask."""
    if k.dtype != q.dtype:  # checked here: a no-op .to() still costs a dispatch per layer and token
        k, v = k.to(q.dtype), v.to(q.dtype)
    if bias is not None:
        if mask is None and causal:  # SDPA's is_causal: query i sees keys 0..i (top-left aligned)
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask
        mask, causal = bias.to(q.dtype), False
    if (
        torch.compiler.is_compiling()
        and q.shape[0] == 1
        and q.shape[2] <= 8
        and bias is None
        and mask is not None
        and mask.dtype == torch.bool
    ):
        return matmul_attention(q, k, v, mask)  # a compiled decode step (not a long compiled training window)
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sdpa for compiled decode steps of one row: two matmuls and a softmax, which inductor fuses with the mask,
    where SDPA's CPU kernel is an opaque call of ~40 µs per layer for one query over a few hundred keys
    (measured on tinychat generate --compile: tiny int8 987 against 789 tokens/s, small 270 against 242, same
    tokens). From two rows on it loses: the serving engine's compiled step over gathered paged keys took 3.7 /
    5.3 / 8.4 / 13.2 ms at 2 / 4 / 8 / 16 rows against SDPA's 2.8 / 3.6 / 5.6 / 8.9 (docs/engine.md).

    q (B, H, T, hd); k, v (B, KV, S, hd); mask (B|1, 1, T, S) bool. The G = H / KV query heads that share a
    key/value head are stacked along T, so GQA needs no copy of k and v."""
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    scores = q.reshape(B, KV, G * T, hd) @ k.transpose(-1, -2) * (1.0 / math.sqrt(hd))  # (B, KV, G*T, S)
    seen = mask.reshape(mask.shape[0], 1, 1, T, S).expand(-1, 1, G, T, S).reshape(mask.shape[0], 1, G * T, S)
    probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
    return (probs @ v).reshape(B, H, T, hd)


def visible_keys(positions: torch.Tensor, span: int) -> torch.Tensor:
    """(B, 1, T, span) bool: a query at position p sees the keys at positions 0..p of its own row."""
    return torch.arange(span, device=positions.device)[None, None, None, :] <= positions[:, None, :, None]


@dataclass
class CacheMeta:
    """One call's view of a `KVCache`: built by `KVCache.plan`, read by every layer."""

    positions: torch.Tensor  # (B, T) absolute positions of the new tokens
    rows: torch.Tensor | None  # (B,) cache rows this call feeds; None: all rows
    start: int | None  # all rows at the same length: the position where the new tokens go (plain slices)
    span: int  # key positions the call looks at
    mask: torch.Tensor | None  # (B, 1, T, span) bool, True where a query may see a key; None: see below
    is_causal: bool  # aligned rows prefilling from position 0


class KVCache:
    """A pre-allocated cache with a length per row (ragged batches share one forward call).

    Row b writes its new keys/values at positions lengths[b] + t; the mask lets a query at position p
    see exactly the keys at positions <= p of its own row. Rows may be right-padded within one call
    (give `n_new` per row to `commit`): the padded slots hold junk that no query can see, because the
    next real token of that row is written over them before any query reaches that far.
    """

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
        self._lengths = [0] * batch_size  # the same on the host: planning needs no device sync
        self.batch_size = batch_size

    def plan(self, n_tokens: int, rows: torch.Tensor | None = None) -> CacheMeta:
        """Metadata for a call of `n_tokens` new tokens per row (of `rows`, by default every row)."""
        host = self._lengths if rows is None else [self._lengths[r] for r in rows.tolist()]
        lengths = self.lengths if rows is None else self.lengths[rows]
        pos = lengths[:, None] + torch.arange(n_tokens, device=self.lengths.device)[None, :]
        lo, hi = min(host), max(host)
        span = hi + n_tokens
        if span > self.max_len:
            raise ValueError(f"KV cache overflow: {span} positions needed, the cache holds {self.max_len}.")
        start = lo if lo == hi else None
        if start is not None and n_tokens == 1:  # aligned rows decoding one token see every cached key
            mask, causal = None, False
        elif start == 0:  # aligned rows prefilling from position 0: plainly causal
            mask, causal = None, True
        else:
            mask, causal = visible_keys(pos, span), False
        return CacheMeta(pos, rows, start, span, mask, causal)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, m: CacheMeta, bias: Tensor | None = None) -> Tensor:
        """Write this layer's new k/v (B, n_kv, T, hd) and attend q (B, H, T, hd) over the cached span (`bias`:
        (B, H, T, span) added to the scores, see sdpa)."""
        ck, cv = self.k[layer], self.v[layer]
        T = k.shape[2]
        if m.rows is None and m.start is not None:  # aligned rows: slices, no copy of the span
            ck[:, :, m.start : m.start + T] = k
            cv[:, :, m.start : m.start + T] = v
            ks, vs = ck[:, :, : m.span], cv[:, :, : m.span]
        elif m.rows is None:
            idx = m.positions[:, None, :, None].expand(k.shape)
            ck.scatter_(2, idx, k.to(ck.dtype))
            cv.scatter_(2, idx, v.to(cv.dtype))
            ks, vs = ck[:, :, : m.span], cv[:, :, : m.span]
        else:  # a subset of rows: index by (row, position), read the rows back
            r = m.rows[:, None]
            ck[r, :, m.positions] = k.transpose(1, 2).to(ck.dtype)  # (B, T, n_kv, hd) at [row, :, pos]
            cv[r, :, m.positions] = v.transpose(1, 2).to(cv.dtype)
            ks, vs = ck[m.rows, :, : m.span], cv[m.rows, :, : m.span]
        return sdpa(q, ks, vs, m.mask, m.is_causal, bias)

    def commit(self, m: CacheMeta, n_new: torch.Tensor | None = None) -> None:
        """The call is done: each row it fed now holds n_new[b] (default: all T) more real tokens."""
        T = m.positions.shape[1]
        rows = range(self.batch_size) if m.rows is None else m.rows.tolist()
        add = [T] * len(rows) if n_new is None else n_new.tolist()
        for r, a in zip(rows, add):
            self._lengths[r] += a
        if m.rows is None:
            self.lengths += T if n_new is None else n_new.to(self.lengths)
        else:
            self.lengths[m.rows] += T if n_new is None else n_new.to(self.lengths)

    def rewind(self, length: int) -> None:
        """Keep only the first `length` positions of every row (speculative decoding drops rejected tokens;
        their keys/values are overwritten by the next call)."""
        self._lengths = [min(n, length) for n in self._lengths]
        self.lengths.clamp_(max=length)

    def preload(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows start over holding n given positions, k/v (n_layer, n_kv, n, hd) for each: the virtual tokens
        of a prompt/prefix adapter (model/peft/prompt.py), written before the row's prompt is read."""
        n = k.shape[2]
        self.k[:, rows, :, :n] = k[:, None].to(self.k.dtype)  # (n_layer, rows, n_kv, n, hd)
        self.v[:, rows, :, :n] = v[:, None].to(self.v.dtype)
        self.lengths[rows] = n
        for r in rows.tolist():
            self._lengths[r] = n

    def share_prefix(self, row: int = 0) -> None:
        """Every row starts over holding `row`'s cached positions (a copy of them): a batch whose prompts
        share a prefix computes it once."""
        n = self._lengths[row]
        self.k[:, :, :, :n] = self.k[:, row : row + 1, :, :n]
        self.v[:, :, :, :n] = self.v[:, row : row + 1, :, :n]
        self.lengths.fill_(n)
        self._lengths = [n] * self.batch_size

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows`, in that order, as rows 0..n-1 (one copy of their span): a batch whose
        finished sequences are dropped stops spending compute on them."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.lengths = self.lengths[rows]
        self._lengths = [self._lengths[r] for r in rows.tolist()]
        self.batch_size = len(self._lengths)

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Forget rows (all by default) so they can hold new sequences."""
        if rows is None:
            self.lengths.zero_()
            self._lengths = [0] * self.batch_size
        else:
            rows = torch.as_tensor(rows, device=self.lengths.device)
            self.lengths[rows] = 0
            for r in rows.tolist():
                self._lengths[r] = 0


# ---------------------------------------------------------------------------------------------- paged
@dataclass
class PagedMeta:
    """One call's view of a `PagedKVCache`: built by the engine from its block tables.

    Rows are right-padded to T new tokens; a padded token's key goes to a scratch position that no
    query sees (`slots` points it at position 0 of the reserved block 0)."""

    positions: torch.Tensor  # (B, T) absolute positions of the new tokens
    slots: torch.Tensor  # (B*T,) pool position each new key/value is written to
    keys: torch.Tensor | None  # (B, S) pool positions of the keys each row reads; None: the view below
    view_start: int  # keys is None: row 0 reads pool positions [view_start, view_start + S) (batch 1)
    span: int  # S, key positions per row
    mask: torch.Tensor | None  # (B, 1, T, S) bool, True where a query may see a key; None: all of them
    is_causal: bool = False


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # pools paged_attention.cpp reads


class PagedKVCache:
    """A pool of `num_blocks` blocks of `block_size` positions for every layer, in the compute dtype by default, or
    in a narrower one (`serve --kv_cache_dtype float16|bfloat16`: half the memory per token, read and widened
    as attention needs it, llama.cpp's default cache type and vLLM's --kv-cache-dtype).

    Block 0 is reserved as the scratch block for padded tokens. The pool grows on demand (`ensure`)
    up to its capacity and can be dropped when the engine is idle (`release`), so the memory held is
    what the sequences hold, not what the server could hold.
    """

    def __init__(
        self, cfg: ModelConfig, block_size: int, num_blocks: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        self.cfg, self.block_size, self.num_blocks = cfg, block_size, num_blocks
        self.device, self.dtype = torch.device(device), dtype
        self.allocated = 0  # blocks backed by memory (a prefix of the block ids)
        # one (positions, n_kv, hd) tensor per layer, not views of one: a compiled step (infer/compiled.py)
        # then writes each in place, where a view of one big input would be copied whole every step
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        # one query per row over keys in place (paged_attention.cpp), where it computes what sdpa would: an fp32
        # query on the CPU (the pool fp32, or 16-bit and widened as read), the plain visibility rule (sliding
        # windows and ALiBi give layers masks of their own), and a head size its 8-float vectors divide
        fits = self.device.type == "cpu" and dtype in KERNEL_DTYPES and cfg.head_dim % 8 == 0
        if dtype == torch.float16 and "f16c" not in native.cpu_flags():
            fits = False
        self.decode_kernel = native.paged_decode_attention() if fits and cfg.plain_masks else None

    @property
    def block_bytes(self) -> int:
        c = self.cfg
        return 2 * c.n_layer * self.block_size * c.n_kv_head * c.head_dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.allocated * self.block_bytes

    def ensure(self, blocks: int) -> None:
        """Back block ids [0, blocks) with memory, growing the pool by doubling (amortised copies)."""
        if blocks <= self.allocated:
            return
        assert blocks <= self.num_blocks, f"{blocks} blocks asked for, the pool holds {self.num_blocks}"
        new = min(self.num_blocks, max(blocks, 2 * self.allocated, 4))
        c, n = self.cfg, self.allocated * self.block_size
        shape = (new * self.block_size, c.n_kv_head, c.head_dim)
        for pool in (self.k, self.v):
            for layer in range(c.n_layer):
                t = torch.zeros(shape, device=self.device, dtype=self.dtype)
                if self.allocated:
                    t[:n] = pool[layer]
                    pool[layer] = t
                else:
                    pool.append(t)
        self.allocated = new

    def release(self) -> None:
        """Free all memory (the engine calls this when nothing holds a block)."""
        self.k, self.v = [], []
        self.allocated = 0

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put n given positions, k/v (n_layer, n_kv, n, hd), at pool positions `slots` (n,): a prompt/prefix
        adapter's virtual tokens, written once into blocks every sequence then shares."""
        for layer in range(self.cfg.n_layer):
            self.k[layer].index_copy_(0, slots, k[layer].transpose(0, 1).to(self.dtype))  # (n, n_kv, hd)
            self.v[layer].index_copy_(0, slots, v[layer].transpose(0, 1).to(self.dtype))

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: block `dst` becomes a private copy of `src` (every layer)."""
        bs = self.block_size
        for t in self.k + self.v:
            t[dst * bs : (dst + 1) * bs] = t[src * bs : (src + 1) * bs]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, m: PagedMeta, bias: Tensor | None = None) -> Tensor:
        """Write this layer's new k/v (B, n_kv, T, hd) to their blocks; attend q (B, H, T, hd) over each row's keys
        (`bias`: (B, H, T, span) added to the scores, see sdpa)."""
        pk, pv = self.k[layer], self.v[layer]  # (P, n_kv, hd)
        B, n_kv, T, hd = k.shape
        pk.index_copy_(0, m.slots, k.transpose(1, 2).reshape(B * T, n_kv, hd).to(pk.dtype))
        pv.index_copy_(0, m.slots, v.transpose(1, 2).reshape(B * T, n_kv, hd).to(pv.dtype))
        keys = m.keys
        if keys is None and T == 1 and pk.dtype != q.dtype and self.decode_kernel is not None:
            # one row over consecutive blocks of a 16-bit pool: the kernel widens what it reads, where the view
            # below would be copied whole into the compute dtype every step
            keys = torch.arange(m.view_start, m.view_start + m.span, device=q.device)[None].expand(B, -1)
        if (
            self.decode_kernel is not None
            and T == 1
            and keys is not None
            and bias is None
            and q.dtype == torch.float32
            and (B > 1 or not torch.compiler.is_compiling())  # one compiled row: matmul_attention, fused, is faster
        ):  # a decode step over scattered blocks: each row's keys are read where they lie, nothing gathered
            return self.decode_kernel(q, pk, pv, keys, m.positions, 1.0 / math.sqrt(hd))
        if m.keys is None:  # consecutive blocks: the span is a view of the pool, nothing is copied
            ks = pk[m.view_start : m.view_start + m.span][None]
            vs = pv[m.view_start : m.view_start + m.span][None]
        else:  # scattered blocks: one gather of each row's span, of whole (n_kv * hd) rows: on CPU, index_select
            # over a 2-D view copies each row in one piece, several times faster than over the 3-D pool
            idx, P = m.keys.reshape(-1), pk.shape[0]
            ks = pk.view(P, n_kv * hd).index_select(0, idx).view(B, m.span, n_kv, hd)
            vs = pv.view(P, n_kv * hd).index_select(0, idx).view(B, m.span, n_kv, hd)
        if ks.dtype != q.dtype:  # a pool narrower than the compute (--kv_cache_dtype): widened for SDPA
            ks, vs = ks.to(q.dtype), vs.to(q.dtype)
        return sdpa(q, ks.transpose(1, 2), vs.transpose(1, 2), m.mask, m.is_causal, bias)
