"""The scheduler: who waits, who runs, which blocks each sequence holds, what the next forward feeds.

Admission is bounded by KV memory, not by a slot count: a request joins when its worst case (prompt
plus max_new_tokens, in blocks, per choice) fits beside what the running sequences may still grow
into. Blocks are taken as a sequence grows (so memory follows real lengths) and returned at once when
it finishes or is cancelled. That reservation keeps the engine free of preemption: nothing admitted
can run out of blocks halfway. `max_num_seqs` caps the batch (the sampler's rows) on top.

One step = admit, ONE prefill chunk (at most `prefill_chunk` prompt tokens, several prompts batched),
then ONE decode step for every running sequence: a long prompt is split over steps and never stalls
the sequences already decoding for long.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tinychat.infer.engine.blocks import BlockKey, BlockManager
from tinychat.infer.engine.request import Event, GenerationRequest, RequestHandle
from tinychat.infer.engine.sampler import RowState
from tinychat.infer.text import TextTracker
from tinychat.infer.tool_calls import ToolCallParser


@dataclass
class Request:
    rid: int
    req: GenerationRequest
    handle: RequestHandle
    sink: Callable[[Event], None]
    submitted: float
    slot: int = 0  # the LoRA adapter's slot in the model (0: the base; model/peft/multi_lora.py)
    root: BlockKey | None = None  # the prefix cache's chain start for that adapter (None: the base)
    tokens: list[int] = field(default_factory=list)  # what its blocks hold: virtual-token ids + the prompt
    load: int = 0  # which load of that slot it was submitted under (AdapterSet.loads; 0: the base)
    seqs: list[Seq] = field(default_factory=list)
    completion_tokens: int = 0
    first_token: bool = False


@dataclass
class Seq:
    r: Request
    index: int  # the choice
    row: int  # the sampler row it holds while running
    state: str  # prefill | follow (waits for its leader's prefill) | decode
    tracker: TextTracker
    parser: ToolCallParser | None
    sampling: RowState
    reserve: int  # blocks it may hold at most (admission counted them)
    blocks: list[int] = field(default_factory=list)  # its block table
    keys: list[BlockKey] = field(default_factory=list)  # prefix-cache keys of its leading full blocks
    computed: int = 0  # positions whose keys/values are in its blocks
    output: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def prompt(self) -> list[int]:
        """The positions before the output: a prompt/prefix adapter's virtual tokens (negative ids, never
        fed to the model: their keys/values are written once, see Engine), then the prompt's tokens."""
        return self.r.tokens


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def slot_of(table: list[int], position: int, block_size: int) -> int:
    """The pool slot that holds a sequence's token at `position`, given its block table."""
    return table[position // block_size] * block_size + position % block_size


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_num_seqs: int, prefill_chunk: int, max_len: int, virtual: int = 0
    ) -> None:
        self.blocks, self.prefill_chunk, self.max_len = blocks, prefill_chunk, max_len
        self.virtual = virtual  # virtual tokens ahead of every prompt (a prompt/prefix adapter)
        self.waiting: deque[Request] = deque()
        self.running: list[Seq] = []
        self.free_rows = list(range(max_num_seqs))[::-1]

    def worst_case(self, req: GenerationRequest) -> int:
        """Blocks one choice may need: virtual tokens + prompt + output, plus one for a copy-on-write of a
        shared block (n > 1 choices; the virtual tokens' partial last block, copied when the prompt starts)."""
        total = min(self.virtual + len(req.prompt_ids) + req.params.max_new_tokens, self.max_len)
        cow = (1 if req.n > 1 else 0) + (1 if self.virtual % self.blocks.block_size else 0)
        return blocks_for(total, self.blocks.block_size) + cow

    def fits_ever(self, req: GenerationRequest) -> bool:
        """Whether the request fits an otherwise empty pool: the scratch block and the virtual tokens' blocks
        are held for good, their full blocks are shared by every choice (admission counts them as hits)."""
        bs = self.blocks.block_size
        held = 1 + blocks_for(self.virtual, bs)
        return req.n * self.worst_case(req) - self.virtual // bs <= self.blocks.num_blocks - held

    def outstanding(self) -> int:
        """Blocks the running sequences may still take."""
        return sum(max(0, s.reserve - len(s.blocks)) for s in self.running if not s.done)

    def admissible(self, req: GenerationRequest, hit_blocks: int) -> bool:
        need = req.n * self.worst_case(req) - hit_blocks
        return len(self.free_rows) >= req.n and need <= self.blocks.num_available - self.outstanding()

    def free(self, s: Seq) -> None:
        """Return a finished or cancelled sequence's blocks and row at once."""
        s.done = True
        self.blocks.release(s.blocks)
        s.blocks = []
        self.free_rows.append(s.row)

    def prefill_batch(self) -> list[tuple[Seq, int]]:
        """(sequence, prompt tokens this call) for as many prefilling sequences as the chunk budget allows."""
        budget, batch = self.prefill_chunk, []
        for s in self.running:
            if s.state != "prefill" or s.done or budget <= 0:  # done: cancelled between chunks, blocks returned
                continue
            n = min(len(s.prompt) - s.computed, budget)
            batch.append((s, n))
            budget -= n
        return batch

    def decode_batch(self) -> list[Seq]:
        return [s for s in self.running if s.state == "decode" and not s.done]

    def grow(self, s: Seq, n: int) -> list[tuple[int, int]]:
        """Make s's blocks cover positions [computed, computed + n), private where they will be written.
        Returns the copy-on-write copies (src, dst) the cache must make before the call."""
        bs, copies = self.blocks.block_size, []
        first, last = s.computed // bs, (s.computed + n - 1) // bs
        for j in range(first, last + 1):
            if j == len(s.blocks):
                s.blocks.append(self.blocks.allocate(prefer=s.blocks[-1] + 1 if s.blocks else None))
            else:
                src = self.blocks.writable(s.blocks, j)
                if src is not None:
                    copies.append((src, s.blocks[j]))
        return copies

    def register_full_blocks(self, s: Seq) -> None:
        """Offer s's newly completed blocks to the prefix cache (prompt and output alike: a chat's next
        turn repeats this one)."""
        full, start = s.computed // self.blocks.block_size, len(s.keys)
        if full > start:
            parent = s.keys[-1] if s.keys else s.r.root
            new = self.blocks.chain(s.prompt + s.output, full, parent, start)
            for j, key in enumerate(new, start):
                self.blocks.register(s.blocks[j], key)
            s.keys += new
