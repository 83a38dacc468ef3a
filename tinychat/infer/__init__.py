"""Sampling, batched generation with the KV cache, and (later) the serving engine."""

from tinychat.infer.generate import Generation, generate, generate_ids, stream
from tinychat.infer.sampling import SamplingParams

__all__ = ["Generation", "SamplingParams", "generate", "generate_ids", "stream"]
