"""The serving engine: continuous batching over a fixed pool of KV-cache slots, in one background thread.

Why this shape (vLLM's scheduler, reduced to what a small model on a CPU or one GPU needs):
  * The KV cache is allocated once as S slots of `max_len` positions (tinychat.model.KVCache). A
    sequence owns one slot from admission until it finishes, stops, or its client goes away; then the
    slot's length is reset and the next request reuses it. Nothing is allocated per token.
  * Requests join and leave the running batch between steps. One step = admit waiting requests into
    free slots, run ONE prefill chunk (at most `prefill_chunk` prompt tokens, several new prompts
    batched together), then ONE decode step for every running sequence. A long prompt is therefore
    split over several steps and never stalls the sequences already decoding for long.
  * Beyond the slots there is a FIFO queue of bounded depth; a submission past it raises
    EngineOverloaded (the server answers 429).
  * n > 1 prefills the prompt once and copies its KV rows to the other choices' slots.
  * Every sequence has its own sampling parameters, seed (torch.Generator), stop strings, penalties,
    logit bias and optional grammar (tinychat.infer.structured), all applied to one (B, V) logits
    batch per step; so a request's tokens do not depend on which others share its batch.
The model is touched only by the engine thread; callers talk to it through `submit` (events come
back through a callback or a queue) and `RequestHandle.cancel`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tinychat.errors import UserError
from tinychat.infer.sampling import BatchSampling, SamplingParams, apply_penalties, filter_logits
from tinychat.infer.structured import Constraint
from tinychat.infer.text import TextTracker
from tinychat.infer.tool_calls import ToolCall, ToolCallParser
from tinychat.model.pooling import mean_pool

log = logging.getLogger("tinychat.engine")


class EngineOverloaded(Exception):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class GenerationRequest:
    """One prompt to continue, with everything that shapes its continuation(s)."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1  # independent choices from the same prompt
    logprobs: int | None = None  # None: off; k: the chosen token's logprob plus the k most likely
    logit_bias: dict[int, float] | None = None  # added to the logits, OpenAI style (-100 bans, +100 forces)
    banned_ids: list[int] = field(default_factory=list)  # never sampled (e.g. <tool_call> for tool_choice none)
    constraint: Constraint | None = None  # a grammar the output must follow (copied per choice)
    parse_tools: bool = False  # split <tool_call> blocks out of the text into tool calls


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position, best first


@dataclass
class Delta:
    """New output of one choice. Text is final (stop strings already cut); the last delta has finish_reason."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | tool_calls | cancelled


@dataclass
class Done:
    """The request is over: every choice finished (or it was cancelled, or the engine failed)."""

    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = Delta | Done


class RequestHandle:
    """What `submit` returns: cancel the request, or (without a sink) iterate over its events."""

    def __init__(self, rid: int, engine: Engine, events: queue.Queue | None) -> None:
        self.id, self._engine, self._events = rid, engine, events
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating and free the slots at the next step (a client went away)."""
        self.cancelled = True
        self._engine._wake()

    def __iter__(self) -> Iterator[Event]:
        assert self._events is not None, "this request was submitted with a sink; events go there"
        while True:
            ev = self._events.get()
            yield ev
            if isinstance(ev, Done):
                return


@dataclass
class EngineConfig:
    max_num_seqs: int = 16  # KV slots = sequences decoded at once
    max_model_len: int | None = None  # positions per slot (prompt + output); default the model's context
    kv_cache_mb: float | None = None  # cap on KV memory; fewer slots than max_num_seqs when it is tight
    max_queue: int = 256  # requests waiting for slots; one more is refused (EngineOverloaded)
    prefill_chunk: int = 256  # prompt tokens per prefill forward, so decoding is never starved for long


@dataclass
class EngineStats:
    """Counters for /metrics; written by the engine thread, read by anyone (plain ints and floats)."""

    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    requests_rejected: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    queue_depth: int = 0
    running_seqs: int = 0
    free_slots: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    ttft_buckets: dict[float, int] = field(default_factory=lambda: dict.fromkeys(TTFT_BUCKETS, 0))
    steps: int = 0


RATE_WINDOW = 5.0  # seconds over which tokens/s is measured
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# ---------------------------------------------------------------------------------------------- internals
@dataclass
class _Request:
    rid: int
    req: GenerationRequest
    handle: RequestHandle
    sink: Callable[[Event], None]
    submitted: float
    seqs: list[_Seq] = field(default_factory=list)
    completion_tokens: int = 0
    first_token: bool = False


@dataclass
class _Seq:
    r: _Request
    index: int
    slot: int
    state: str  # prefill | follow (waits for its leader's prefill) | decode
    tracker: TextTracker
    gen: torch.Generator
    constraint: Constraint | None
    parser: ToolCallParser | None
    prefilled: int = 0  # prompt tokens already in the cache
    output: list[int] = field(default_factory=list)
    done: bool = False


class Engine:
    """Continuous-batching generation for one model; see the module docstring for the design."""

    def __init__(self, model, tokenizer, cfg: EngineConfig | None = None) -> None:  # noqa: ANN001
        self.model, self.tok = model.eval(), tokenizer
        self.cfg = cfg = cfg or EngineConfig()
        mcfg = model.cfg
        self.max_len = min(cfg.max_model_len or mcfg.max_seq_len, mcfg.max_seq_len)
        p = next(model.parameters())
        self.device = p.device
        slot_bytes = 2 * mcfg.n_layer * mcfg.n_kv_head * self.max_len * mcfg.head_dim * p.element_size()
        slots = cfg.max_num_seqs
        if cfg.kv_cache_mb is not None:
            slots = min(slots, int(cfg.kv_cache_mb * 2**20 // slot_bytes))
        if slots < 1:
            raise UserError(
                f"kv_cache_mb={cfg.kv_cache_mb} holds no sequence: one slot of {self.max_len} positions needs "
                f"{slot_bytes / 2**20:.2f} MB; raise it or lower max_model_len."
            )
        self.num_slots = slots
        self.kv_bytes = slots * slot_bytes
        self.cache = model.new_cache(slots, max_len=self.max_len)
        V = mcfg.vocab_size
        self.seen = torch.zeros(slots, V, dtype=torch.bool, device=self.device)  # prompt+output tokens, per slot
        self.counts = torch.zeros(slots, V, device=self.device)  # output token counts, per slot
        self.stop_ids = sorted(tokenizer.stop_ids)
        self.stats = EngineStats(free_slots=slots)
        self._free = list(range(slots))[::-1]
        self._waiting: deque[_Request] = deque()
        self._running: list[_Seq] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet admitted (guarded by _lock)
        self._ids = itertools.count(1)
        self._rate: deque[tuple[float, int]] = deque()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ public API (any thread)
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tinychat-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, req: GenerationRequest, sink: Callable[[Event], None] | None = None) -> RequestHandle:
        """Queue a request. Events go to `sink` (called on the engine thread; keep it cheap) or, without
        one, to the handle's own queue for iteration. Raises UserError for a request that can never
        run and EngineOverloaded when the queue is full."""
        req.params.validate()
        if not req.prompt_ids:
            raise UserError("the prompt is empty; give at least one token.")
        if not 1 <= req.n <= self.num_slots:
            raise UserError(f"n must be between 1 and {self.num_slots} (the engine's slots), got {req.n}.")
        total = len(req.prompt_ids) + req.params.max_new_tokens
        if total > self.max_len:
            raise UserError(
                f"the context window is {self.max_len} tokens, but {total} were asked for "
                f"({len(req.prompt_ids)} in the prompt, {req.params.max_new_tokens} to generate)."
            )
        V = self.model.cfg.vocab_size
        for t in [*req.prompt_ids, *(req.logit_bias or {}), *req.banned_ids]:
            if not 0 <= t < V:
                raise UserError(f"token id {t} is outside the vocabulary (0..{V - 1}).")
        with self._lock:
            if self._queued >= self.cfg.max_queue:
                self.stats.requests_rejected += 1
                raise EngineOverloaded(f"{self._queued} requests are already waiting; retry later.")
            self._queued += 1
            self.stats.queue_depth = self._queued
        rid = next(self._ids)
        events: queue.Queue | None = None
        if sink is None:
            events = queue.Queue()
            sink = events.put
        handle = RequestHandle(rid, self, events)
        self._inbox.put(_Request(rid, req, handle, sink, time.perf_counter()))
        return handle

    def embed(self, batch: list[list[int]]) -> Future:
        """Mean-pooled, L2-normalised final hidden states of each token list, computed on the engine thread."""
        fut: Future = Future()
        for ids in batch:
            if not 1 <= len(ids) <= self.model.cfg.max_seq_len:
                raise UserError(f"each input must have 1 to {self.model.cfg.max_seq_len} tokens, got {len(ids)}.")
        self._inbox.put((batch, fut))
        return fut

    # ------------------------------------------------------------------ engine thread
    def _wake(self) -> None:
        self._inbox.put(None)

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                self._drain(block=not (self._waiting or self._running))
                if not (self._waiting or self._running):
                    continue
                try:
                    self.step()
                except Exception as e:  # a bug: fail what is running, keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"internal engine error: {type(e).__name__}: {e}")
            self._fail_all("the engine was stopped")

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, _Request):
                self._waiting.append(item)
            elif isinstance(item, tuple):
                self._run_embed(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def step(self) -> None:
        """One scheduling step: reap cancelled, admit, one prefill chunk, one decode step."""
        self._reap_cancelled()
        self._admit()
        if any(s.state == "prefill" for s in self._running):
            self._prefill()
        decoding = [s for s in self._running if s.state == "decode" and not s.done]
        if decoding:
            self._decode(decoding)
        self._running = [s for s in self._running if not s.done]
        self.stats.steps += 1

    # ------------------------------------------------------------------ admission and freeing
    def _admit(self) -> None:
        while self._waiting and len(self._free) >= self._waiting[0].req.n:
            r = self._waiting.popleft()
            self._dequeued()
            prompt = r.req.prompt_ids
            for i in range(r.req.n):
                slot = self._free.pop()
                self.cache.reset([slot])
                self.seen[slot].zero_()
                self.seen[slot, torch.tensor(prompt, device=self.device)] = True
                self.counts[slot].zero_()
                seed = r.req.params.seed
                gen = torch.Generator(device=self.device)
                if seed is not None:
                    gen.manual_seed((seed * 1_000_003 + i) % 2**63)
                else:
                    gen.seed()
                c = r.req.constraint
                seq = _Seq(
                    r,
                    i,
                    slot,
                    "prefill" if i == 0 else "follow",
                    TextTracker(self.tok, r.req.params.stop),
                    gen,
                    None if c is None else (c if i == 0 else c.copy()),
                    ToolCallParser() if r.req.parse_tools else None,
                )
                r.seqs.append(seq)
                self._running.append(seq)
            self.stats.free_slots, self.stats.running_seqs = len(self._free), self.num_slots - len(self._free)
            self.stats.prompt_tokens += len(prompt)

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1
            self.stats.queue_depth = self._queued

    def _reap_cancelled(self) -> None:
        for r in [r for r in self._waiting if r.handle.cancelled]:
            self._waiting.remove(r)
            self._dequeued()
            self.stats.requests_cancelled += 1
            self._emit(r, Done(len(r.req.prompt_ids), 0, error="cancelled"))
        for s in self._running:
            if s.r.handle.cancelled and not s.done:
                self._finish(s, "cancelled")

    def _release(self, s: _Seq) -> None:
        s.done = True
        self.cache.reset([s.slot])
        self._free.append(s.slot)
        self.stats.free_slots, self.stats.running_seqs = len(self._free), self.num_slots - len(self._free)

    def _fail_all(self, message: str) -> None:
        reqs = {id(s.r): s.r for s in self._running} | {id(r): r for r in self._waiting}
        for s in self._running:
            if not s.done:
                self._release(s)
        self._running = []
        for _ in self._waiting:
            self._dequeued()
        self._waiting.clear()
        for r in reqs.values():
            self.stats.requests_failed += 1
            self._emit(r, Done(len(r.req.prompt_ids), r.completion_tokens, error=message))

    # ------------------------------------------------------------------ model calls
    def _prefill(self) -> None:
        """Feed one chunk of prompt tokens for as many prefilling sequences as the budget allows."""
        budget = self.cfg.prefill_chunk
        batch: list[tuple[_Seq, int]] = []  # (seq, tokens this call)
        T = 0
        for s in self._running:
            if s.state != "prefill" or budget <= 0:
                continue
            n = min(len(s.r.req.prompt_ids) - s.prefilled, budget)
            t = max(T, n)
            # every row writes T positions (padding included), so each row's length + T must fit its slot
            if any(q.prefilled + t > self.max_len for q, _ in batch) or s.prefilled + t > self.max_len:
                continue
            batch.append((s, n))
            T, budget = t, budget - n
        if not batch:
            return
        x = torch.zeros(len(batch), T, dtype=torch.long, device=self.device)
        for i, (s, n) in enumerate(batch):
            x[i, :n] = torch.tensor(s.r.req.prompt_ids[s.prefilled : s.prefilled + n], device=self.device)
        rows = torch.tensor([s.slot for s, _ in batch], device=self.device)
        n_new = torch.tensor([n for _, n in batch], device=self.device)
        h = self.model.hidden_states(x, self.cache, n_new=n_new, rows=rows)  # (B, T, d)
        ready: list[tuple[_Seq, int]] = []
        for i, (s, n) in enumerate(batch):
            s.prefilled += n
            if s.prefilled == len(s.r.req.prompt_ids):
                ready.append((s, i))
        if not ready:
            return
        idx = torch.tensor([i for _, i in ready], device=self.device)
        last = self.model.lm_head(h[idx, n_new[idx] - 1])  # (R, V): the next-token logits of finished prompts
        seqs, rows_of = [], []
        for j, (s, _) in enumerate(ready):
            for q in s.r.seqs:  # the leader and its followers share the prompt's cache rows
                if q is not s:
                    self._copy_slot(s.slot, q.slot, s.prefilled)
                    q.prefilled = s.prefilled
                q.state = "decode"
                seqs.append(q)
                rows_of.append(j)
        self._sample_and_emit(seqs, last[torch.tensor(rows_of, device=self.device)])

    def _copy_slot(self, src: int, dst: int, length: int) -> None:
        c = self.cache
        c.k[:, dst, :, :length] = c.k[:, src, :, :length]
        c.v[:, dst, :, :length] = c.v[:, src, :, :length]
        c.lengths[dst] = length
        c._lengths[dst] = length

    def _decode(self, seqs: list[_Seq]) -> None:
        rows = torch.tensor([s.slot for s in seqs], device=self.device)
        x = torch.tensor([[s.output[-1]] for s in seqs], device=self.device)
        logits = self.model(x, self.cache, rows=rows)[:, -1]  # (B, V)
        self._sample_and_emit(seqs, logits)

    # ------------------------------------------------------------------ sampling
    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        raw = logits.float()
        params = [s.r.req.params for s in seqs]
        sp = BatchSampling.stack(params, self.device)
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        x = apply_penalties(raw, self.seen[slots], self.counts[slots], sp) if sp.needs_penalties else raw.clone()
        neg = float("-inf")
        for i, s in enumerate(seqs):
            req = s.r.req
            if req.logit_bias:
                ids = torch.tensor(list(req.logit_bias), device=self.device)
                x[i, ids] += torch.tensor(list(req.logit_bias.values()), device=self.device)
            if req.banned_ids:
                x[i, torch.tensor(req.banned_ids, device=self.device)] = neg
            if s.constraint is not None:
                allowed = s.constraint.allowed().to(self.device)
                if not bool(allowed.any()):
                    allowed[self.stop_ids] = True  # a grammar with no way on: end the sequence
                x[i].masked_fill_(~allowed, neg)
        tokens = x.argmax(-1)
        if sp.any_sampling:
            scaled = x / sp.temperature.clamp(min=1e-5)[:, None]
            probs = (filter_logits(scaled, sp) if sp.needs_filter else scaled).softmax(-1)
            u = torch.empty_like(probs)
            for i, s in enumerate(seqs):  # each sequence's own generator: its draws do not depend on the batch
                u[i].exponential_(1.0, generator=s.gen)
            tokens = torch.where(sp.temperature > 0, (probs / u).argmax(-1), tokens)
        self.seen[slots, tokens] = True
        self.counts[slots, tokens] += 1
        want_lp = [i for i, s in enumerate(seqs) if s.r.req.logprobs is not None]
        lps: dict[int, TokenLogprob] = {}
        if want_lp:
            lp = F.log_softmax(raw[want_lp], dim=-1)
            for j, i in enumerate(want_lp):
                k = seqs[i].r.req.logprobs or 0
                tok = int(tokens[i])
                top = lp[j].topk(k) if k else None
                pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                lps[i] = TokenLogprob(tok, float(lp[j, tok]), pairs)
        now = time.perf_counter()
        for i, (s, tok) in enumerate(zip(seqs, tokens.tolist())):
            self._accept(s, tok, lps.get(i), now)
        self._count_rate(now, len(seqs))

    def _accept(self, s: _Seq, tok: int, lp: TokenLogprob | None, now: float) -> None:
        r = s.r
        r.completion_tokens += 1
        self.stats.generation_tokens += 1
        if not r.first_token:
            r.first_token = True
            ttft = now - r.submitted
            self.stats.ttft_sum += ttft
            self.stats.ttft_count += 1
            for b in TTFT_BUCKETS:
                if ttft <= b:
                    self.stats.ttft_buckets[b] += 1
        if r.req.params.stop_on_eos and tok in self.stop_ids:
            self._finish(s, "stop")  # the end-of-turn token is counted but not shown
            return
        s.output.append(tok)
        if s.constraint is not None and not s.constraint.advance(tok):
            log.warning("grammar rejected token %d; ending the sequence", tok)
            self._finish(s, "stop")
            return
        text = s.tracker.push(tok)
        delta = Delta(s.index, token_ids=[tok], logprobs=[lp] if lp else [])
        delta.text, delta.tool_calls = s.parser.push(text) if s.parser else (text, [])
        if s.tracker.stopped or (s.constraint is not None and s.constraint.done):
            self._finish(s, "stop", delta)
        elif len(s.output) >= r.req.params.max_new_tokens or len(r.req.prompt_ids) + len(s.output) >= self.max_len:
            self._finish(s, "length", delta)
        else:
            self._emit(r, delta)

    def _finish(self, s: _Seq, reason: str, delta: Delta | None = None) -> None:
        delta = delta or Delta(s.index)
        if reason != "cancelled":
            tail = s.tracker.finish()
            if s.parser is not None:
                text, calls = s.parser.push(tail)
                text2, calls2 = s.parser.finish(truncated=reason == "length")
                delta.text += text + text2
                delta.tool_calls += calls + calls2
                if s.parser.calls and reason == "stop":
                    reason = "tool_calls"
            else:
                delta.text += tail
        delta.finish_reason = reason
        self._release(s)
        r = s.r
        if reason != "cancelled":
            self._emit(r, delta)
        if all(q.done for q in r.seqs):
            if reason == "cancelled":
                self.stats.requests_cancelled += 1
                self._emit(r, Done(len(r.req.prompt_ids), r.completion_tokens, error="cancelled"))
            else:
                self.stats.requests_finished += 1
                self._emit(r, Done(len(r.req.prompt_ids), r.completion_tokens))

    def _emit(self, r: _Request, ev: Event) -> None:
        """Hand an event to the request's owner; a sink that fails cancels its own request, nobody else's."""
        try:
            r.sink(ev)
        except Exception:  # noqa: BLE001 - e.g. the client's event loop is gone
            log.warning("request %d: its event sink failed; cancelling it", r.rid, exc_info=True)
            r.handle.cancelled = True

    def _count_rate(self, now: float, n: int) -> None:
        self._rate.append((now, n))
        while self._rate and now - self._rate[0][0] > RATE_WINDOW:
            self._rate.popleft()

    def tokens_per_second(self) -> float:
        """Tokens generated over the last RATE_WINDOW seconds, per second (0 when idle)."""
        now = time.perf_counter()
        recent = [k for t, k in list(self._rate) if now - t <= RATE_WINDOW]
        return sum(recent) / RATE_WINDOW

    # ------------------------------------------------------------------ embeddings
    def _run_embed(self, batch: list[list[int]], fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(mean_pool(self.model, batch, self.device).tolist())
        except Exception as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)


def collect(handle: RequestHandle, n: int) -> tuple[list[dict[str, Any]], Done]:
    """Gather a request's events into per-choice results: text, token ids, logprobs, tool calls, finish."""
    choices: list[dict[str, Any]] = [
        {"text": "", "token_ids": [], "logprobs": [], "tool_calls": [], "finish_reason": None} for _ in range(n)
    ]
    for ev in handle:
        if isinstance(ev, Done):
            return choices, ev
        c = choices[ev.index]
        c["text"] += ev.text
        c["token_ids"] += ev.token_ids
        c["logprobs"] += ev.logprobs
        c["tool_calls"] += ev.tool_calls
        c["finish_reason"] = ev.finish_reason or c["finish_reason"]
    raise AssertionError("unreachable")
