"""Exact and near-duplicate removal: normalised-text hashes, and MinHash signatures with LSH banding.

Why both: exact duplicates (mirrors, reposts) are cheap to catch with one hash; near duplicates
(the same article with a different footer, date or ad block) are the bulk of web duplication and
make a model memorise instead of generalise. MinHash estimates the Jaccard similarity of two
documents' shingle sets from two short signatures; LSH banding finds candidate pairs without
comparing every pair; candidates are then verified on the full signatures, so the threshold is
honoured in both directions rather than only probabilistically.

Shingles are n-grams of word units (see units.unit_arrays): word n-grams for space-separated text and
character n-grams for Chinese, from the same code path. Unit ids are pure functions of the code points, so
every worker process computes identical signatures (Python's hash() is salted per process).

The hash family is multiply-add-shift (Dietzfelbinger 1996): h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32
for 32-bit keys x and random 64-bit a_i (odd), b_i; one numpy broadcast per block of shingles.

Division of labour for multiprocessing: signatures are computed in the workers (the expensive part,
embarrassingly parallel); the index lives in the parent, which sees documents in input order, so
which copy survives (the first) does not depend on worker timing.

Memory: the parent keeps 16 bytes per kept document for exact dedup, and for near dedup the signature
(4 * num_perm bytes) plus one dict entry per band: roughly 1 KB per kept document at num_perm=128.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from tinychat.config import field
from tinychat.data.quality import ngram_hashes

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


@dataclass
class DedupConfig:
    exact: bool = field(True, help="drop documents whose normalised text (case, whitespace) was seen before")
    near: bool = field(True, help="drop documents whose MinHash Jaccard similarity to a kept one is high")
    threshold: float = field(0.8, help="near-duplicate Jaccard similarity threshold, in (0, 1)")
    num_perm: int = field(128, help="MinHash signature length (more: better estimates, more memory)")
    shingle_size: int = field(5, help="n of the word n-gram shingles (character n-grams for CJK text)")
    seed: int = field(1, help="seed of the MinHash hash family")


def exact_key(text: str) -> bytes:
    """16-byte hash of the text with case and whitespace differences removed."""
    norm = " ".join(text.casefold().split())
    return hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def shingles(ids: np.ndarray, n: int) -> np.ndarray:
    """Unique 64-bit hashes of the unit n-gram shingles (ids from units.unit_arrays).

    A document shorter than n units is one shingle of all its units.
    """
    if len(ids) == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.unique(ngram_hashes(ids, min(n, len(ids))))


class MinHasher:
    """num_perm hash functions drawn once from `seed`; the same seed gives the same signatures anywhere."""

    def __init__(self, num_perm: int = 128, seed: int = 1, block: int = 4096):
        assert num_perm > 0
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**64 - 1, size=num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
        self.b = rng.integers(0, 2**64 - 1, size=num_perm, dtype=np.uint64, endpoint=True)
        self.num_perm, self.block = num_perm, block

    def signature(self, shingle_hashes: np.ndarray) -> np.ndarray:
        """(num_perm,) uint32 minimum of each hash function over the shingles; needs at least one shingle."""
        assert len(shingle_hashes) > 0, "a signature needs at least one shingle"
        x = (shingle_hashes >> _SHIFT32) ^ (shingle_hashes & _MASK32)  # fold to 32-bit keys
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for i in range(0, len(x), self.block):
            vals = np.multiply.outer(x[i : i + self.block], self.a)  # (k, num_perm), wraps mod 2^64
            vals += self.b
            np.minimum(sig, vals.min(axis=0), out=sig)
        # the shift is monotonic, so min-then-shift equals shift-then-min and saves a pass
        return (sig >> _SHIFT32).astype(np.uint32)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.1, fn_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising weighted false positives and negatives.

    A pair with similarity s becomes a candidate with probability 1 - (1 - s^r)^b; we integrate the
    miss probability above the threshold and the hit probability below it (as datasketch does). Misses
    weigh more here because every candidate is verified on its full signature: a false candidate costs
    one comparison, a missed duplicate stays in the corpus. At 0.8 / 128 this gives 14 bands of 9 rows:
    a pair at Jaccard 0.9 is a candidate with probability 0.999, at 0.85 0.975.
    """
    assert 0.0 < threshold < 1.0, "the Jaccard threshold must be in (0, 1)"
    s_lo = np.linspace(0.0, threshold, 256)
    s_hi = np.linspace(threshold, 1.0, 256)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - s_lo**r) ** b, s_lo)
            fn = np.trapezoid((1 - s_hi**r) ** b, s_hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


class NearDupIndex:
    """LSH index over kept documents' signatures; `check_and_add` is the whole near-dedup decision."""

    def __init__(self, threshold: float, num_perm: int):
        self.threshold = threshold
        self.bands, self.rows = optimal_bands(threshold, num_perm)
        self.tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.sigs: list[np.ndarray] = []

    def check_and_add(self, sig: np.ndarray) -> int | None:
        """Index of a kept document this one nearly duplicates (it is then not added), or None (added)."""
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen: set[int] = set()
        for table, key in zip(self.tables, keys):
            for j in table.get(key, ()):
                if j not in seen:
                    seen.add(j)
                    if jaccard_estimate(self.sigs[j], sig) >= self.threshold:
                        return j
        idx = len(self.sigs)
        self.sigs.append(sig)
        for table, key in zip(self.tables, keys):
            table.setdefault(key, []).append(idx)
        return None
