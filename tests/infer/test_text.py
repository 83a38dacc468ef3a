"""Incremental detokenisation: streaming deltas add up to the full decode, stop strings cut, O(1) windows."""

from __future__ import annotations

import random

import pytest

from tinychat.infer.text import TextTracker
from tinychat.tokenizer import Tokenizer, train_tokenizer
from tinychat.tokenizer.bytes import _byte_decoder


@pytest.fixture(scope="module")
def mixed_tok() -> Tokenizer:
    """Byte-level BPE over English and Chinese: many tokens are partial UTF-8 characters."""
    rng = random.Random(0)
    words = "the quick brown fox 你好 世界 模型 学习 聊天 over a lazy dog".split()
    return train_tokenizer([" ".join(rng.choice(words) for _ in range(20)) for _ in range(200)], 300)


def reference(tok, ids: list[int], stop: list[str]) -> str:  # noqa: ANN001
    """What the stream must add up to: the full decode, cut before the first stop string."""
    text = tok.decode(ids)
    cuts = [i for i in (text.find(s) for s in stop) if i != -1]
    return text[: min(cuts)] if cuts else text


@pytest.mark.parametrize("stop", [[], ["fox"], ["界 模", "dog"], ["x"]])
def test_deltas_add_up_to_the_full_decode(mixed_tok, stop):
    rng = random.Random(len(stop))
    for trial in range(30):
        # random byte-level ids split multi-byte characters anywhere; also text-like sequences
        n = rng.randint(1, 40)
        ids = (
            [rng.randrange(mixed_tok.vocab_size) for _ in range(n)]
            if trial % 2
            else mixed_tok.encode(" ".join(rng.choice("the fox 你好 世界 模 dog a".split()) for _ in range(n)))
        )
        tr = TextTracker(mixed_tok, stop)
        out = ""
        for t in ids:
            piece = tr.push(t)
            assert not piece.endswith("\ufffd")  # a partial character is held back, never streamed
            out += piece
            if tr.stopped:
                break
        out += tr.finish()
        want = reference(mixed_tok, ids[: len(tr.ids)], stop)
        assert out == want == tr.text
        if not tr.stopped:
            assert out == mixed_tok.decode(ids)


def test_a_partial_character_is_held_back_until_complete(mixed_tok):
    to_char = {b: c for c, b in _byte_decoder().items()}
    ids = [mixed_tok.token_to_id(to_char[b]) for b in "你好".encode()]  # one token per byte
    assert None not in ids and mixed_tok.decode(ids[:2]).endswith("\ufffd")
    tr = TextTracker(mixed_tok, [])
    pieces = [tr.push(t) for t in ids]
    assert pieces == ["", "", "你", "", "", "好"] and tr.finish() == ""


def test_stop_string_split_over_tokens_is_never_streamed(mixed_tok):
    ids = mixed_tok.encode("the quick brown fox over a lazy dog")
    tr = TextTracker(mixed_tok, ["lazy dog"])
    streamed = "".join(tr.push(t) for t in ids)
    assert tr.stopped and streamed + tr.finish() == "the quick brown fox over a "
    assert "lazy" not in streamed


def test_each_token_decodes_a_short_window(mixed_tok):
    """The cost per token does not grow with the output: decode sees only the last few ids."""
    seen: list[int] = []

    class Counting:
        def decode(self, ids):  # noqa: ANN001, ANN202
            seen.append(len(ids))
            return mixed_tok.decode(ids)

    ids = mixed_tok.encode(" ".join(["the quick brown fox"] * 50))
    tr = TextTracker(Counting(), [])
    text = "".join(tr.push(t) for t in ids) + tr.finish()
    assert text == mixed_tok.decode(ids) and len(ids) > 150
    assert max(seen) <= 4
