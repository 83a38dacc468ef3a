"""The serving engine: continuous batching over a paged KV cache, in one background thread.

Why this shape (vLLM v1, reduced to what a small model on a CPU or one GPU needs): the engine thread
owns the model and loops over steps; each step the scheduler (scheduler.py) admits what fits in KV
memory and picks one prefill chunk and the decode batch, the runner here turns them into token ids
and explicit attention metadata (PagedMeta: positions, the pool slots to write, the keys each row
reads) for one forward call each, the sampler (sampler.py) picks tokens from resident per-row state,
and the output processor (output.py) streams text and finishes choices. KV blocks (blocks.py) come
from one pool shared by every sequence, with a prefix cache and copy-on-write for n > 1.
Embeddings run on their own thread, so /v1/embeddings never stalls a stream.
The model is touched for generation only by the engine thread; callers talk to it through `submit`
(events come back through a callback or a queue) and `RequestHandle.cancel`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn
from torch._dynamo.exc import FailOnRecompileLimitHit

from tinychat.device import DTYPES
from tinychat.errors import UserError
from tinychat.infer.compiled import check_compilable, decode_step, sampled_steps, static_length
from tinychat.infer.engine import request as rq
from tinychat.infer.engine.blocks import BlockManager
from tinychat.infer.engine.output import OutputProcessor
from tinychat.infer.engine.sampler import Sampler
from tinychat.infer.engine.scheduler import Request, Scheduler, Seq, blocks_for, slot_of
from tinychat.infer.text import TextTracker
from tinychat.infer.tool_calls import ToolCallParser
from tinychat.model.kv_cache import PagedKVCache, PagedMeta, visible_keys
from tinychat.model.packed import pack_linears, unpack_linears
from tinychat.model.peft.multi_lora import AdapterSet
from tinychat.model.pooling import mean_pool

log = logging.getLogger("tinychat.engine")


def option_dtype(option: str, name: str, auto: torch.dtype | None) -> torch.dtype | None:
    """The dtype an EngineConfig dtype option names (kv_cache_dtype, prefill_dtype): `auto` for "auto", other
    names are --dtype's."""
    if name == "auto":
        return auto
    if name not in DTYPES:
        raise UserError(f"{option} must be auto, float32, float16 or bfloat16; got {name!r}.")
    return DTYPES[name]


class Engine:
    """Continuous-batching generation for one model; see the module docstring for the design."""

    submit_waits = False  # submit returns at once (see EngineProcess: one whose submit waits on a pipe)

    def __init__(
        self, model, tokenizer, cfg: rq.EngineConfig | None = None, adapters: AdapterSet | None = None
    ) -> None:  # noqa: ANN001
        """`adapters`: the LoRA adapters `model` serves beside its base (multi_lora.serve_adapters); a request
        picks one by name (GenerationRequest.adapter) and rows of different adapters share every batch."""
        self.virtual = getattr(model, "virtual_tokens", None)  # a prompt/prefix adapter (model/peft/prompt.py)
        if self.virtual is not None and adapters is not None:
            raise UserError("LoRA adapters cannot be served over a prompt/prefix adapter; serve one or the other.")
        if cfg is not None and cfg.compile:
            check_compilable(model)
            if adapters is not None:
                raise UserError("compiled decoding does not batch LoRA adapters yet; serve them without --compile.")
        self.model, self.tok, self.adapters = model.eval(), tokenizer, adapters
        self.cfg = cfg = cfg or rq.EngineConfig()
        twin = self._prefill_copy(model, cfg.prefill_dtype)
        self.prefill_model = model if twin is None else twin  # what prompt chunks run on
        if hasattr(model, "fuse_projections"):
            model.fuse_projections()  # q/k/v and gate/up in one matmul each (weights become views, no copy)
            if cfg.pack_weights:  # fp32 on the CPU: decode-step matmuls over packed weights (model/packed.py)
                pack_linears(model)
        mcfg = model.cfg
        self.max_len = min(cfg.max_model_len or mcfg.max_seq_len, mcfg.max_seq_len)
        p = model.model.norm.weight
        self.device = p.device
        bs = cfg.block_size
        self.compute_dtype = model.compute_dtype()
        kv = option_dtype("kv_cache_dtype", cfg.kv_cache_dtype, self.compute_dtype)
        self.cache = PagedKVCache(mcfg, bs, 2, self.device, kv)
        seq_blocks = blocks_for(self.max_len, bs)
        if cfg.kv_cache_mb is None:
            num_blocks = cfg.max_num_seqs * seq_blocks + 1
        else:
            num_blocks = int(cfg.kv_cache_mb * 2**20 // self.cache.block_bytes)
            if num_blocks < 2:
                raise UserError(
                    f"kv_cache_mb={cfg.kv_cache_mb} holds no KV block: one block of {bs} positions needs "
                    f"{self.cache.block_bytes / 2**20:.3f} MB (a second one is the scratch block); raise it."
                )
        self.cache.num_blocks = num_blocks
        self.blocks = BlockManager(num_blocks, bs, cfg.prefix_caching)
        self.num_slots = cfg.max_num_seqs  # sequences decoded at once
        # virtual tokens: n positions ahead of every prompt, held under negative ids that no prompt has; their
        # keys/values are computed once and written into `_prefix_blocks`, which every sequence starts from
        n_virtual = self.virtual.num_tokens if self.virtual is not None else 0
        self.virtual_ids = [-1 - i for i in range(n_virtual)]
        self._prefix_blocks: list[int] = []
        if blocks_for(n_virtual + 1, bs) > num_blocks - 1:
            raise UserError(
                f"kv_cache_mb={cfg.kv_cache_mb} cannot hold the adapter's {n_virtual} virtual tokens and a "
                "prompt token; raise it."
            )
        self.sched = Scheduler(self.blocks, cfg.max_num_seqs, cfg.prefill_chunk, self.max_len, n_virtual)
        self.stop_ids = sorted(tokenizer.stop_ids)
        self.sampler = Sampler(cfg.max_num_seqs, mcfg.vocab_size, self.stop_ids, self.device)
        self.stats = rq.EngineStats(free_slots=cfg.max_num_seqs)
        self.out = OutputProcessor(self.stats, self.stop_ids, self.max_len, self._free)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet admitted (guarded by _lock)
        self._closed = False  # the loop has ended: nothing new is accepted (guarded by _lock)
        self._ids = itertools.count(1)
        self._rate: deque[tuple[float, int]] = deque()
        self._warned_recompile = False  # _decode: a compiled step dynamo refused, told once
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._embedder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinychat-embed")
        self._idle_since = time.perf_counter()
        # called on the engine thread after each pass of its loop (a step, or a wake-up with nothing to run):
        # an engine in a process of its own (serve/engine_process.py) sends that pass's events in one write
        self.after_pass: Callable[[], None] | None = None

    @property
    def context(self) -> int:
        """Tokens a request may use, prompt and completion together: the window less the virtual tokens of a
        prompt/prefix adapter, which take the first positions of every sequence."""
        return self.max_len - len(self.virtual_ids)

    @property
    def kv_bytes(self) -> int:
        """KV memory allocated now (it grows with the sequences and is dropped when the engine idles)."""
        return self.cache.nbytes

    # ------------------------------------------------------------------ public API (any thread)
    def start(self) -> Engine:
        if self._thread is None:
            if self.cfg.compile:
                self._compile_now()
            self._thread = threading.Thread(target=self._loop, name="tinychat-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, req: rq.GenerationRequest, sink: Callable[[rq.Event], None] | None = None) -> rq.RequestHandle:
        """Queue a request. Events go to `sink` (called on the engine thread; keep it cheap) or, without
        one, to the handle's own queue for iteration. Raises UserError for a request that can never
        run and EngineOverloaded when the queue is full."""
        req.params.validate()
        if not req.prompt_ids:
            raise UserError("the prompt is empty; give at least one token.")
        if not 1 <= req.n <= self.num_slots:
            raise UserError(f"n must be between 1 and {self.num_slots} (the engine's max_num_seqs), got {req.n}.")
        total = len(self.virtual_ids) + len(req.prompt_ids) + req.params.max_new_tokens
        if total > self.max_len:
            virtual = f"{len(self.virtual_ids)} virtual tokens of the adapter, " if self.virtual_ids else ""
            raise UserError(
                f"the context window is {self.max_len} tokens, but {total} were asked for "
                f"({virtual}{len(req.prompt_ids)} in the prompt, {req.params.max_new_tokens} to generate)."
            )
        if not self.sched.fits_ever(req):
            raise UserError(f"{req.n} choices of {total} tokens do not fit in the engine's KV memory; ask for fewer.")
        slot, load = self._slot(req.adapter)
        V = self.model.cfg.vocab_size
        for t in [*req.prompt_ids, *(req.logit_bias or {}), *req.banned_ids]:
            if not 0 <= t < V:
                raise UserError(f"token id {t} is outside the vocabulary (0..{V - 1}).")
        rid = next(self._ids)
        events: queue.Queue | None = None
        if sink is None:
            events = queue.Queue()
            sink = events.put
        handle = rq.RequestHandle(rid, self._wake, events)
        root = None if slot == 0 else (None, ("adapter", load))  # no block of tokens has such a key
        tokens = self.virtual_ids + req.prompt_ids
        with self._lock:
            if self._closed:
                raise UserError("the engine was stopped.")
            if self._queued >= self.cfg.max_queue:
                self.stats.requests_rejected += 1
                raise rq.EngineOverloaded(f"{self._queued} requests are already waiting; retry later.")
            self._queued += 1
            self.stats.queue_depth = self._queued
            self._inbox.put(Request(rid, req, handle, sink, time.perf_counter(), slot, root, tokens, load))
        return handle

    def _prefill_copy(self, model: nn.Module, name: str) -> nn.Module | None:
        """EngineConfig.prefill_dtype: a copy of the weights in that dtype that prompt chunks run on, or None
        (prompts run on the model itself). Why: a burst of prompts is arithmetic-bound, and a CPU with bf16
        dot products (AVX-512 BF16, AMX) multiplies a prefill's many rows in bf16 2.2-6.6x faster than in
        fp32, while one decode row has no packed bf16 path and stays fp32 (docs/engine.md). The prompt's keys
        and values are then rounded to bf16 precision, as with `--kv_cache_dtype bfloat16`."""
        dtype = option_dtype("prefill_dtype", name, None)
        if dtype is None:
            return None
        if any(t.dtype != torch.float32 for t in itertools.chain(model.parameters(), model.buffers())):
            raise UserError(
                "prefill_dtype needs a float32 model (a bf16, fp16 or quantized one prefills in its own dtype)."
            )
        if self.virtual is not None or self.adapters is not None:
            raise UserError("prefill_dtype does not serve adapters yet; serve them without it.")
        if dtype == torch.float32:
            return None
        twin = unpack_linears(copy.deepcopy(model)).to(dtype).eval()  # (made before `model` is packed, unless
        # a model served before comes back: then its packed copies are dropped here)
        if hasattr(twin, "fuse_projections"):
            twin.fuse_projections()
        return twin

    def _slot(self, name: str) -> tuple[int, int]:
        """(slot, load) of an adapter name ("": the base, (0, 0)); UserError for one not served."""
        if not name:
            return 0, 0
        index = self.adapters.index if self.adapters is not None else {}  # one snapshot: slot and load agree
        if name not in index:
            served = ", ".join(index) or "none"
            raise UserError(f"unknown adapter {name!r}; this engine serves the base and these adapters: {served}.")
        slot, load, _ = index[name]
        return slot, load

    def _updatable(self) -> AdapterSet:
        if self.adapters is None or not self.adapters.updatable:
            raise UserError("this engine was not started with room for adapters loaded while serving.")
        return self.adapters

    def load_adapter(self, name: str, path: str) -> Future:
        """Serve one more LoRA adapter (multi_lora.AdapterSet.prepare, here; install, between two engine steps).
        The Future's result is its slot; UserError for a bad adapter, a name in use or no free slot."""
        aset = self._updatable()
        prepared = aset.prepare(name, path)  # reading and checking files stays off the engine thread
        return self._between_steps(lambda: aset.install(prepared))

    def unload_adapter(self, name: str) -> Future:
        """Stop serving adapter `name` between two engine steps; UserError (in the Future) for an unknown name or
        one that requests still use (waiting or running: finish or cancel them first)."""
        aset = self._updatable()

        def unload() -> int:
            if name not in aset.served:
                raise UserError(f"no adapter named {name!r} is served; served: {', '.join(aset.served) or 'none'}.")
            slot = aset.slot(name)
            reqs = [*self.sched.waiting, *(s.r for s in self.sched.running if not s.done)]
            # (cancelled requests are reaped at the next step; a request's n choices count once)
            users = len({id(r) for r in reqs if r.slot == slot and not r.handle.cancelled})
            if users:
                raise UserError(f"adapter {name!r} is in use by {users} request(s); unload it when they are done.")
            return aset.unload(name)

        return self._between_steps(unload)

    def _between_steps(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread before its next step (the model's adapters change only there)."""
        fut: Future = Future()
        with self._lock:  # (the loop closes the inbox under this lock: nothing put here is left unanswered)
            if self._closed or self._thread is None:
                raise UserError("the engine is not running.")
            self._inbox.put((fn, fut))
        return fut

    def embed(self, batch: list[list[int]]) -> Future:
        """Mean-pooled, L2-normalised final hidden states of each token list, on the embedding thread
        (a read-only forward beside the engine's: streams keep flowing while it runs)."""
        for ids in batch:
            if not 1 <= len(ids) <= self.model.cfg.max_seq_len:
                raise UserError(f"each input must have 1 to {self.model.cfg.max_seq_len} tokens, got {len(ids)}.")

        def work() -> list[list[float]]:
            with torch.inference_mode():
                return mean_pool(self.model, batch, self.device).tolist()

        return self._embedder.submit(work)

    @property
    def alive(self) -> bool:
        """The engine thread is running (GET /health)."""
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> rq.MetricsSnapshot:
        """The counters and gauges /metrics shows (a copy: the engine thread keeps writing the originals)."""
        stats = copy.copy(self.stats)
        stats.ttft_buckets = dict(stats.ttft_buckets)
        kv_blocks = self.blocks.num_blocks - 1  # the scratch block is never a sequence's
        return rq.MetricsSnapshot(stats, self.num_slots, self.kv_bytes, kv_blocks, self.tokens_per_second())

    def tokens_per_second(self) -> float:
        """Tokens generated over the last RATE_WINDOW seconds, per second (0 when idle)."""
        now = time.perf_counter()
        recent = [k for t, k in list(self._rate) if now - t <= rq.RATE_WINDOW]
        return sum(recent) / rq.RATE_WINDOW

    # ------------------------------------------------------------------ engine thread
    def _wake(self) -> None:
        self._inbox.put(None)

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                busy = self.sched.waiting or self.sched.running
                self._drain(block=not busy)
                if not (self.sched.waiting or self.sched.running):
                    self._maybe_release()
                else:
                    try:
                        self.step()
                    except Exception as e:  # a bug: fail what is running, keep serving
                        log.exception("engine step failed")
                        self._fail_all(f"internal engine error: {type(e).__name__}: {e}")
                    self._idle_since = time.perf_counter()
                if self.after_pass is not None:
                    self.after_pass()
            with self._lock:
                self._closed = True  # submit and _between_steps refuse from now on
            self._drain(block=False)  # what was queued before that: requests fail below, calls are refused
            self._fail_all("the engine was stopped")
            if self.after_pass is not None:
                self.after_pass()

    def _maybe_release(self) -> None:
        """Idle long enough: give the KV pool's memory back (cached prefixes go with it)."""
        if self.cache.allocated and time.perf_counter() - self._idle_since >= self.cfg.idle_release_s:
            self.blocks.release(self._prefix_blocks)  # rewritten by the next admission
            self._prefix_blocks = []
            self.blocks.clear_cache()
            self.cache.release()

    def _write_prefix(self) -> None:
        """The virtual tokens' keys/values, once, into blocks the engine holds for as long as the pool lives;
        the full ones are offered to the prefix cache under the virtual ids, so prompts chain after them."""
        if self.virtual is None or self._prefix_blocks:
            return
        bs, n = self.blocks.block_size, len(self.virtual_ids)
        blocks: list[int] = []
        try:
            for _ in range(blocks_for(n, bs)):
                blocks.append(self.blocks.allocate(blocks[-1] + 1 if blocks else None))
            self.cache.ensure(1 + max(blocks))
            with torch.inference_mode():
                k, v = self.virtual.prefix_kv(self.model)  # (n_layer, n_kv, n, hd)
            self.cache.write(torch.tensor([slot_of(blocks, p, bs) for p in range(n)], device=self.device), k, v)
        except BaseException:
            self.blocks.release(blocks)  # nothing half-written is ever used
            raise
        for b, key in zip(blocks, self.blocks.chain(self.virtual_ids, n // bs)):
            self.blocks.register(b, key)
        self._prefix_blocks = blocks

    def _start_blocks(self, r: Request) -> tuple[list[int], int, int]:
        """The blocks a new sequence starts from (held for it), how many of them admission may count as already
        there, and the positions they hold: the prefix cache's longest hit, or at least the virtual tokens'
        blocks (a partial last one is shared until the prompt's first token goes into a private copy, so
        admission does not count it)."""
        hit = self.blocks.match(r.tokens, r.root)
        n, bs = len(self.virtual_ids), self.blocks.block_size
        if len(hit) * bs >= n:
            return hit, len(hit), len(hit) * bs
        self.blocks.release(hit)
        for b in self._prefix_blocks:
            self.blocks.acquire(b)
        return list(self._prefix_blocks), n // bs, n

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, Request):
                self._accept(item)
            elif isinstance(item, tuple):  # a call between steps (_between_steps)
                fn, fut = item
                try:
                    if self._closed:
                        raise UserError("the engine was stopped.")
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - handed to the caller, who turns it into a 4xx
                    fut.set_exception(e)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _accept(self, r: Request) -> None:
        """Queue a submitted request, unless its adapter was unloaded (or replaced) after it was submitted."""
        if r.slot and (self.adapters is None or r.load == 0 or self.adapters.load_id(r.slot) != r.load):
            self._dequeued()
            self.stats.requests_failed += 1
            msg = f"adapter {r.req.adapter!r} was unloaded before this request started"
            self.out.emit(r, rq.Done(len(r.req.prompt_ids), 0, error=msg, code="adapter_unloaded"))
            return
        self.sched.waiting.append(r)

    def step(self) -> None:
        """One scheduling step: reap cancelled, admit, one prefill chunk, one decode step."""
        self._reap_cancelled()
        self._admit()
        batch = self.sched.prefill_batch()
        if batch:
            self._prefill(batch)
        decoding = self.sched.decode_batch()
        if decoding:
            self._decode(decoding)
        self.sched.running = [s for s in self.sched.running if not s.done]
        self._update_gauges()
        self.stats.steps += 1

    def _update_gauges(self) -> None:
        self.stats.free_slots = len(self.sched.free_rows)
        self.stats.running_seqs = self.num_slots - len(self.sched.free_rows)
        self.stats.kv_blocks_used = self.blocks.num_used

    # ------------------------------------------------------------------ admission and freeing
    def _admit(self) -> None:
        sched = self.sched
        if sched.waiting:
            self._write_prefix()
        while sched.waiting:
            r = sched.waiting[0]
            req = r.req
            hit, counted, computed = self._start_blocks(r)
            if not sched.admissible(req, counted):
                self.blocks.release(hit)
                break
            sched.waiting.popleft()
            self._dequeued()
            keys = self.blocks.chain(r.tokens, computed // self.blocks.block_size, r.root)  # full blocks only
            reserve = sched.worst_case(req)
            for i in range(req.n):
                c = req.constraint
                row = sched.free_rows.pop()
                state = self.sampler.admit(row, req, i, None if c is None else (c if i == 0 else c.copy()))
                s = Seq(
                    r,
                    i,
                    row,
                    "prefill" if i == 0 else "follow",
                    TextTracker(self.tok, req.params.stop),
                    ToolCallParser() if req.parse_tools else None,
                    state,
                    reserve,
                )
                if i == 0:
                    s.blocks, s.keys, s.computed = hit, keys, computed
                r.seqs.append(s)
                sched.running.append(s)
            self.stats.prompt_tokens += len(req.prompt_ids)
            self.stats.prefix_hit_tokens += computed - len(self.virtual_ids)
        self._update_gauges()

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1
            self.stats.queue_depth = self._queued

    def _free(self, s: Seq) -> None:
        self.sched.free(s)
        self._update_gauges()

    def _reap_cancelled(self) -> None:
        for r in [r for r in self.sched.waiting if r.handle.cancelled]:
            self.sched.waiting.remove(r)
            self._dequeued()
            self.stats.requests_cancelled += 1
            self.out.emit(r, rq.Done(len(r.req.prompt_ids), 0, error="cancelled"))
        for s in self.sched.running:
            if s.r.handle.cancelled and not s.done:
                self.out.finish(s, "cancelled")

    def _fail_all(self, message: str) -> None:
        sched = self.sched
        reqs = {id(s.r): s.r for s in sched.running} | {id(r): r for r in sched.waiting}
        for s in sched.running:
            if not s.done:
                sched.free(s)
        sched.running = []
        for _ in sched.waiting:
            self._dequeued()
        sched.waiting.clear()
        self._update_gauges()
        for r in reqs.values():
            self.stats.requests_failed += 1
            self.out.emit(r, rq.Done(len(r.req.prompt_ids), r.completion_tokens, error=message))

    # ------------------------------------------------------------------ the runner
    def _forward(self, model: nn.Module, seqs: list[Seq], chunks: list[list[int]]) -> torch.Tensor:
        """Feed each sequence its chunk of tokens at its next positions; hidden states (B, T, d), from `model`
        (the served one, or for prompt chunks its prefill_dtype copy).

        Builds the call's attention metadata from the block tables: the pool slot of every new token,
        and the keys each row reads: a view of the pool when one sequence's blocks are consecutive,
        else one gather per layer. Padded tokens of shorter rows write to the scratch block 0."""
        bs, dev = self.blocks.block_size, self.device
        starts = self._grow(seqs, chunks)
        B, T = len(seqs), max(len(ch) for ch in chunks)
        S = max(st + len(ch) for st, ch in zip(starts, chunks))
        ids, slots = [], []
        for s, st, ch in zip(seqs, starts, chunks):
            ids += ch + [0] * (T - len(ch))
            slots += [slot_of(s.blocks, p, bs) for p in range(st, st + len(ch))] + [0] * (T - len(ch))
        x = torch.tensor(ids, device=dev).view(B, T)
        positions = torch.tensor(starts, device=dev)[:, None] + torch.arange(T, device=dev)[None, :]
        first = seqs[0].blocks
        nb = blocks_for(S, bs)
        if B == 1 and first[nb - 1] - first[0] == nb - 1 and first[:nb] == list(range(first[0], first[0] + nb)):
            keys = None  # consecutive blocks: attention reads the pool in place
        else:
            keys = self._key_positions([s.blocks for s in seqs], S)
        mask, causal = None, False
        if B == 1 and T == 1:
            pass  # one query sees every cached key
        elif B == 1 and starts[0] == 0:
            causal = True
        else:
            mask = visible_keys(positions, S)
        meta = PagedMeta(positions, torch.tensor(slots, device=dev), keys, first[0] * bs, S, mask, causal)
        rows = None if self.adapters is None else self.adapters.rows([s.r.slot for s in seqs], dev, self.compute_dtype)
        h = model.hidden_states(x, self.cache, meta=meta, adapters=rows)
        self._advance(seqs, chunks)
        return h

    def _grow(self, seqs: list[Seq], chunks: list[list[int]], pool_blocks: int = 0) -> list[int]:
        """Blocks for the new tokens (copy-on-write copies done), the pool backed up to them (or to
        `pool_blocks`); each sequence's first new position."""
        copies = [c for s, ch in zip(seqs, chunks) for c in self.sched.grow(s, len(ch))]
        self.cache.ensure(max(pool_blocks, 1 + max(b for s in seqs for b in s.blocks)))
        for src, dst in copies:
            self.cache.copy_block(src, dst)
        return [s.computed for s in seqs]

    def _advance(self, seqs: list[Seq], chunks: list[list[int]]) -> None:
        for s, ch in zip(seqs, chunks):
            s.computed += len(ch)
            self.sched.register_full_blocks(s)

    def _key_positions(self, tables: list[list[int]], S: int) -> torch.Tensor:
        """(B, S) pool positions of each row's first S keys; missing blocks read the scratch block 0."""
        bs, dev = self.blocks.block_size, self.device
        nb = blocks_for(S, bs)
        table = torch.tensor([t[:nb] + [0] * (nb - len(t[:nb])) for t in tables], device=dev)
        return (table[:, :, None] * bs + torch.arange(bs, device=dev)).view(len(tables), nb * bs)[:, :S].contiguous()

    def _compiled_decode(self, seqs: list[Seq]) -> torch.Tensor:
        """One token per sequence through the compiled step (infer/compiled.py); logits (B, V)."""
        bs = self.blocks.block_size
        chunks = [[s.output[-1]] for s in seqs]
        starts = self._grow(seqs, chunks, pool_blocks=self.cache.num_blocks)
        slots = [slot_of(s.blocks, p, bs) for s, p in zip(seqs, starts)]
        ids, meta = self._padded_decode_meta([ch[0] for ch in chunks], starts, slots, [s.blocks for s in seqs])
        logits = decode_step(self.model, ids, self.cache, meta)[: len(seqs)]
        self._advance(seqs, chunks)
        return logits

    def _padded_decode_meta(
        self, tokens: list[int], starts: list[int], slots: list[int], tables: list[list[int]], steps: int = 1
    ) -> tuple[torch.Tensor, PagedMeta]:
        """Ids (Bp, 1) and metadata of a decode step padded to a few static shapes, so that compiled graphs
        are reused: the batch to the next power of two (at most max_num_seqs), the keys to a multiple of
        128 positions (covering `steps` new positions per row); the pool is backed whole (`release` still
        frees it when the engine idles). Padded rows write to and read the scratch block 0; a row's keys
        beyond its own position are masked."""
        dev, B = self.device, len(tokens)
        pad = min(self.num_slots, 1 << (B - 1).bit_length()) - B
        S = static_length(max(starts) + steps, self.max_len)
        ids = torch.tensor(tokens + [0] * pad, device=dev)[:, None]
        positions = torch.tensor(starts + [0] * pad, device=dev)[:, None]
        keys = self._key_positions(tables + [[0]] * pad, S)
        slot_ids = torch.tensor(slots + [0] * pad, device=dev)
        return ids, PagedMeta(positions, slot_ids, keys, 0, S, visible_keys(positions, S))

    def _multi_ok(self, seqs: list[Seq]) -> bool:
        """Whether this decode step may run `decode_steps` tokens per row in one call: nothing waits to be
        admitted or prefilled (a newcomer's first token would wait for the whole call), and every row samples
        the way the graph does (temperature and logit bias only; no penalties, top-k/p, grammar or logprobs)
        with room for all the steps in its token budget and the context."""
        K = self.cfg.decode_steps
        if K < 2 or self.sched.waiting or any(s.state != "decode" for s in self.sched.running if not s.done):
            return False
        for s in seqs:
            room = min(s.r.req.params.max_new_tokens - len(s.output), self.max_len - len(s.prompt) - len(s.output))
            if room < K or not self.sampler.in_graph(s.sampling):
                return False
        return True

    def _multi_decode(self, seqs: list[Seq]) -> None:
        """`decode_steps` tokens per sequence through one compiled graph (compiled.sampled_steps): Python, the
        metadata and dynamo's guards run once per K tokens. The output processor then takes each row's tokens
        in order; a row that finishes early (a stop token or string) drops the rest, and the keys/values
        written for them go with its blocks. A request cancelled during the call gets none of its tokens (the
        next step reaps it). Each row's noise is drawn from its own generator in the order K single steps
        would draw it, so seeded outputs are those of one step per call."""
        K, bs = self.cfg.decode_steps, self.blocks.block_size
        chunks = [[s.output[-1]] * K for s in seqs]  # K positions each; the fed tokens are chosen in the graph
        starts = self._grow(seqs, chunks, pool_blocks=self.cache.num_blocks)
        steps = [[slot_of(s.blocks, p + j, bs) for s, p in zip(seqs, starts)] for j in range(K)]
        ids, meta = self._padded_decode_meta([ch[0] for ch in chunks], starts, steps[0], [s.blocks for s in seqs], K)
        Bp = ids.shape[0]
        slots = torch.tensor([row + [0] * (Bp - len(seqs)) for row in steps], device=self.device)  # (K, Bp)
        sampling = self.sampler.graph_inputs([s.sampling for s in seqs], Bp, K)
        toks = sampled_steps(self.model, ids, self.cache, meta, slots, *sampling)[: len(seqs)].tolist()
        now, n = time.perf_counter(), 0
        rows = [(s, row) for s, row in zip(seqs, toks) if not s.r.handle.cancelled]  # cancelled: no more tokens
        for j in range(K):
            for s, row in rows:
                if not s.done:
                    self.out.accept(s, row[j], None, now)
                    n += 1
        live = [s for s, _ in rows if not s.done]  # all K tokens taken: their positions are computed
        self._advance(live, [[0] * K for _ in live])
        self._count_rate(now, n)

    def _compile_now(self) -> None:
        """Compile the batch-1 decode graph before serving, on the scratch block: a platform where compiling
        fails (no C++ compiler, say) gets a clear error at start instead of failed requests."""
        self.cache.ensure(self.cache.num_blocks)
        ids, meta = self._padded_decode_meta([0], [0], [0], [[0]])
        K = self.cfg.decode_steps
        try:
            with torch.inference_mode():  # as the engine thread runs it: the graph is reused
                decode_step(self.model, ids, self.cache, meta)
                if K > 1:  # and the multi-step graph (_multi_decode) for one sequence: a padding row, greedy
                    _, meta = self._padded_decode_meta([0], [0], [0], [[0]], K)
                    slots = torch.zeros(K, 1, dtype=torch.long, device=self.device)
                    sampled_steps(self.model, ids, self.cache, meta, slots, *self.sampler.graph_inputs([], 1, K))
        except Exception as e:  # noqa: BLE001 - whatever dynamo or inductor raise, told in one line
            raise UserError(f"compiling the decode step failed ({type(e).__name__}); serve without --compile.") from e
        finally:
            self.cache.release()

    def _prefill(self, batch: list[tuple[Seq, int]]) -> None:
        """Feed one chunk of prompt tokens for the sequences the scheduler picked."""
        seqs = [s for s, _ in batch]
        chunks = [s.prompt[s.computed : s.computed + n] for s, n in batch]
        h = self._forward(self.prefill_model, seqs, chunks)
        ready = [(s, i, len(chunks[i])) for i, s in enumerate(seqs) if s.computed == len(s.prompt)]
        if not ready:
            return
        idx = torch.tensor([i for _, i, _ in ready], device=self.device)
        last_pos = torch.tensor([n - 1 for _, _, n in ready], device=self.device)
        last = self.model.lm_head(h[idx, last_pos].to(self.compute_dtype))  # (R, V): finished prompts' next token
        todo, rows_of = [], []
        for j, (s, _, _) in enumerate(ready):
            for q in s.r.seqs:  # the leader and its followers share the prompt's blocks (copy on write)
                if q is not s:
                    for b in s.blocks:
                        self.blocks.acquire(b)
                    q.blocks, q.keys, q.computed = list(s.blocks), list(s.keys), s.computed
                q.state = "decode"
                todo.append(q)
                rows_of.append(j)
        self._sample_and_emit(todo, last[torch.tensor(rows_of, device=self.device)])

    def _decode(self, seqs: list[Seq]) -> None:
        if self.cfg.compile and self.adapters is None:
            try:
                if self._multi_ok(seqs):
                    self._multi_decode(seqs)
                else:
                    self._sample_and_emit(seqs, self._compiled_decode(seqs))
                return
            except FailOnRecompileLimitHit:  # a shape dynamo will not compile again: this step decodes eagerly (the
                # blocks already grown are reused; a multi-step call's noise was drawn, so seeded rows change stream)
                if not self._warned_recompile:
                    log.warning("compiled decoding reached dynamo's recompile limit; such steps decode eagerly")
                    self._warned_recompile = True
        if self.adapters is not None:  # rows of one adapter side by side: one run each ("group" batching)
            seqs = sorted(seqs, key=lambda s: s.r.slot)
        h = self._forward(self.model, seqs, [[s.output[-1]] for s in seqs])
        self._sample_and_emit(seqs, self.model.lm_head(h[:, 0]))  # (B, V)

    def _sample_and_emit(self, seqs: list[Seq], logits: torch.Tensor) -> None:
        tokens, lps = self.sampler.sample([s.sampling for s in seqs], logits)
        now = time.perf_counter()
        for s, tok, lp in zip(seqs, tokens, lps):
            self.out.accept(s, tok, lp, now)
        self._count_rate(now, len(seqs))

    def _count_rate(self, now: float, tokens: int) -> None:
        self._rate.append((now, tokens))
        while self._rate and now - self._rate[0][0] > rq.RATE_WINDOW:
            self._rate.popleft()
