"""The output processor: a sampled token becomes text, tool calls, a finish reason, and an event.

Incremental detokenisation (infer/text.py) costs O(1) per token; stop strings, end-of-turn tokens,
grammars, length limits and tool-call parsing decide when a choice ends. Events go to the request's
sink; a sink that fails cancels its own request, nobody else's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tinychat.infer.engine.request import TTFT_BUCKETS, Delta, Done, EngineStats, Event, TokenLogprob
from tinychat.infer.engine.scheduler import Request, Seq

log = logging.getLogger("tinychat.engine")


class OutputProcessor:
    def __init__(self, stats: EngineStats, stop_ids: list[int], max_len: int, free: Callable[[Seq], None]) -> None:
        self.stats, self.stop_ids, self.max_len, self._free = stats, set(stop_ids), max_len, free

    def accept(self, s: Seq, tok: int, lp: TokenLogprob | None, now: float) -> None:
        """A new token of s: stream it, or finish s."""
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
            self.finish(s, "stop")  # the end-of-turn token is counted but not shown
            return
        s.output.append(tok)
        c = s.sampling.constraint
        if c is not None and not c.advance(tok):
            log.warning("grammar rejected token %d; ending the sequence", tok)
            self.finish(s, "stop")
            return
        text = s.tracker.push(tok)
        delta = Delta(s.index, token_ids=[tok], logprobs=[lp] if lp else [])
        delta.text, delta.tool_calls = s.parser.push(text) if s.parser else (text, [])
        if s.tracker.stopped or (c is not None and c.done):
            self.finish(s, "stop", delta)
        elif len(s.output) >= r.req.params.max_new_tokens or len(s.prompt) + len(s.output) >= self.max_len:
            self.finish(s, "length", delta)
        else:
            self.emit(r, delta)

    def finish(self, s: Seq, reason: str, delta: Delta | None = None) -> None:
        """End one choice: flush held-back text, free its blocks, and end the request when it was the last."""
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
        self._free(s)
        r = s.r
        if reason != "cancelled":
            self.emit(r, delta)
        if all(q.done for q in r.seqs):
            if reason == "cancelled":
                self.stats.requests_cancelled += 1
                self.emit(r, Done(len(r.req.prompt_ids), r.completion_tokens, error="cancelled"))
            else:
                self.stats.requests_finished += 1
                self.emit(r, Done(len(r.req.prompt_ids), r.completion_tokens))

    def emit(self, r: Request, ev: Event) -> None:
        """Hand an event to the request's owner; a sink that fails cancels its own request, nobody else's."""
        try:
            r.sink(ev)
        except Exception:  # noqa: BLE001 - e.g. the client's event loop is gone
            log.warning("request %d: its event sink failed; cancelling it", r.rid, exc_info=True)
            r.handle.cancelled = True
