"""The continuous-batching serving engine: scheduler, KV block manager, sampler, output processor.

core.py       Engine: the thread, submit/cancel/embed, the runner (block tables -> attention metadata)
scheduler.py  admission bounded by KV memory, prefill chunks, decode batch, block growth
blocks.py     the KV block pool: allocation, reference counts, prefix cache, copy-on-write
sampler.py    per-row sampling state resident in tensors; one (B, V) batch per step
output.py     tokens -> text, stop strings, tool calls, finish reasons, events
request.py    requests, events, handles, config and counters
"""

from tinychat.infer.engine.core import Engine
from tinychat.infer.engine.request import (
    TTFT_BUCKETS,
    Delta,
    Done,
    EngineConfig,
    EngineOverloaded,
    EngineStats,
    Event,
    GenerationRequest,
    MetricsSnapshot,
    RequestHandle,
    TokenLogprob,
    coalesce,
    collect,
)

__all__ = [
    "TTFT_BUCKETS",
    "Delta",
    "Done",
    "Engine",
    "EngineConfig",
    "EngineOverloaded",
    "EngineStats",
    "Event",
    "GenerationRequest",
    "MetricsSnapshot",
    "RequestHandle",
    "TokenLogprob",
    "coalesce",
    "collect",
]
