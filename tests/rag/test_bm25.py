"""BM25: tokenizer (English + Chinese), ranking, the allowed mask, and the .npz round trip."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tinychat.rag.bm25 import BM25Index, tokenize

DOCS = [
    "The cat sat on the mat.",
    "Dogs and cats are popular pets; a dog needs walks.",
    "Error ERR_042 means the disk quota was exceeded. Free some space and retry.",
    "Quarterly revenue grew 12% thanks to strong sales in Europe.",
    "北京大学位于北京市海淀区，是中国著名的高等学府。",
    "清华大学和复旦大学也是中国的大学。",
    "上海是一座国际化大都市。",
    "The mat was red and the cat was black. The cat slept.",
]


def reference_scores(docs: list[str], query: str, k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25 written the slow, obvious way."""
    toks = [tokenize(d) for d in docs]
    avgdl = sum(map(len, toks)) / len(toks)
    q = set(tokenize(query))
    out = []
    for t in toks:
        tf, s = Counter(t), 0.0
        for term in q:
            df = sum(term in d for d in toks)
            if tf[term]:
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                s += idf * tf[term] * (k1 + 1) / (tf[term] + k1 * (1 - b + b * len(t) / avgdl))
        out.append(s)
    return out


def test_tokenize():
    assert tokenize("The Quick brown fox, 2024 café!") == ["quick", "brown", "fox", "2024", "café"]
    zh = tokenize("北京大学是中国的一所大学。")
    assert {"北京", "大学", "北京大学", "中国"} <= set(zh)
    assert "的" not in zh and "。" not in "".join(zh)
    assert tokenize("GPT模型很好")[:2] == ["gpt", "模型"]
    assert tokenize("  ,.;!? ") == []


def test_english_ranking_and_scores():
    ix = BM25Index(DOCS)
    hits = ix.search("cat mat", 3)
    assert sorted(i for i, _ in hits) == [0, 7]  # only documents with a matching term ("cats" is another word)
    assert hits[0][1] > hits[1][1] > 0
    assert ix.search("disk quota ERR_042", 1)[0][0] == 2
    assert ix.search("revenue Europe", 5)[0][0] == 3
    ref = reference_scores(DOCS, "cat mat walks")
    for i, s in ix.search("cat mat walks", len(DOCS)):
        assert s == pytest.approx(ref[i], rel=1e-5)
    assert ix.search("zebra", 5) == [] and ix.search("", 5) == [] and ix.search("cat", 0) == []


def test_chinese_query_finds_the_chinese_doc():
    ix = BM25Index(DOCS)
    assert ix.search("北京大学", 3)[0][0] == 4
    top = [i for i, _ in ix.search("中国的大学", 3)]
    assert set(top[:2]) == {4, 5}
    assert [i for i, _ in ix.search("上海", 3)] == [6]


def test_allowed_mask_and_indices():
    ix = BM25Index(DOCS)
    mask = np.ones(len(DOCS), dtype=bool)
    mask[0] = False
    assert [i for i, _ in ix.search("cat mat", 5, allowed=mask)] == [7]
    assert [i for i, _ in ix.search("cat mat", 5, allowed=np.array([0, 3]))] == [0]
    assert ix.search("cat", 5, allowed=np.zeros(len(DOCS), dtype=bool)) == []
    with pytest.raises(ValueError, match="shape"):
        ix.search("cat", 5, allowed=np.ones(3, dtype=bool))


def test_save_load_round_trip(tmp_path: Path):
    ix = BM25Index(DOCS, k1=1.2, b=0.6)
    path = tmp_path / "bm25.npz"
    ix.save(path)
    assert path.is_file() and not path.with_name("bm25.npz.tmp").exists()
    back = BM25Index.load(path)  # np.load(allow_pickle=False) inside: nothing executable in the file
    assert (back.k1, back.b, len(back)) == (1.2, 0.6, len(DOCS))
    for q in ("cat mat", "北京大学", "中国的大学", "ERR_042 disk", "nothing here"):
        assert back.search(q, 5) == ix.search(q, 5)
    bad = tmp_path / "bad.npz"
    np.savez(bad, header=np.frombuffer(b'{"format": "other"}', dtype=np.uint8))
    with pytest.raises(ValueError, match="not a tinychat-bm25"):
        BM25Index.load(bad)


def test_empty_and_large_are_vectorised():
    assert len(BM25Index([])) == 0 and BM25Index([]).search("cat", 3) == []
    assert BM25Index(["", "..."]).search("cat", 3) == []
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(2000)]
    docs = [" ".join(rng.choice(words, size=30)) for _ in range(5000)] + ["needle haystack w1"]
    ix = BM25Index(docs)
    hits = ix.search("needle w1", 10)
    assert hits[0][0] == len(docs) - 1 and len(hits) == 10
    assert all(a[1] >= b[1] for a, b in zip(hits, hits[1:]))
