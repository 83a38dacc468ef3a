"""GET /metrics in Prometheus' text format, written by hand (a dozen lines need no client library).

What an operator watches: requests by outcome, tokens in and out, queue depth and running sequences
(is the server saturated?), time to first token (is it responsive?) and generated tokens per second.
"""

from __future__ import annotations

import threading
from collections import Counter

from tinychat.infer.engine import TTFT_BUCKETS, MetricsSnapshot


class HttpStats:
    """HTTP responses by route and status, counted by the ASGI middleware."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.responses: Counter[tuple[str, int]] = Counter()

    def count(self, route: str, status: int) -> None:
        with self._lock:
            self.responses[(route, status)] += 1


def render_metrics(snap: MetricsSnapshot, http: HttpStats) -> str:
    s = snap.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP tinychat_{name} {help}")
        lines.append(f"# TYPE tinychat_{name} {kind}")
        for labels, value in samples:
            text = str(value) if isinstance(value, int) else f"{value:.6g}"
            lines.append(f"tinychat_{name}{labels} {text}")

    metric(
        "requests_total",
        "counter",
        "Generation requests by outcome.",
        [
            ('{status="finished"}', s.requests_finished),
            ('{status="cancelled"}', s.requests_cancelled),
            ('{status="failed"}', s.requests_failed),
            ('{status="rejected"}', s.requests_rejected),
        ],
    )
    with http._lock:
        responses = sorted(http.responses.items())
    metric(
        "http_responses_total",
        "counter",
        "HTTP responses by route and status code.",
        [(f'{{route="{r}",code="{c}"}}', n) for (r, c), n in responses],
    )
    metric("prompt_tokens_total", "counter", "Prompt tokens admitted (tokens in).", [("", s.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated (tokens out).", [("", s.generation_tokens)])
    metric("queue_depth", "gauge", "Requests waiting for KV memory.", [("", s.queue_depth)])
    metric("running_sequences", "gauge", "Sequences holding a KV slot.", [("", s.running_seqs)])
    metric("kv_slots_free", "gauge", "KV-cache slots free.", [("", s.free_slots)])
    metric("kv_slots_total", "gauge", "KV-cache slots.", [("", snap.num_slots)])
    metric(
        "kv_cache_bytes",
        "gauge",
        "KV-cache memory allocated now (grows with use, dropped when idle).",
        [("", snap.kv_bytes)],
    )
    metric("kv_blocks_used", "gauge", "KV blocks held by running sequences.", [("", s.kv_blocks_used)])
    metric("kv_blocks_total", "gauge", "KV blocks the memory cap allows.", [("", snap.kv_blocks)])
    metric(
        "prefix_cache_hit_tokens_total",
        "counter",
        "Prompt tokens served from the prefix cache.",
        [("", s.prefix_hit_tokens)],
    )
    metric(
        "tokens_per_second",
        "gauge",
        "Generated tokens per second over the last 5 s.",
        [("", snap.tokens_per_second)],
    )
    buckets = [(f'_bucket{{le="{b:g}"}}', s.ttft_buckets[b]) for b in TTFT_BUCKETS]
    buckets += [('_bucket{le="+Inf"}', s.ttft_count), ("_sum", s.ttft_sum), ("_count", s.ttft_count)]
    metric("time_to_first_token_seconds", "histogram", "Time from submission to the first token.", buckets)
    metric("engine_steps_total", "counter", "Engine scheduling steps.", [("", s.steps)])
    return "\n".join(lines) + "\n"
