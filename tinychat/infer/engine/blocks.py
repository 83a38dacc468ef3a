"""The KV block manager: which pool blocks each sequence holds, shared prefixes, copy-on-write.

Why blocks (vLLM's PagedAttention, the operating system's paging applied to the KV cache): a
sequence holds ceil(length / block_size) blocks taken from one pool as it grows and returned the moment
it finishes or is cancelled, so memory follows the tokens actually cached, not a per-slot maximum.

Prefix caching: a full block is keyed by its tokens and the key of the block before it (a hash chain,
kept as nested tuples so equal keys mean equal prefixes, with no collision to worry about). A new prompt
takes every leading full block already cached for the same tokens instead of recomputing it. A block
nobody holds any more stays cached (least recently used first out) until its memory is needed.

Copy-on-write: blocks are reference-counted; n > 1 choices share the prompt's blocks, and a sequence
about to write into a block someone else also holds first gets its own copy (`writable`).

Block 0 is reserved: padded tokens of a batched call write their keys/values there.

Memory: the cache allocates the pool lazily, up to the highest block id handed out (`high_water`). A new
block comes from a free id below that mark first, then from the least recently used cached block, and only
then from above the mark, so cached prefixes live in memory the running sequences already needed and
resident memory stays flat under a steady load instead of creeping up to the cap as the cache fills
(bench/soak.py: +49% in 60 s before, with 64 streams).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

BlockKey = tuple  # (parent key or None, tokens of the block)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        assert num_blocks >= 2, "the pool needs the scratch block and one more"
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.ref[0] = 1  # the scratch block is never handed out
        self._free = list(range(1, num_blocks))  # a heap: the lowest id first keeps the pool compact
        self._is_free = [i > 0 for i in range(num_blocks)]
        self._n_free = num_blocks - 1
        self._cached: dict[BlockKey, int] = {}  # key -> block holding those tokens
        self._key_of: dict[int, BlockKey] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self.high_water = 1  # blocks [0, high_water) have been handed out: the part of the pool in memory

    # ------------------------------------------------------------------ counting
    @property
    def num_available(self) -> int:
        """Blocks that can be handed out now: free ones plus cached ones nobody holds."""
        return self._n_free + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds (cached-but-unheld blocks and the scratch block excluded): every other block is
        free or evictable. Counted, not scanned: the engine reads it after every step."""
        return self.num_blocks - 1 - self._n_free - len(self._evictable)

    # ------------------------------------------------------------------ allocation
    def allocate(self, prefer: int | None = None) -> int:
        """A block for a sequence to write (ref 1). `prefer` (the id after the sequence's last block) is taken
        when free, so one sequence's blocks tend to be consecutive and attention reads them in place."""
        grow = not self._evictable  # growing the pool is the last resort while cached blocks can be reused
        if (
            prefer is not None
            and 0 < prefer < self.num_blocks
            and self._is_free[prefer]
            and (prefer < self.high_water or grow)
        ):
            b = prefer
            self._n_free -= 1
        else:
            while self._free and not self._is_free[self._free[0]]:
                heapq.heappop(self._free)  # stale entries of blocks taken through `prefer`
            if self._free and (self._free[0] < self.high_water or grow):
                b = heapq.heappop(self._free)
                self._n_free -= 1
            elif self._evictable:
                b, _ = self._evictable.popitem(last=False)  # the least recently used cached block
                del self._cached[self._key_of.pop(b)]
            else:
                raise RuntimeError("out of KV blocks (the scheduler admits only what fits)")
        self._is_free[b] = False
        self.ref[b] = 1
        self.high_water = max(self.high_water, b + 1)
        return b

    def acquire(self, b: int) -> None:
        """Hold a block someone else (or the prefix cache) has: a shared prefix, or another choice's prompt."""
        if self.ref[b] == 0:
            self._evictable.pop(b, None)
        self.ref[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Give blocks back (a finished or cancelled sequence); cached ones stay findable until evicted."""
        for b in blocks:
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"block {b} released more often than held"
            if self.ref[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._is_free[b] = True
                    self._n_free += 1
                    heapq.heappush(self._free, b)

    def writable(self, blocks: list[int], j: int) -> int | None:
        """Copy-on-write: before writing into blocks[j], make it private. Returns the block to copy from
        (the caller copies its contents into the new blocks[j]) or None when it was private already."""
        b = blocks[j]
        if self.ref[b] == 1 and b not in self._key_of:
            return None
        new = self.allocate(prefer=blocks[j - 1] + 1 if j else None)
        self.release([b])
        blocks[j] = new
        return b

    # ------------------------------------------------------------------ prefix cache
    def chain(self, tokens: list[int], n_blocks: int, parent: BlockKey | None = None, start: int = 0) -> list[BlockKey]:
        """Keys of full blocks start..n_blocks-1 of `tokens` (each key includes its parent's)."""
        bs, keys = self.block_size, []
        for j in range(start, n_blocks):
            parent = (parent, tuple(tokens[j * bs : (j + 1) * bs]))
            keys.append(parent)
        return keys

    def match(self, tokens: list[int], root: BlockKey | None = None) -> list[int]:
        """Cached blocks holding the longest run of leading full blocks of `tokens` (acquired for the caller).
        `root` is the chain's start: None for the base model, a key of its own per LoRA adapter (the same
        tokens have other keys/values under another adapter).

        The last token is never taken from the cache: the model must run on it to give the next-token logits."""
        if not self.prefix_caching:
            return []
        out: list[int] = []
        for key in self.chain(tokens, (len(tokens) - 1) // self.block_size, root):
            b = self._cached.get(key)
            if b is None:
                break
            self.acquire(b)
            out.append(b)
        return out

    def register(self, b: int, key: BlockKey) -> None:
        """Block b now holds the full block `key`: later prompts with the same prefix may share it."""
        if self.prefix_caching and key not in self._cached and b not in self._key_of:
            self._cached[key] = b
            self._key_of[b] = key

    def clear_cache(self) -> None:
        """Forget every cached prefix (the pool's memory is being released)."""
        for b in list(self._evictable):
            self._is_free[b] = True
            self._n_free += 1
            heapq.heappush(self._free, b)
        self._evictable.clear()
        held = {b: k for b, k in self._key_of.items() if self.ref[b] > 0}
        self._key_of = held
        self._cached = {k: b for b, k in held.items()}
        self.high_water = 1 + max((b for b in range(1, self.num_blocks) if self.ref[b] > 0), default=0)
