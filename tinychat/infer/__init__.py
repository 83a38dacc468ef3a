"""Sampling, batched generation with the KV cache, and the continuous-batching serving engine (engine.py)."""

from tinychat.infer.generate import Generation, generate, generate_ids, stream
from tinychat.infer.sampling import SamplingParams

__all__ = ["Generation", "SamplingParams", "generate", "generate_ids", "stream"]
