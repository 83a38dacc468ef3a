"""The Transformer, its KV cache, its presets and HF-compatible directories."""

from tinychat.model.config import PRESETS, ModelConfig, preset
from tinychat.model.kv_cache import KVCache
from tinychat.model.transformer import Model

__all__ = ["PRESETS", "KVCache", "Model", "ModelConfig", "preset"]
