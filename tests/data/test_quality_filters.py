"""Quality heuristics: clean generated prose passes; each kind of junk fails the check meant for it."""

from __future__ import annotations

import numpy as np
from datagen import en_doc, zh_doc

from tinychat.data.quality import QualityConfig, dup_ngram_frac, quality_check, top_ngram_frac
from tinychat.data.units import unit_arrays


def test_good_documents_pass(rng):
    cfg = QualityConfig()
    for _ in range(30):
        assert quality_check(en_doc(rng), cfg) is None
        assert quality_check(zh_doc(rng), cfg) is None


def test_each_check_catches_its_junk(rng):
    cfg = QualityConfig()
    good = en_doc(rng)
    cases = {
        "words": "Too short to be a document.",
        "mean_word_len": " ".join(["a b c d e f g h i j."] * 20) + " " + en_doc(rng, 1),
        "symbol_ratio": good + " " + " ".join(["#tag"] * 30),
        "alpha_words": good + " " + " ".join(str(i) for i in range(400)),
        "bullet_lines": "\n".join(f"- {w} item" for w in good.split()[:80]),
        "ellipsis_lines": "\n".join(s + " ..." for s in good.split(". ")),
        "line_punct": "\n".join(" ".join(good.split()[i : i + 6]).rstrip(".!?") for i in range(0, 120, 6)),
        "dup_lines": "\n".join([good.split("\n")[0]] + ["Click here to subscribe to our newsletter today."] * 5),
        "top_ngram": " ".join(["the river"] * 40) + " " + en_doc(rng, 3),
        "dup_ngram": (en_doc(rng, 2) + " ") * 3,
    }
    for want, text in cases.items():
        assert quality_check(text, cfg) == want, want
    assert quality_check("Too short.", QualityConfig(enabled=False)) is None


def test_chinese_repetition_is_caught(rng):
    doc = zh_doc(rng, 3)
    assert quality_check(doc * 4, QualityConfig()) == "dup_ngram"


def test_ngram_measures():
    ids, lens = unit_arrays("a b c a b c x y z")
    assert top_ngram_frac(ids, lens, 3) == 6 / 9
    assert np.isclose(dup_ngram_frac(ids, lens, 3), 6 / 9)
    ids, lens = unit_arrays("one two three four five six")
    assert top_ngram_frac(ids, lens, 2) == 0.0 and dup_ngram_frac(ids, lens, 5) == 0.0


def test_units_split_cjk_per_character():
    ids, lens = unit_arrays("Hello, 世界! hello")
    assert list(lens) == [5, 1, 1, 5] and ids[0] == ids[3]
