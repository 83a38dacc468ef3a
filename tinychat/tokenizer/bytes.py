"""How many UTF-8 bytes each token stands for: the denominator of bits per byte.

Why bits per byte: loss per token depends on the tokenizer (a bigger vocabulary packs more text into
a token), so models with different tokenizers can only be compared per byte of text. Special tokens
stand for no text and count zero bytes.
"""

from __future__ import annotations

import functools


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible map from the 256 byte values to printable characters, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_byte_lengths(tokenizer) -> list[int]:  # noqa: ANN001 - tinychat Tokenizer
    """Bytes per token id for a byte-level BPE tokenizer (others: the UTF-8 length of the decoded token)."""
    dec = _byte_decoder()
    backend = tokenizer.backend
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    out = []
    for i in range(tokenizer.vocab_size):
        tok = backend.id_to_token(i)
        if tok is None or tok in special:
            out.append(0)
        elif all(ch in dec for ch in tok):
            out.append(len(tok))  # one character per byte in the byte-level alphabet
        else:
            out.append(len(tokenizer.decode([i]).encode("utf-8")))
    return out
