"""What goes in and out of the engine: requests, their events, the handle a caller holds, config and counters."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tinychat.infer.sampling import SamplingParams
from tinychat.infer.structured import Constraint
from tinychat.infer.tool_calls import ToolCall


class EngineOverloaded(Exception):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""


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
    adapter: str = ""  # the LoRA adapter to continue with ("": the base), one the engine serves


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

    def then(self, later: Delta) -> Delta | None:
        """This delta and the same choice's `later` one as one delta, or None where they must stay two: this
        one ends its choice, or carries tool calls, whose chunks a stream sends before any later text."""
        if later.index != self.index or self.finish_reason is not None or self.tool_calls:
            return None
        return Delta(
            self.index,
            self.text + later.text,
            self.token_ids + later.token_ids,
            self.logprobs + later.logprobs,
            list(later.tool_calls),
            later.finish_reason,
        )


@dataclass
class Done:
    """The request is over: every choice finished (or it was cancelled, or the engine failed)."""

    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    code: str | None = None  # what kind of error: "adapter_unloaded" (the client's, not the engine's), else None


Event = Delta | Done


class RequestHandle:
    """What `submit` returns: cancel the request, or (without a sink) iterate over its events."""

    def __init__(self, rid: int, wake: Callable[[], None], events: queue.Queue | None) -> None:
        """`wake`: tells the engine to look (Engine._wake; an engine process's proxy sends the cancel instead)."""
        self.id, self._wake, self._events = rid, wake, events
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating and free the request's KV blocks at the next step (a client went away)."""
        self.cancelled = True
        self._wake()

    def __iter__(self) -> Iterator[Event]:
        assert self._events is not None, "this request was submitted with a sink; events go there"
        while True:
            ev = self._events.get()
            yield ev
            if isinstance(ev, Done):
                return


def coalesce(events: list[tuple[Any, Event]]) -> list[tuple[Any, Event]]:
    """(key, event) pairs, in order, with each choice's deltas merged into its earliest one where `Delta.then`
    allows: what a consumer that fell behind the engine has waiting goes out as one chunk per choice instead of
    one per token (vLLM v1's RequestOutputCollector does the same), so streaming costs the HTTP side less per
    token exactly when it is the bottleneck, and nothing when it keeps up. A choice's text keeps its order and
    never passes its request's Done (which comes after every delta); choices only move relative to each other."""
    out: list[tuple[Any, Event]] = []
    latest: dict[tuple[Any, int], int] = {}  # (key, choice) -> position in out of its latest delta
    for key, ev in events:
        if isinstance(ev, Delta):
            j = latest.get((key, ev.index), -1)
            prev = out[j][1] if j >= 0 else None
            merged = prev.then(ev) if isinstance(prev, Delta) else None
            if merged is not None:
                out[j] = (key, merged)
                continue
            latest[key, ev.index] = len(out)
        out.append((key, ev))
    return out


@dataclass
class EngineConfig:
    max_num_seqs: int = 16  # sequences decoded at once (rows of the sampler's per-sequence tensors)
    max_model_len: int | None = None  # positions per sequence (prompt + output); default the model's context
    kv_cache_mb: float | None = None  # KV memory cap; default: max_num_seqs sequences of max_model_len
    block_size: int = 16  # positions per KV block
    prefix_caching: bool = True  # reuse full blocks of an earlier prompt with the same tokens
    max_queue: int = 256  # requests waiting for KV memory; one more is refused (EngineOverloaded)
    prefill_chunk: int = 256  # prompt tokens per prefill forward, so decoding is never starved for long
    idle_release_s: float = 30.0  # drop the KV pool (and its cached prefixes) after this long with nothing to do
    compile: bool = False  # decode through torch.compile (infer/compiled.py): faster per token, a compile per shape
    decode_steps: int = 4  # compiled: tokens per call while nothing waits (Engine._multi_decode); 1 = one per call
    pack_weights: bool = True  # fp32 on a CPU: decode matmuls over a packed copy of the weights (model/packed.py)
    kv_cache_dtype: str = "auto"  # the KV pool's dtype: auto (the compute dtype), float32, float16 or bfloat16
    prefill_dtype: str = "auto"  # prompt chunks on a copy of the weights in this dtype (bfloat16); auto: the model's


@dataclass
class EngineStats:
    """Counters for /metrics; written by the engine thread, read by anyone (plain ints and floats)."""

    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    requests_rejected: int = 0
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    generation_tokens: int = 0
    queue_depth: int = 0
    running_seqs: int = 0
    free_slots: int = 0  # sequences that could still join (max_num_seqs - running)
    kv_blocks_used: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    ttft_buckets: dict[float, int] = field(default_factory=lambda: dict.fromkeys(TTFT_BUCKETS, 0))
    steps: int = 0


@dataclass
class MetricsSnapshot:
    """What /metrics reads of an engine, taken at one moment (Engine.snapshot; an engine process sends it whole)."""

    stats: EngineStats
    num_slots: int
    kv_bytes: int
    kv_blocks: int  # blocks the memory cap allows (the scratch block not counted)
    tokens_per_second: float


RATE_WINDOW = 5.0  # seconds over which tokens/s is measured
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
