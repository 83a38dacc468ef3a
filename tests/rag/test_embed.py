"""Embedders: MiniLM (offline, English and Chinese), the SQLite cache, and tinychat's own model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tinychat.errors import UserError
from tinychat.rag.embed import CachedEmbedder, MiniLMEmbedder, TinychatEmbedder, make_embedder


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    """MiniLM loaded once with the network switched off for Hugging Face libraries."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        e = MiniLMEmbedder()
        e.embed(["warm up"])
    return e


class Counting:
    """Wraps an embedder and records what reaches it."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.calls: list[list[str]] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.inner.embed(texts)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


def test_minilm_shape_norm_and_paraphrases(minilm):
    v = minilm.embed(
        [
            "How do I reset my password?",
            "What are the steps to change my login password?",
            "The weather in Paris is sunny today.",
        ]
    )
    assert minilm.name == "all-MiniLM-L6-v2" and minilm.dim == 384
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert cos(v[0], v[1]) > cos(v[0], v[2]) + 0.3
    assert minilm.embed([]).shape == (0, 384)


def test_minilm_bf16_matches_fp32(minilm):
    """bf16 autocast (the fast path on AVX-512 CPUs) gives the fp32 vectors within cosine 0.999."""
    texts = ["Ada Quill was born in 1961 in Porthaven.", "张伟出生于杭州，是一名医生。", "x"]
    fp32 = MiniLMEmbedder(precision="fp32").embed(texts)
    bf16 = MiniLMEmbedder(precision="bf16").embed(texts)
    assert bf16.dtype == np.float32 and (fp32 * bf16).sum(1).min() > 0.999


def test_minilm_chinese(minilm):
    v = minilm.embed(["北京大学是中国著名的高等学府", "北京大学是一所著名大学", "股票市场今天下跌了"])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert cos(v[0], v[1]) > cos(v[0], v[2]) + 0.2


def test_cache_skips_the_model_and_persists(minilm, tmp_path: Path):
    texts = ["alpha beta", "gamma delta", "alpha beta", "北京大学"]
    inner = Counting(minilm)
    cached = CachedEmbedder(inner, tmp_path / "cache.sqlite")
    first = cached.embed(texts)
    assert inner.calls == [["alpha beta", "gamma delta", "北京大学"]]  # each distinct text once
    np.testing.assert_allclose(first, minilm.embed(texts), atol=1e-6)

    again = cached.embed(texts)
    assert len(inner.calls) == 1 and cached.misses == 3 and cached.hits == 5
    np.testing.assert_array_equal(again, first)
    cached.close()

    inner2 = Counting(minilm)
    reopened = CachedEmbedder(inner2, tmp_path / "cache.sqlite")
    np.testing.assert_array_equal(reopened.embed(texts), first)
    assert inner2.calls == [] and reopened.hits == 4
    mixed = reopened.embed(["gamma delta", "something new"])
    assert inner2.calls == [["something new"]]
    np.testing.assert_array_equal(mixed[0], first[1])
    assert reopened.embed([]).shape == (0, 384)


class Fake:
    """A deterministic 4-d embedder whose vectors depend on its name (to check keys include the name)."""

    dim = 4

    def __init__(self, name: str, seed: int) -> None:
        self.name, self.seed = name, seed

    def embed(self, texts: list[str]) -> np.ndarray:
        v = np.stack([np.random.default_rng([self.seed, len(t)]).normal(size=4) for t in texts]).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_cache_keys_include_the_embedder_name(tmp_path: Path):
    a = CachedEmbedder(Fake("a", 1), tmp_path / "c.sqlite")
    b = CachedEmbedder(Fake("b", 2), tmp_path / "c.sqlite")
    va, vb = a.embed(["same text"]), b.embed(["same text"])
    assert b.misses == 1 and not np.allclose(va, vb)


def test_make_embedder(tmp_path: Path, tiny_model_dir: Path):
    assert isinstance(make_embedder("minilm"), MiniLMEmbedder)
    cached = make_embedder("minilm", cache_dir=tmp_path)
    assert isinstance(cached, CachedEmbedder) and cached.path == tmp_path / "embeddings.sqlite"
    tc = make_embedder(f"tinychat:{tiny_model_dir}")
    assert isinstance(tc, TinychatEmbedder) and tc.name == f"tinychat:{tiny_model_dir.resolve().as_posix()}"
    for bad in ("bert", "tinychat:", ""):
        with pytest.raises(UserError, match="unknown embedder"):
            make_embedder(bad)
    with pytest.raises(UserError, match="does not exist"):
        make_embedder(f"tinychat:{tmp_path / 'missing'}")


def test_tinychat_embedder_matches_the_engine(tiny_model_dir: Path):
    from tinychat.infer.engine import Engine, EngineConfig
    from tinychat.model.pooling import mean_pool

    emb = TinychatEmbedder(tiny_model_dir)
    texts = ["the quick brown fox", "hello", "a much longer sentence about tiny models that learn to chat", ""]
    v = emb.embed(texts)
    assert v.shape == (4, 64) and emb.dim == 64 and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)

    engine = Engine(emb.model, emb.tokenizer, EngineConfig(max_num_seqs=2)).start()
    try:
        ref = engine.embed(emb.token_ids(texts)).result(timeout=30)
    finally:
        engine.stop()
    np.testing.assert_allclose(v, np.array(ref, dtype=np.float32), atol=1e-6)

    long = " ".join(["word"] * 1000)  # far beyond the 128-token context: cut, not an error
    ids = emb.tokenizer.encode(long)
    assert len(ids) > emb.max_len
    cut = mean_pool(emb.model, [ids[: emb.max_len]], "cpu")[0].numpy()
    np.testing.assert_allclose(emb.embed([long])[0], cut, atol=1e-5)
