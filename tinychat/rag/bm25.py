"""BM25 keyword search over chunk texts, for English and Chinese, in numpy.

Why keyword search next to embeddings: names, codes, numbers and rare terms ("ERR_042", "Qwen3",
"北京大学") are matched exactly by BM25 but often blurred by a small embedding model; hybrid retrieval
fuses both rankings.
Why this tokenizer: Chinese has no spaces, so runs of CJK ideographs are segmented with jieba in its
search mode, which emits both the words and the longer compound (北京 / 大学 / 北京大学), so a query for
either form matches. Character bigrams of every CJK run are added too: jieba's dictionary does not know
tinyworld's (or a user's) invented names and sometimes cuts across them ("张伟出生于" -> 张伟出 / 生于), and a
bigram index finds "张伟" whatever the segmenter did. Other scripts split on non-letters, lowercased,
minus a short list of English function words. No stemming: it is predictable, and the dense retriever covers morphology.
Why this layout: the index is an inverted file in CSR form (per term, a slice of document ids and
term counts). Each posting's Okapi BM25 weight (k1=1.5, b=0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
which is never negative) is precomputed once, so a query gathers the postings of its few terms and sums
them with one np.bincount: the work is proportional to the postings touched, with no Python loop over
documents. It is saved as one .npz holding only numeric arrays and a JSON header (vocabulary and
parameters), loaded with allow_pickle=False: opening an index file can never run code.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np

FORMAT = "tinychat-bm25/1"

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_TOKEN = re.compile(rf"([{_CJK}]+)|([^\W_{_CJK}]+)")  # a run of CJK ideographs, or a run of other letters/digits
EN_STOP = frozenset(
    "a an the and or but if of to in on at by for from with as is are was were be been being it its this that"
    " these those there here what which who whom how do does did not no so than then into about".split()
)
ZH_STOP = frozenset("的 了 是 在 和 与 及 也 就 都 而 之 或 把 被 着".split())

_jieba = None


def _segment(run: str) -> list[str]:
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    return _jieba.lcut_for_search(run)


def tokenize(text: str) -> list[str]:
    """Lowercased search terms: words and numbers, CJK runs as jieba words plus character bigrams, minus stopwords."""
    out: list[str] = []
    for m in _TOKEN.finditer(text.lower()):
        cjk, word = m.groups()
        if cjk:
            words = [t for t in _segment(cjk) if t.strip() and t not in ZH_STOP]
            out.extend(words)
            out.extend(b for b in (cjk[i : i + 2] for i in range(len(cjk) - 1)) if b not in words)
        elif word not in EN_STOP:
            out.append(word)
    return out


class BM25Index:
    """An Okapi BM25 index over a fixed list of texts; search results index into that list."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        docs = [tokenize(t) for t in texts]
        vocab: dict[str, int] = {}
        term_ids = np.fromiter((vocab.setdefault(t, len(vocab)) for d in docs for t in d), dtype=np.int64)
        doc_len = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        n = max(len(docs), 1)
        # one (term, doc) key per token; np.unique sorts them by term, then doc, and counts repeats (= tf)
        keys, tfs = np.unique(term_ids * n + np.repeat(np.arange(len(docs)), doc_len), return_counts=True)
        df = np.bincount(keys // n, minlength=len(vocab))
        indptr = np.concatenate([[0], np.cumsum(df)])
        self._set(list(vocab), indptr, keys % n, tfs, doc_len, k1, b)

    def _set(
        self,
        vocab: list[str],
        indptr: np.ndarray,
        postings: np.ndarray,
        tfs: np.ndarray,
        doc_len: np.ndarray,
        k1: float,
        b: float,
    ) -> None:
        self.k1, self.b = float(k1), float(b)
        self.vocab = {t: i for i, t in enumerate(vocab)}
        self.indptr = indptr.astype(np.int64)
        self.postings = postings.astype(np.int32)  # document of each posting, grouped by term
        self.tfs = tfs.astype(np.int32)
        self.doc_len = doc_len.astype(np.int32)
        n_docs = len(self.doc_len)
        df = np.diff(self.indptr)
        idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
        avgdl = float(self.doc_len.mean()) if n_docs and self.doc_len.sum() else 1.0
        norm = self.k1 * (1.0 - self.b + self.b * self.doc_len / avgdl)
        tf = self.tfs.astype(np.float64)
        self.weights = (np.repeat(idf, df) * tf * (self.k1 + 1.0) / (tf + norm[self.postings])).astype(np.float32)

    def __len__(self) -> int:
        return len(self.doc_len)

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """(document index, score) of the k best documents with a positive score, best first.

        `allowed` restricts the candidates: a boolean mask over the documents, or an array of their indices.
        """
        n_docs = len(self)
        terms = sorted({self.vocab[t] for t in tokenize(query) if t in self.vocab})
        if k <= 0 or not terms or not n_docs:
            return []
        spans = [slice(self.indptr[t], self.indptr[t + 1]) for t in terms]
        docs = np.concatenate([self.postings[s] for s in spans])
        scores = np.bincount(docs, weights=np.concatenate([self.weights[s] for s in spans]), minlength=n_docs)
        if allowed is not None:
            scores[~self._mask(allowed)] = 0.0
        cand = np.flatnonzero(scores > 0)
        if len(cand) > k:
            cand = cand[np.argpartition(-scores[cand], k - 1)[:k]]
        best = cand[np.lexsort((cand, -scores[cand]))]  # score descending, then index ascending
        return [(int(i), float(scores[i])) for i in best]

    def _mask(self, allowed: np.ndarray) -> np.ndarray:
        allowed = np.asarray(allowed)
        if allowed.dtype == bool:
            if allowed.shape != (len(self),):
                raise ValueError(f"allowed mask has shape {allowed.shape}, expected ({len(self)},).")
            return allowed
        mask = np.zeros(len(self), dtype=bool)
        mask[allowed.astype(np.int64)] = True
        return mask

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the index to `path` (an .npz of plain arrays); the file is replaced atomically."""
        path = Path(path)
        header = {"format": FORMAT, "k1": self.k1, "b": self.b, "vocab": list(self.vocab)}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                header=np.frombuffer(json.dumps(header, ensure_ascii=False).encode(), dtype=np.uint8),
                indptr=self.indptr,
                postings=self.postings,
                tfs=self.tfs,
                doc_len=self.doc_len,
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> BM25Index:
        with np.load(Path(path), allow_pickle=False) as z:
            header = json.loads(z["header"].tobytes().decode())
            if header.get("format") != FORMAT:
                raise ValueError(f"{path} is not a {FORMAT} index (format {header.get('format')!r}).")
            index = cls.__new__(cls)
            index._set(header["vocab"], z["indptr"], z["postings"], z["tfs"], z["doc_len"], header["k1"], header["b"])
        return index
