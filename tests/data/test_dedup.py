"""MinHash estimates Jaccard similarity; the LSH index finds near duplicates in English and Chinese."""

from __future__ import annotations

import numpy as np
from datagen import en_doc, mutate_chars, mutate_words, zh_doc

from tinychat.data.dedup import MinHasher, NearDupIndex, exact_key, jaccard_estimate, optimal_bands, shingles
from tinychat.data.units import unit_arrays


def _sh(text: str) -> np.ndarray:
    return shingles(unit_arrays(text)[0], 5)


def test_exact_key_normalises_case_and_whitespace():
    assert exact_key("Hello   World\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello worlds")


def test_minhash_estimates_jaccard(rng):
    mh = MinHasher(256, seed=3)
    errors = []
    for k in (2, 8, 20, 40):
        a = en_doc(rng, 15)
        b = mutate_words(a, rng, k)
        sa, sb = _sh(a), _sh(b)
        true = len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb))
        errors.append(abs(jaccard_estimate(mh.signature(sa), mh.signature(sb)) - true))
    assert max(errors) < 0.1 and np.mean(errors) < 0.05, errors


def test_signatures_are_deterministic():
    s = _sh("the same text gives the same signature in every process and run")
    assert np.array_equal(MinHasher(64, 1).signature(s), MinHasher(64, 1).signature(s))
    assert not np.array_equal(MinHasher(64, 1).signature(s), MinHasher(64, 2).signature(s))


def test_index_finds_near_duplicates_not_strangers(rng):
    mh = MinHasher(128, 1)
    index = NearDupIndex(0.8, 128)
    originals = [en_doc(rng) for _ in range(20)] + [zh_doc(rng) for _ in range(20)]
    for doc in originals:
        assert index.check_and_add(mh.signature(_sh(doc))) is None  # all distinct
    for i, doc in enumerate(originals):
        near = mutate_words(doc, rng, 1) if i < 20 else mutate_chars(doc, rng, 2)
        assert index.check_and_add(mh.signature(_sh(near))) == i


def test_optimal_bands():
    b, r = optimal_bands(0.8, 128)
    assert b * r <= 128 and r > 1
    b2, r2 = optimal_bands(0.5, 128)
    assert r2 < r  # a lower threshold needs shorter bands to catch less similar pairs
