"""ROUGE-L against known values, Google's rouge_score on English, and Chinese (which rouge_score cannot see)."""

from __future__ import annotations

import random

import pytest

from tinychat.data.rouge import lcs_length, max_rouge_l, rouge_l, rouge_tokens


def score(a: str, b: str) -> float:
    return rouge_l(rouge_tokens(a), rouge_tokens(b))


def test_known_values() -> None:
    # rouge_score's README example: LCS "the quick brown jumps the" = 5 of 9 and 8 tokens -> F = 10/17
    fox = "The quick brown fox jumps over the lazy dog"
    assert score("The quick brown dog jumps on the log.", fox) == pytest.approx(10 / 17)
    assert score("Give three tips for staying healthy.", "give THREE tips, for staying healthy!") == 1.0
    assert score("alpha beta", "gamma delta") == 0.0
    assert score("", "anything") == 0.0
    # LCS 3 ("a b d") of 4 and 5 tokens: P = 3/4, R = 3/5, F = 2/3
    assert score("a b c d", "a x b d y") == pytest.approx(2 / 3)


def test_chinese_is_one_token_per_character() -> None:
    assert rouge_tokens("写一首关于春天的诗, in 3 lines") == [*"写一首关于春天的诗", "in", "3", "lines"]
    # 9 characters each, 8 in common: F = 8/9, a near-duplicate at the 0.7 threshold
    assert score("写一首关于春天的诗", "写一首关于秋天的诗") == pytest.approx(8 / 9)
    assert score("写一首关于春天的诗", "解释为什么天空是蓝色的") < 0.3


def test_lcs_is_symmetric_and_bounded() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        n = lcs_length(a, b)
        assert n == lcs_length(b, a) <= min(len(a), len(b))
        assert lcs_length(a, a) == len(a)


def test_max_rouge_l_matches_brute_force() -> None:
    rng = random.Random(1)
    words = "the a cat dog sat ran on under mat log".split()
    pool = [[rng.choice(words) for _ in range(rng.randint(1, 15))] for _ in range(300)]
    for _ in range(30):
        cand = [rng.choice(words) for _ in range(rng.randint(1, 15))]
        best, i = max_rouge_l(cand, pool)
        assert best == pytest.approx(max(rouge_l(cand, p) for p in pool)) and rouge_l(cand, pool[i]) == best
    assert max_rouge_l(["x"], []) == (0.0, -1)


def test_equals_rouge_score_on_english() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [
        ("Give three tips for staying healthy.", "Give me 3 tips to stay healthy!"),
        ("What's the capital of France? (answer in 1 word)", "what is the capital city of france"),
        ("Write a poem about the sea.", "Compose a short poem about the ocean and the sea"),
        ("Convert 25 degrees Celsius to Fahrenheit.", "Convert the temperature from Celsius to Fahrenheit."),
        ("List five fruits that are red.", "Name 5 red fruits."),
    ]
    for a, b in pairs:
        assert score(b, a) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure)
