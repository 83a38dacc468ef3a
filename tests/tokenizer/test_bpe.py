"""Encoding and decoding: exact round trips, safe special tokens, digits one by one, no unknown token."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinychat.errors import UserError
from tinychat.tokenizer import SPECIAL_TOKENS, train_tokenizer

LOOKALIKES = list(SPECIAL_TOKENS) + ["<|im_start|>user\n", "<|im", "_end|>", "<tool_call>{}</tool_call>"]
PIECES = st.sampled_from(
    LOOKALIKES + ["你好", "世界", "🙂", "👩‍👩‍👧", "\n\n", "   ", "\t", "\r\n", " 12345", "x", "éé", "\u200b", "\ufeff"]
)
# Arbitrary Unicode (no surrogates: they are not valid in UTF-8 text) mixed with the tricky pieces above.
TEXTS = st.lists(st.one_of(st.text(max_size=20), PIECES), max_size=12).map("".join)


def test_special_tokens_first_in_order(tok):
    assert len(SPECIAL_TOKENS) == 16
    assert [tok.id_to_token(i) for i in range(16)] == list(SPECIAL_TOKENS)
    assert SPECIAL_TOKENS[:9] == (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
        "<tool_response>", "</tool_response>", "<think>", "</think>",
    )  # fmt: skip
    assert SPECIAL_TOKENS[9:] == tuple(f"<|reserved_{i}|>" for i in range(7))


def test_named_ids(tok):
    assert (tok.eot_id, tok.im_start_id, tok.im_end_id, tok.pad_id, tok.eos_id) == (0, 1, 2, 0, 2)
    assert tok.stop_ids == {0, 2}
    assert len(tok) == tok.vocab_size == 600


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_round_trip_and_lookalikes_stay_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(16 <= i < tok.vocab_size for i in ids), "a look-alike became a special token"


@settings(max_examples=100, deadline=None)
@given(st.lists(TEXTS, max_size=8))
def test_encode_batch_matches_encode(tok, texts):
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789", min_size=1, max_size=40), st.text(max_size=10))
def test_ascii_digits_one_per_token(tok, digits, prefix):
    assert tok.encode(digits) == [tok.token_to_id(d) for d in digits]
    # inside other text too: no token holds two digits
    for i in tok.encode(prefix + digits + " apples"):
        assert len(re.findall(r"\d", tok.decode([i]))) <= 1


def test_numbers_in_text_split_per_digit(tok):
    pieces = [tok.decode([i]) for i in tok.encode("x=12345+678")]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("12345678")
    # any \p{N}, not only ASCII: the pre-tokenizer isolates each one (merges never cross pre-tokens)
    split = [w for w, _ in tok.backend.pre_tokenizer.pre_tokenize_str("n٣٤½")]
    assert len(split) == 4


def test_no_unknown_token_ever(tok):
    backend = tok.backend
    assert backend.model.unk_token is None
    everything = "".join(chr(c) for c in range(1, 0x3000) if not 0xD800 <= c < 0xE000) + "\U0001f600\U0010ffff"
    ids = tok.encode(everything)
    assert tok.decode(ids) == everything
    assert all(tok.id_to_token(i) is not None for i in ids)


def test_chinese_words_get_merged(tok):
    assert len(tok.encode("今天天气很好")) < len("今天天气很好".encode())


def test_decode_can_skip_special_tokens(tok):
    ids = [tok.im_start_id] + tok.encode("user\nhi") + [tok.im_end_id, tok.eot_id]
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|><|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_encode_rejects_non_strings(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_transformers_encodes_plain_text_identically(tok, hf_tok, text):
    """The saved tokenizer.json is the same pipeline for transformers (text without look-alikes)."""
    if any(s in text for s in SPECIAL_TOKENS):
        return
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text


def test_vocab_too_small_is_a_user_error():
    with pytest.raises(UserError, match="at least 272"):
        train_tokenizer(["hello"], 100)


def test_small_corpus_gives_smaller_vocab_but_works():
    t = train_tokenizer(["ab ab ab"], 1000)
    assert 272 <= t.vocab_size < 1000
    assert t.decode(t.encode("anything 你好")) == "anything 你好"
